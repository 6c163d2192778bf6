"""Round-to-nearest: the baseline every other algorithm is compared with."""

from __future__ import annotations

import torch

from ..spec import QuantSpec
from ..tensor import QTensor
from . import register_algorithm


@register_algorithm("rtn", options=set(), stats=set(), description="round to nearest on the spec's range")
def rtn(weight: torch.Tensor, spec: QuantSpec, stats: object = None, *, name: str = "weight", **_) -> QTensor:
    """Quantize ``weight`` per ``spec`` with no data: the range estimator alone picks the grid."""
    return QTensor.quantize(weight.detach(), spec, name=name)
