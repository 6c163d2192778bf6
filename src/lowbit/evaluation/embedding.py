"""Sentence-encoder quality: fidelity of embeddings to a reference model, and word similarity
against human judgements (Spearman rank correlation)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..data import encoder_batches
from ..errors import DataError, ModelError
from .perplexity import model_device


def encoder_hidden(model: nn.Module, batch: dict[str, torch.Tensor], out: Any = None) -> torch.Tensor | None:
    """The encoder's last hidden states for ``batch`` (``out``: the forward's result if already run):
    ``last_hidden_state``, or for a model with a head (e.g. ...ForMaskedLM, ...ForSequenceClassification)
    the last of its ``hidden_states``."""
    out = model(**batch) if out is None else out
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and hasattr(out, "hidden_states") and hasattr(out, "logits"):
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    return hidden


def _last_hidden_state(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    hidden = encoder_hidden(model, batch, out)
    if hidden is None and isinstance(out, (tuple, list)):
        hidden = out[0]
    if hidden is None and torch.is_tensor(out):
        hidden = out
    if hidden is None or hidden.dim() != 3:
        raise ModelError(
            f"{type(model).__name__}: its forward returned no last_hidden_state [batch, seq, dim]; "
            "pass an encoder (e.g. a Hugging Face AutoModel)"
        )
    return hidden


@torch.inference_mode()
def sentence_embeddings(
    model: nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 32, max_length: int = 128
) -> torch.Tensor:
    """L2-normalised mean of the last hidden state over the attention mask: float32 [N, D] on CPU.
    Sentences are cut at ``max_length`` tokens or the model's position limit, whichever is less."""
    device = model_device(model)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        max_length = min(max_length, limit)
    batches = encoder_batches(tokenizer, sentences, batch_size, max_length)
    rows = {}
    for index in distributed.mine(len(batches)):  # all batches, or this rank's share under torchrun
        batch = {k: v.to(device) for k, v in batches[index].items()}
        hidden = _last_hidden_state(model, batch).float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        rows[index] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
    return torch.cat(distributed.gather(rows, len(batches)))


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """Index of each row's most cosine-similar other row (rows are unit vectors)."""
    sims = embeddings @ embeddings.T
    sims.fill_diagonal_(-math.inf)
    return sims.argmax(dim=1)


def embedding_fidelity(
    model: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    batch_size: int = 32,
    max_length: int = 128,
) -> dict:
    """How close ``model``'s sentence embeddings stay to ``reference``'s: cosine per sentence and
    agreement of each sentence's nearest neighbour within the set."""
    if len(sentences) < 2:
        raise DataError(f"embedding_fidelity: {len(sentences)} sentence(s) given; need at least 2 for neighbours")
    ours = sentence_embeddings(model, tokenizer, sentences, batch_size, max_length)
    theirs = sentence_embeddings(reference, tokenizer, sentences, batch_size, max_length)
    unit = torch.nn.functional.normalize
    cosine = (unit(ours.double(), dim=-1) * unit(theirs.double(), dim=-1)).sum(-1)
    agree = nearest_neighbours(ours) == nearest_neighbours(theirs)
    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "top1_agreement": float(agree.double().mean()),
        "sentences": len(sentences),
    }


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, len(values)])
    mean_rank = first + (counts + 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x: np.ndarray | list[float], y: np.ndarray | list[float]) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN when either side is
    constant or holds NaN/Inf."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise DataError(f"spearman: need two 1-D sequences of equal length >= 2, got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum() / denominator) if denominator > 0 else math.nan


def word_similarity(
    model: nn.Module, tokenizer: Any, pairs: list[tuple[str, str, float]], batch_size: int = 64
) -> dict:
    """Spearman correlation between human scores and the cosine of the two words' embeddings
    (each word embedded as a sentence). ``spearman`` is None when it is undefined."""
    if len(pairs) < 2:
        raise DataError(f"word_similarity: {len(pairs)} pair(s) given; need at least 2")
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    index = {w: i for i, w in enumerate(words)}
    vectors = sentence_embeddings(model, tokenizer, words, batch_size, max_length=16)
    left = vectors[[index[a] for a, _, _ in pairs]]
    right = vectors[[index[b] for _, b, _ in pairs]]
    cosine = (left.double() * right.double()).sum(-1).numpy()
    rho = spearman(cosine, [score for _, _, score in pairs])
    return {"spearman": None if math.isnan(rho) else rho, "pairs": len(pairs)}
