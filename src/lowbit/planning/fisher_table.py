"""The sensitivity table's Fisher method: every (layer, candidate) damage estimated from the
Fisher / Gauss-Newton diagonal (fisher.py), each candidate's estimates scaled to one measurement
of that candidate on every layer, and refusals of what the estimate cannot price."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import SpecError
from ..models import Loaded
from ..recipe import LayerScheme
from .fisher import estimated_damage, fisher_diagonal
from .sensitivity import Metric, metric_outputs, operating_point, quantize_one, table_option


def fisher_options(
    loaded: Loaded,
    floats: dict[str, nn.Module],
    pairs: list[tuple[str, str]],
    schemes: dict[str, LayerScheme],
    stats: dict,
    batches: list[Any],
    progress: Callable[[str, int, int], None] | None,
) -> list[dict[str, Any]]:
    """Per (layer, candidate): the table entry with the damage estimated from the Fisher /
    Gauss-Newton diagonal (planning/fisher.py), one backward pass per batch for all of them."""
    if progress is not None:
        progress("Fisher diagonal (one backward pass per batch)", 0, len(pairs))
    diagonal, units = fisher_diagonal(
        loaded.kind, loaded.model, batches, floats, lambda m, b: metric_outputs(loaded.kind, m, b)
    )
    out = []
    for index, (name, cand) in enumerate(pairs):
        if progress is not None:
            progress(f"{name} {cand}", index, len(pairs))
        original = floats[name]
        quantized = quantize_one(original, name, schemes[cand], stats.get(name))
        replaced = quantized.qweight.dequantize(torch.float32)
        out.append(
            table_option(
                original, quantized, stats.get(name), estimated_damage(diagonal[name], units, original.weight, replaced)
            )
        )
    return out


def calibrate_fisher(
    model: nn.Module,
    layers: list[str],
    names: list[str],
    pairs: list[tuple[str, str]],
    options: list[dict[str, Any]],
    schemes: dict[str, LayerScheme],
    stats: dict,
    metric: Metric,
    progress: Callable[[str, int, int], None] | None,
) -> dict[str, dict[str, float]]:
    """Per candidate, measure the damage of quantizing every layer with it (one evaluation each)
    and scale that candidate's estimates so they sum to it. The quadratic model is right within
    ~20% from 3 to 8 bits on SmolLM2 but under-prices 2-bit grids about twice (far from float the
    damage grows faster than quadratically); the scale carries that into the plan. A measurement
    that is not positive (noise at the float model's level) leaves the estimates as they are."""
    out = {}
    for index, cand in enumerate(names):
        if progress is not None:
            progress(f"every layer {cand}", index, len(names))
        estimated = sum(o["damage"] for (_, c), o in zip(pairs, options, strict=True) if c == cand)
        with operating_point(model, layers, schemes[cand], stats):
            measured = metric.damage(model)
        scale = measured / estimated if measured > 0 and estimated > 0 else 1.0
        for (_, c), option in zip(pairs, options, strict=True):
            if c == cand:
                option["damage"] *= scale
        out[cand] = {"uniform_damage": measured, "estimated": estimated, "scale": scale}
    return out


def check_fisher(names: list[str], schemes: dict[str, LayerScheme], base: str | None, labels) -> None:
    """The Fisher estimate prices weight changes around the float model, with the KL / cosine metrics."""
    if base is not None:
        raise SpecError(
            "the Fisher estimate is taken around the float model; an operating point (--base) needs method 'measured'"
        )
    if labels is not None:
        raise SpecError(
            "the Fisher estimate prices KL or 1 - cosine; the expected-accuracy drop needs method 'measured'"
        )
    acts = [n for n in names if schemes[n].activation.mode != "none"]
    if acts:
        raise SpecError(
            f"the Fisher estimate prices weight changes only; {acts} quantize activations: use method 'measured' "
            "or weight-only candidates"
        )
