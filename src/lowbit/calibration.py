"""Calibration: run batches through a model and collect what quantization needs
(activation ranges for static schemes) with forward hooks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import DataError
from .ranges import RangeObserver
from .recipe import LayerScheme


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """Feed one calibration batch: a dict of keyword tensors, a tuple of positional ones, or a tensor."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_batches(model: nn.Module, batches: Iterable[Any]) -> int:
    """Run every batch under inference mode; returns how many ran."""
    count = 0
    with torch.inference_mode():
        for batch in batches:
            forward_batch(model, batch)
            count += 1
    if count == 0:
        raise DataError("calibration data is empty; give at least one batch")
    return count


def collect_input_ranges(
    model: nn.Module, plan: dict[str, LayerScheme], batches: Iterable[Any]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer with a static activation scheme: the clipping range (lo, hi) of its input."""
    observers: dict[str, RangeObserver] = {}
    handles = []
    for name, scheme in plan.items():
        act = scheme.activation
        if act.mode != "static":
            continue
        observer = RangeObserver(act.range, act.resolved_granularity)
        observers[name] = observer

        def hook(module, args, observer=observer):
            observer.update(args[0])

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    if not observers:
        return {}
    try:
        run_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return {name: obs.compute(plan[name].activation.format) for name, obs in observers.items()}


def calibration_data(loaded: Any, path: str | None = None, samples: int = 128, seq_len: int = 512) -> list[Any]:
    """Default calibration batches for a loaded model: random token windows of a text file
    (WikiText-2 valid by default) for language models, sentences for encoders, images
    (a folder, or the bundled sample photos) for image classifiers."""
    from . import data

    if samples < 1 or seq_len < 1:
        raise DataError(f"calibration needs samples >= 1 and seq_len >= 1 (got {samples}, {seq_len})")
    if loaded.kind == "causal-lm":
        windows = data.lm_calibration(loaded.tokenizer, path, samples=samples, seq_len=seq_len)
        return [{"input_ids": w} for w in windows]
    if loaded.kind == "encoder":
        texts = data.sentences(path, count=samples)
        return data.encoder_batches(loaded.tokenizer, texts, batch_size=16, max_length=min(seq_len, 512))
    images = data.images(path or "photos")
    pixels = images[0] if isinstance(images, tuple) else images
    batch = loaded.preprocess(pixels) if loaded.preprocess is not None else pixels
    return [batch[i : i + 16] for i in range(0, min(len(batch), samples), 16)]
