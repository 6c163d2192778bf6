"""Fake-quantization wrappers for quantization-aware training.

``FakeQuantLinear`` / ``FakeQuantConv2d`` keep the float weight as the trained parameter and
fake-quantize it (and optionally the input) on every forward with the straight-through
estimator. Int and level-table weight formats learn their scales (LSQ, and zero points for
asymmetric formats); binary/ternary weights take their scale from the weights each step
(mean |w|, TWN) with an identity straight-through gradient; static activations observe a
moving-average range during warm-up, then learn their scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError
from ..formats import Binary, Codebook, Float, Ternary
from ..granularity import PerTensor
from ..primitives import (
    QParams,
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_lsq,
    qparams_from_range,
    quantize,
)
from ..recipe import ActivationSpec, LayerScheme
from ..spec import QuantSpec


class WeightFakeQuant(nn.Module):
    """Fake-quantizes a weight tensor per ``spec``."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec) -> None:
        super().__init__()
        if isinstance(spec.format, Codebook):
            raise SpecError("QAT does not train codebook formats; quantize them after training (PTQ)")
        self.spec = spec
        self.rule_based = isinstance(spec.format, (Binary, Ternary, Float))
        if not self.rule_based:
            qp = choose_qparams(weight.detach(), spec.format, spec.granularity, spec.range)
            self.scale = nn.Parameter(qp.scale.float().clone())
            self.zero_point = None if qp.zero_point is None else nn.Parameter(qp.zero_point.float().clone())

    def qparams(self, weight: torch.Tensor) -> QParams:
        """The parameters the forward uses (detached): what ``convert`` stores."""
        if self.rule_based:
            return choose_qparams(weight.detach(), self.spec.format, self.spec.granularity, self.spec.range)
        zero = (
            None
            if self.zero_point is None
            else self.zero_point.detach().clamp(self.spec.format.qmin, self.spec.format.qmax)
        )
        return QParams(self.scale.detach().abs().clamp(min=1e-12), zero)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        fmt, gran = self.spec.format, self.spec.granularity
        if self.rule_based:
            qp = self.qparams(weight)
            w_hat = dequantize(quantize(weight.detach(), fmt, qp, gran), fmt, qp, gran, weight.shape, weight.dtype)
            return weight + (w_hat - weight).detach()  # identity straight-through gradient
        scale = self.scale.abs().clamp(min=1e-12)
        zero = None if self.zero_point is None else self.zero_point.clamp(fmt.qmin, fmt.qmax)
        return fake_quantize_lsq(weight, scale, fmt, gran, zero_point=zero)


class ActivationFakeQuant(nn.Module):
    """Fake-quantizes a layer input: dynamic (per token, each call) or static (moving-average
    range for ``warmup`` training steps, then a learned scale; the zero point stays fixed)."""

    def __init__(self, spec: ActivationSpec, warmup: int = 100, momentum: float = 0.9, channels_last: bool = False):
        super().__init__()
        if spec.mode not in ("dynamic", "static"):
            raise SpecError(f"activation fake quantization needs mode dynamic or static, not {spec.mode!r}")
        if spec.mode == "static" and not isinstance(spec.resolved_granularity, PerTensor):
            raise SpecError("QAT static activations are per tensor")
        self.spec, self.warmup, self.momentum, self.channels_last = spec, warmup, momentum, channels_last
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("lo", torch.zeros(1))
        self.register_buffer("hi", torch.zeros(1))
        self.register_buffer("zero", torch.zeros(1, dtype=torch.uint8))
        self.scale = nn.Parameter(torch.ones(1))

    @property
    def warming(self) -> bool:
        return int(self.steps) < self.warmup

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().reshape(1), x.detach().max().reshape(1)
        if int(self.steps) == 0:
            self.lo.copy_(lo)
            self.hi.copy_(hi)
        else:
            self.lo.mul_(self.momentum).add_((1 - self.momentum) * lo)
            self.hi.mul_(self.momentum).add_((1 - self.momentum) * hi)
        qp = qparams_from_range(self.spec.format, self.lo, self.hi)
        with torch.no_grad():
            self.scale.copy_(qp.scale.float())
            if qp.zero_point is not None:
                self.zero.copy_(qp.zero_point)
        self.steps += 1

    def input_qparams(self) -> QParams:
        zero = self.zero.clone() if self.spec.format.needs_zero_point else None
        return QParams(self.scale.detach().abs().clamp(min=1e-12).clone(), zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.movedim(1, -1)
        fmt, gran = self.spec.format, self.spec.resolved_granularity
        if self.spec.mode == "dynamic":
            qp = choose_qparams(x.detach(), fmt, gran, self.spec.range)
            out = fake_quantize(x, fmt, qp, gran)
        else:
            if self.training and self.warming:
                self._observe(x)
                out = fake_quantize(x, fmt, self.input_qparams(), gran)
            else:
                zero = self.zero if fmt.needs_zero_point else None
                out = fake_quantize_lsq(x, self.scale.abs().clamp(min=1e-12), fmt, gran, zero_point=zero)
        return out.movedim(-1, 1) if self.channels_last else out


class _FakeQuantLayer(nn.Module):
    """Shared by FakeQuantLinear and FakeQuantConv2d: the float weight stays the parameter."""

    def __init__(self, layer: nn.Module, scheme: LayerScheme, warmup: int, channels_last: bool) -> None:
        super().__init__()
        self.scheme = scheme
        self.weight = layer.weight
        self.bias = layer.bias
        self.weight_fq = WeightFakeQuant(layer.weight.detach(), scheme.weight)
        self.act_fq = None
        if scheme.activation.mode != "none":
            self.act_fq = ActivationFakeQuant(scheme.activation, warmup, channels_last=channels_last)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_fq is None else self.act_fq(x)


class FakeQuantLinear(_FakeQuantLayer):
    def __init__(self, layer: nn.Linear, scheme: LayerScheme, warmup: int = 100) -> None:
        super().__init__(layer, scheme, warmup, channels_last=False)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.weight_fq(self.weight), self.bias)


class FakeQuantConv2d(_FakeQuantLayer):
    def __init__(self, layer: nn.Conv2d, scheme: LayerScheme, warmup: int = 100) -> None:
        super().__init__(layer, scheme, warmup, channels_last=True)
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        pad = getattr(layer, "static_padding", None) if type(layer).forward is not nn.Conv2d.forward else None
        self.pre_pad = pad if isinstance(pad, nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(self.pre_pad(x))
        return F.conv2d(
            x, self.weight_fq(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups
        )
