"""QModule: what every quantized layer shares: the weight QTensor kept as buffers, the
activation spec with its calibrated parameters, and kernel dispatch."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import Format
from ..granularity import Granularity
from ..recipe import ActivationSpec
from ..tensor import QTensor


def layout_of(qt: QTensor) -> str:
    """Kernel layout key: format name / granularity kind (+ sparsity), e.g. 'int4-asym/group',
    'int4/channel+2:4'."""
    base = f"{qt.fmt.name}/{qt.granularity.name.split(':')[0]}"
    return base if qt.sparsity is None else f"{base}+{qt.sparsity}"


WEIGHT_BUFFERS = ("qdata", "scale", "zero_point", "codebook", "mask")


class QModule(nn.Module):
    """Base of QLinear, QConv2d and QEmbedding. The weight lives in the buffers ``qdata``,
    ``scale``, ``zero_point`` and ``codebook`` (so ``state_dict`` and ``.to()`` just work);
    ``qweight`` rebuilds the QTensor view over them."""

    op = "linear"

    def __init__(self, qweight: QTensor, activation: ActivationSpec, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight_format: Format = qweight.fmt
        self.weight_granularity: Granularity = qweight.granularity
        self.weight_shape = qweight.shape
        self.weight_dtype = qweight.dtype
        self.register_buffer("qdata", qweight.data)
        self.register_buffer("scale", qweight.scale)
        self.register_buffer("zero_point", qweight.zero_point)
        self.register_buffer("codebook", qweight.codebook)
        self.register_buffer("mask", qweight.mask)
        self.weight_sparsity = qweight.sparsity
        self.activation = activation
        self.register_buffer("input_scale", None)
        self.register_buffer("input_zero_point", None)
        self.register_buffer("input_smooth", None)
        self.register_buffer("outlier_index", None)
        self.register_buffer("outlier_weight", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.layout = layout_of(qweight)
        self._kernel_cache: dict = {}

    @property
    def qweight(self) -> QTensor:
        return QTensor(
            self.qdata,
            self.weight_format,
            self.weight_granularity,
            self.weight_shape,
            self.weight_dtype,
            self.scale,
            self.zero_point,
            self.codebook,
            self.mask,
            self.weight_sparsity,
        )

    @property
    def weight(self) -> QTensor:
        """The quantized weight (code that reads ``.weight.shape``/``.dtype`` keeps working)."""
        return self.qweight

    def set_input_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        """Calibrated static activation parameters."""
        self.input_scale = scale.detach().clone()
        self.input_zero_point = None if zero_point is None else zero_point.detach().clone()

    def set_input_smooth(self, smooth: torch.Tensor) -> None:
        """Per-input-channel divisor applied before activations are quantized (SmoothQuant, AWQ)."""
        self.input_smooth = smooth.detach().float().clone()

    def set_outliers(self, index: torch.Tensor, weight: torch.Tensor) -> None:
        """Input channels ``index`` bypass quantization, multiplied by the float ``weight`` [out, n]."""
        self.outlier_index = index.detach().to(torch.int64).clone()
        self.outlier_weight = weight.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .. import kernels

        return kernels.run(self.op, self, x)

    def extra_repr(self) -> str:
        act = self.activation.mode
        if act != "none":
            act = f"{act} {self.activation.format.name}/{self.activation.resolved_granularity.name}"
        return f"weight={self.qweight!r}, activations={act}"


def same_weight(a: QModule, b: QModule) -> bool:
    """Whether two quantized layers hold the same weight (format, layout and every tensor)."""
    if (a.weight_format, a.weight_granularity, a.weight_shape, a.weight_dtype, a.weight_sparsity) != (
        b.weight_format,
        b.weight_granularity,
        b.weight_shape,
        b.weight_dtype,
        b.weight_sparsity,
    ):
        return False
    for key in WEIGHT_BUFFERS:
        x, y = getattr(a, key), getattr(b, key)
        if (x is None) != (y is None) or (x is not None and (x.dtype != y.dtype or not torch.equal(x, y))):
            return False
    return True
