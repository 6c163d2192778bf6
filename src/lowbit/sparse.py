"""Sparse storage for pruned weights: only kept weights have codes.

Two layouts, both row-major over the weight viewed as [rows, cols]:
- ``bitmask``: one bit per weight (packed like 1-bit codes), codes for the set bits in order.
- ``2:4`` (N:M with N=2, M=4): exactly two kept weights in every 4 consecutive inputs; each
  kept weight stores its 2-bit position inside its group of 4. Storage then is 1/2 of the
  codes plus 4 bits per 4 weights, whatever the values.
"""

from __future__ import annotations

import math

import torch

from . import packing
from .errors import SpecError

PATTERNS = ("bitmask", "2:4")


def _matrix(shape: torch.Size) -> tuple[int, int]:
    return (1, shape.numel()) if len(shape) < 2 else (shape[0], math.prod(shape[1:]))


def kept_count(mask: torch.Tensor) -> int:
    return int(mask.sum())


def encode(mask: torch.Tensor, pattern: str) -> torch.Tensor:
    """Packed metadata for a boolean keep-mask of the weight's shape."""
    if pattern == "bitmask":
        return packing.pack(mask.reshape(-1).to(torch.uint8), 1)
    if pattern == "2:4":
        rows, cols = _matrix(mask.shape)
        groups = mask.reshape(rows, cols).reshape(rows, -1, 4)
        if cols % 4 or not bool((groups.sum(-1) == 2).all()):
            raise SpecError("2:4 sparsity needs an input dimension divisible by 4 and exactly 2 kept per 4")
        positions = torch.arange(4).expand_as(groups)[groups].to(torch.uint8)  # 2 per group, ascending
        return packing.pack(positions, 2)
    raise SpecError(f"sparsity pattern {pattern!r} is unknown; use one of {PATTERNS}")


def decode(meta: torch.Tensor, pattern: str, shape: torch.Size) -> torch.Tensor:
    """Boolean keep-mask of ``shape`` from packed metadata."""
    numel = shape.numel()
    if pattern == "bitmask":
        return packing.unpack(meta, 1, numel).bool().reshape(shape)
    if pattern == "2:4":
        rows, cols = _matrix(shape)
        positions = packing.unpack(meta, 2, numel // 2).long().reshape(rows, cols // 4, 2)
        mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool)
        mask.scatter_(2, positions, True)
        return mask.reshape(shape)
    raise SpecError(f"sparsity pattern {pattern!r} is unknown; use one of {PATTERNS}")


def meta_size(pattern: str, shape: torch.Size) -> int:
    """Bytes of metadata for a weight of ``shape``."""
    return packing.packed_size(shape.numel(), 1) if pattern == "bitmask" else packing.packed_size(shape.numel() // 2, 2)


def magnitude_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the largest |w|: prune a fraction ``ratio`` of the weights (ties: lower index kept)."""
    if not 0.0 <= ratio < 1.0:
        raise SpecError(f"sparsity ratio {ratio} must lie in [0, 1)")
    flat = weight.detach().abs().reshape(-1)
    prune = round(ratio * flat.numel())
    mask = torch.ones_like(flat, dtype=torch.bool)
    if prune:
        mask[torch.argsort(flat, stable=True)[:prune]] = False
    return mask.reshape(weight.shape)


def n_m_mask(weight: torch.Tensor, n: int = 2, m: int = 4, score: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive inputs of each row (by |w| or ``score``)."""
    rows, cols = _matrix(weight.shape)
    if cols % m:
        raise SpecError(f"{n}:{m} sparsity needs an input dimension divisible by {m}, got {cols}")
    s = (weight.detach().abs() if score is None else score).reshape(rows, cols // m, m)
    keep = torch.topk(s, n, dim=-1).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(weight.shape)
