"""Evaluation: each function returns a plain dict of metrics."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from .. import data as datasets
from ..errors import DataError, ModelError
from ..models import Loaded
from .classification import classify
from .embedding import embedding_fidelity, word_similarity
from .perplexity import perplexity
from .size import model_size

TASK_KINDS = {"perplexity": "causal-lm", "embedding": "encoder", "classification": "image-classifier"}
TASK_OPTIONS = {
    "perplexity": {"seq_len", "stride", "max_tokens", "progress"},
    "embedding": {"count", "seed", "batch_size", "max_length", "word_sets"},
    "classification": {"batch_size"},
}
_COMMON_OPTIONS = {"tokenizer", "preprocess"}


def _unpack(target: Loaded | nn.Module, role: str) -> tuple[nn.Module, Loaded | None]:
    if isinstance(target, Loaded):
        return target.model, target
    if isinstance(target, nn.Module):
        return target, None
    raise ModelError(f"evaluate: {role} is a {type(target).__name__}; pass a lowbit Loaded or an nn.Module")


def _check_kind(loaded: Loaded | None, task: str) -> None:
    if loaded is None or loaded.meta.get("type") == "module":  # a bare module's kind is only a guess
        return
    if loaded.kind != TASK_KINDS[task]:
        raise ModelError(
            f"{loaded.source} is a {loaded.kind!r} model but task {task!r} needs a {TASK_KINDS[task]!r} model; "
            "pick the task that fits the model"
        )


def _perplexity(model, tokenizer, data, reference, opts) -> tuple[dict, str]:
    path = Path(data) if data is not None else datasets.wikitext("test")
    metrics = perplexity(model, tokenizer, path, **opts)
    metrics.pop("data")
    if reference is not None:
        metrics["reference_perplexity"] = perplexity(reference, tokenizer, path, **opts)["perplexity"]
    return metrics, str(path)


def _embedding(model, tokenizer, data, reference, opts) -> tuple[dict, str]:
    path = Path(data) if data is not None else datasets.wikitext("test")
    run = {k: opts[k] for k in ("batch_size", "max_length") if k in opts}
    word_sets = opts.get("word_sets", tuple(datasets.WORD_PAIRS))
    start = time.perf_counter()
    metrics: dict[str, Any] = {}
    if reference is not None:
        texts = datasets.sentences(path, count=opts.get("count", 1000), seed=opts.get("seed", 0))
        metrics.update(embedding_fidelity(model, reference, tokenizer, texts, **run))
    for name in word_sets:
        pairs = datasets.word_pairs(name)
        metrics[f"{name}_spearman"] = word_similarity(model, tokenizer, pairs)["spearman"]
        if reference is not None:
            metrics[f"reference_{name}_spearman"] = word_similarity(reference, tokenizer, pairs)["spearman"]
    metrics["seconds"] = time.perf_counter() - start
    return metrics, str(path) if reference is not None else ",".join(word_sets)


def _classification(model, preprocess, data, reference, opts) -> tuple[dict, str]:
    name = "photo-crops" if data is None else data
    images = datasets.images(name)
    metrics = classify(model, images.images, images.labels, reference, preprocess, opts.get("batch_size", 32))
    return metrics, str(name)


def evaluate(
    target: Loaded | nn.Module,
    task: str,
    data: str | Path | None = None,
    reference: Loaded | nn.Module | None = None,
    **options: Any,
) -> dict:
    """Evaluate a model on ``task`` ("perplexity", "embedding" or "classification") and report
    ``{"task", "metrics", "size_bytes", "bits_per_weight", "model", "data"}``.

    ``data``: a text file (perplexity, embedding sentences; default WikiText-2 test) or an image
    set ("photo-crops" default, "photos", "digits", a folder). ``reference``: the model to compare with
    (fidelity, agreement). ``options``: ``tokenizer``/``preprocess`` for a bare module, and the
    task's own (perplexity: seq_len, stride, max_tokens; embedding: count, seed, batch_size,
    max_length, word_sets; classification: batch_size)."""
    if task not in TASK_KINDS:
        raise DataError(f"evaluate: task {task!r} is unknown; use one of {', '.join(TASK_KINDS)}")
    unknown = set(options) - TASK_OPTIONS[task] - _COMMON_OPTIONS
    if unknown:
        allowed = sorted(TASK_OPTIONS[task] | _COMMON_OPTIONS)
        raise DataError(f"evaluate: option(s) {sorted(unknown)} do not apply to {task!r}; known: {allowed}")
    model, loaded = _unpack(target, "the model")
    _check_kind(loaded, task)
    ref_model = None
    if reference is not None:
        ref_model, ref_loaded = _unpack(reference, "the reference")
        _check_kind(ref_loaded, task)
    tokenizer = options.pop("tokenizer", None) or (loaded.tokenizer if loaded else None)
    preprocess = options.pop("preprocess", None) or (loaded.preprocess if loaded else None)
    if task == "classification":
        metrics, used = _classification(model, preprocess, data, ref_model, options)
    else:
        if tokenizer is None:
            raise DataError(f"evaluate: {task!r} needs a tokenizer; pass a Loaded model or tokenizer=...")
        runner = _perplexity if task == "perplexity" else _embedding
        metrics, used = runner(model, tokenizer, data, ref_model, options)
    size = model_size(model)
    return {
        "task": task,
        "metrics": metrics,
        "size_bytes": size["bytes"],
        "bits_per_weight": size["bits_per_weight"],
        "model": loaded.source if loaded else type(model).__name__,
        "data": used,
    }
