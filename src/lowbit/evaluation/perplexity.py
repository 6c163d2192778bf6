"""Perplexity of a causal language model on a text file: the sliding-window evaluation of the
Hugging Face guide, with every scored token counted exactly."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import token_stream, wikitext
from ..errors import DataError, ModelError


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def causal_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of a causal LM: a Hugging Face model (no KV cache) or any module
    returning logits or an object with ``.logits``."""
    if hasattr(model, "config") and hasattr(model, "generate"):
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = model(input_ids)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not torch.is_tensor(logits) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ModelError(
            f"{type(model).__name__}: expected logits [batch, seq, vocab] for input {tuple(input_ids.shape)}, "
            f"got {getattr(logits, 'shape', type(logits).__name__)}; pass a causal language model"
        )
    return logits


def windows(total: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over a stream of ``total`` tokens: each window
    scores the tokens in [first_scored, end) that no earlier window scored; token 0 never."""
    spans = []
    prev_end = 0
    for begin in range(0, total, stride):
        end = min(begin + seq_len, total)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == total:
            break
    return spans


@torch.inference_mode()
def perplexity_of_ids(
    model: nn.Module,
    ids: torch.Tensor,
    seq_len: int = 512,
    stride: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Sliding-window perplexity of ``model`` on the token stream ``ids`` (int64 [T]);
    ``progress(what, step, total)`` is called before each window."""
    stride = stride or seq_len
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise DataError(f"perplexity: seq_len={seq_len}, stride={stride}; need seq_len >= 2 and 1 <= stride <= seq_len")
    if ids.numel() < 2:
        raise DataError(f"perplexity: the text has {ids.numel()} token(s); at least 2 are needed to score one")
    start = time.perf_counter()
    device = model_device(model)
    nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    spans = windows(ids.numel(), seq_len, stride)
    top = int(ids.max())
    for index, (begin, end, first) in enumerate(spans):
        if progress is not None:
            progress(f"window {index + 1}/{len(spans)}", index, len(spans))
        window = ids[begin:end].unsqueeze(0).to(device)
        logits = causal_logits(model, window)
        if top >= logits.shape[-1]:
            raise ModelError(
                f"{type(model).__name__}: the tokens have ids up to {top} but the model has "
                f"{logits.shape[-1]} logits; pass the tokenizer that belongs to the model"
            )
        # position p predicts token p + 1; the scored tokens are first..end-1 (window-relative)
        predicting = logits[0, first - begin - 1 : end - begin - 1].float()
        targets = window[0, first - begin : end - begin]
        nll += torch.nn.functional.cross_entropy(predicting, targets, reduction="sum").double().cpu()
        scored += end - first
    nll_per_token = float(nll) / scored
    return {
        "perplexity": math.exp(nll_per_token),
        "nll_per_token": nll_per_token,
        "tokens": scored,
        "windows": len(spans),
        "seq_len": seq_len,
        "stride": stride,
        "seconds": time.perf_counter() - start,
    }


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Perplexity on a text file (default: WikiText-2 test), tokenized whole without special
    tokens; ``max_tokens`` keeps only the first tokens (a quick slice); ``stride`` defaults to
    ``seq_len`` (disjoint windows), a smaller one gives every scored token more context."""
    if tokenizer is None:
        raise DataError("perplexity: no tokenizer given; pass the tokenizer that belongs to the model")
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"perplexity: max_tokens={max_tokens}; use at least 2 (or None for the whole file)")
    path = Path(path) if path is not None else wikitext("test")
    ids = token_stream(tokenizer, path)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    result = perplexity_of_ids(model, ids, seq_len, stride, progress)
    result["data"] = str(path)
    return result
