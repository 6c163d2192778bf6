"""k-means codebooks for vector quantization (seeded k-means++ init, Lloyd iterations)."""

from __future__ import annotations

import torch

from ..formats import Codebook

_INIT_SAMPLE = 1 << 14  # vectors seen by k-means++ seeding; Lloyd steps use all vectors


def nearest_center(vectors: torch.Tensor, centers: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest center (squared L2) for every vector."""
    norms = (centers * centers).sum(dim=1)
    idx = torch.empty(vectors.shape[0], dtype=torch.long)
    for i in range(0, vectors.shape[0], chunk):
        idx[i : i + chunk] = torch.addmm(norms, vectors[i : i + chunk], centers.T, alpha=-2).argmin(dim=1)
    return idx


def kmeans_pp_init(vectors: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new center drawn with probability proportional to D(x)^2."""
    n = vectors.shape[0]
    if n > _INIT_SAMPLE:
        vectors = vectors[torch.randperm(n, generator=gen)[:_INIT_SAMPLE]]
        n = _INIT_SAMPLE
    centers = torch.empty(k, vectors.shape[1])
    centers[0] = vectors[torch.randint(n, (1,), generator=gen)]
    dist = ((vectors - centers[0]) ** 2).sum(dim=1)
    for j in range(1, k):
        total = dist.sum()
        if total <= 0:  # fewer distinct vectors than entries: repeat existing centers
            centers[j:] = centers[torch.arange(j, k) % j]
            break
        pick = torch.multinomial(dist / total, 1, generator=gen)
        centers[j] = vectors[pick]
        dist = torch.minimum(dist, ((vectors - centers[j]) ** 2).sum(dim=1))
    return centers


def kmeans(vectors: torch.Tensor, k: int, iters: int, seed: int, tolerance: float = 1e-3) -> torch.Tensor:
    """Lloyd's k-means on [n, dim] vectors; stops when under ``tolerance`` of the assignments
    change; empty clusters keep their previous center."""
    gen = torch.Generator().manual_seed(seed)
    vectors = vectors.float()
    if vectors.shape[0] == 0:
        return torch.zeros(k, vectors.shape[1])
    centers = kmeans_pp_init(vectors, k, gen)
    previous = None
    wide = vectors.double()  # exact sums: a cluster of identical vectors keeps its exact value
    for _ in range(iters):
        idx = nearest_center(vectors, centers)
        if previous is not None and (idx != previous).sum() <= tolerance * idx.numel():
            break
        sums = torch.zeros(k, vectors.shape[1], dtype=torch.float64).index_add_(0, idx, wide)
        counts = torch.bincount(idx, minlength=k).double().unsqueeze(1)
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers.double()).float()
        previous = idx
    return centers


def fit_codebooks(parts: list[torch.Tensor], fmt: Codebook) -> torch.Tensor:
    """One codebook per part ([rows, n_sub, dim] sub-vectors): [n_parts, entries, dim]."""
    books = [kmeans(part.reshape(-1, fmt.dim), fmt.entries, fmt.iters, fmt.seed + i) for i, part in enumerate(parts)]
    return torch.stack(books)
