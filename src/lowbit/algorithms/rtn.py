"""Round-to-nearest: the baseline every other algorithm is compared with."""

from __future__ import annotations

import torch

from ..primitives import choose_qparams, quantize
from ..spec import QuantSpec
from ..tensor import QTensor
from . import register_algorithm


@register_algorithm("rtn", options=set(), stats=set(), description="round to nearest on the spec's range")
def rtn(
    weight: torch.Tensor,
    spec: QuantSpec,
    stats: object = None,
    *,
    name: str = "weight",
    keep: torch.Tensor | None = None,
    sparsity=None,
    **_,
) -> QTensor:
    """Quantize ``weight`` per ``spec`` with no data: the range estimator alone picks the grid.
    With a ``keep`` mask, pruned weights are zeroed and only kept codes are stored."""
    w = weight.detach()
    if keep is None:
        return QTensor.quantize(w, spec, name=name)
    w = w * keep
    qp = choose_qparams(w, spec.format, spec.granularity, spec.range, spec.torch_scale_dtype, name)
    codes = quantize(w, spec.format, qp, spec.granularity)
    return QTensor.from_codes(codes, qp, spec, w.shape, w.dtype, keep=keep, sparsity=sparsity.storage)
