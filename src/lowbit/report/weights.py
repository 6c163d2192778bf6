"""Weight views for the report: per-layer SQNR by depth (against the source model when it can be
loaded) and, for a few layers, the weights with the grid their first group was quantized to."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import LowbitError
from ..nn import QModule


def _grid(module: QModule) -> list[float]:
    """The distinct values the first group (or row) of this layer's codes can stand for."""
    qt = module.qweight
    deq = qt.dequantize(torch.float32)
    row = deq.reshape(deq.shape[0], -1)[0]
    group = getattr(qt.granularity, "size", None)
    part = row[:group] if isinstance(group, int) and group > 0 else row
    levels = torch.unique(part)
    return [float(v) for v in levels[:256]]


def weight_views(checkpoint: Path, layers: int = 3) -> dict[str, Any]:
    """{'sqnr': [(name, dB)], 'reference': source or None, 'histograms': [(name, values, grid)]}."""
    from ..export.checkpoint import load
    from ..models import load_model

    loaded = load(checkpoint)
    quantized = [(n, m) for n, m in loaded.model.named_modules() if isinstance(m, QModule)]
    source = loaded.meta.get("source_model")
    reference = None
    if source:
        try:
            reference = load_model(source).model
        except (LowbitError, OSError):
            reference = None
    sqnr = []
    if reference is not None:
        for name, module in quantized:
            try:
                original = reference.get_submodule(name).weight.detach().float()
            except AttributeError:
                continue
            error = (original - module.qweight.dequantize(torch.float32)).pow(2).sum()
            signal = original.pow(2).sum()
            sqnr.append((name, float(10 * math.log10(signal / error)) if error > 0 else float("inf")))
    picks = sorted({0, len(quantized) // 2, len(quantized) - 1})[:layers] if quantized else []
    histograms = []
    for index in picks:
        name, module = quantized[index]
        values = (
            reference.get_submodule(name).weight.detach().float()
            if reference is not None
            else module.qweight.dequantize(torch.float32)
        ).flatten()
        if values.numel() > 200_000:
            values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
        histograms.append((name, values.numpy(), _grid(module), module.qweight.fmt.name))
    return {"sqnr": sqnr, "reference": source if reference is not None else None, "histograms": histograms}
