"""Outlier split (LLM.int8 style): input channels whose activations exceed a threshold stay in
float (their weight columns kept aside); all other channels go through the int8 path."""

from __future__ import annotations

import torch

from ..errors import DataError, SpecError
from ..spec import QuantSpec
from ..tensor import QTensor
from . import LayerResult, register_algorithm


def outlier_channels(channel_absmax: torch.Tensor, threshold: float, max_fraction: float) -> torch.Tensor:
    """Indices (ascending) of input channels with max |x| > threshold, at most max_fraction of them
    (the largest ones win)."""
    over = (channel_absmax > threshold).nonzero().squeeze(1)
    limit = max(0, int(max_fraction * channel_absmax.numel()))
    if over.numel() > limit:
        over = over[torch.argsort(channel_absmax[over], descending=True)[:limit]]
    return torch.sort(over).values


@register_algorithm(
    "outliers",
    options={"threshold", "max_fraction"},
    stats={"channels"},
    description="LLM.int8-style split: outlier input channels stay float, the rest int8",
)
def outliers(
    weight: torch.Tensor,
    spec: QuantSpec,
    stats,
    *,
    name: str = "weight",
    threshold: float = 6.0,
    max_fraction: float = 0.05,
    **_,
) -> LayerResult:
    if stats is None or stats.channel_min is None:
        raise DataError(f"{name}: outliers needs calibration data (activation ranges per channel)")
    if weight.dim() != 2:
        raise SpecError(f"{name}: the outlier split handles Linear layers only")
    if not (threshold > 0 and 0 <= max_fraction <= 1):
        raise SpecError(f"{name}: outliers needs threshold > 0 and 0 <= max_fraction <= 1")
    index = outlier_channels(stats.channel_absmax, float(threshold), float(max_fraction))
    main = weight.detach().clone()
    kept = main[:, index].clone()
    main[:, index] = 0.0
    return LayerResult(QTensor.quantize(main, spec, name=name), outlier_index=index, outlier_weight=kept)
