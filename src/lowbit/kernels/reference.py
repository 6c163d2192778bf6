"""Reference kernels: quantize activations and dequantize weights with the numeric reference,
then run the float op. Always correct, always available; every fast kernel is tested against
these."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives import QParams, choose_qparams, dequantize, quantize
from . import register_kernel


def quantize_input(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Activations as the kernels see them: divided by ``input_smooth`` when set, then dynamic
    (per token, at run time) or static (calibrated ``input_scale``/``input_zero_point``) fake
    quantization; unchanged otherwise. Conv inputs are seen channels-last: a pixel is a token."""
    spec = module.activation
    if module.input_smooth is None and spec.mode == "none":
        return x
    conv = module.op == "conv2d"
    if conv:
        x = x.movedim(1, -1)
    if module.input_smooth is not None:
        x = x / module.input_smooth.to(x.dtype)
    if spec.mode != "none":
        gran = spec.resolved_granularity
        if spec.mode == "dynamic":
            qp = choose_qparams(x, spec.format, gran, spec.range, name="activation")
        else:
            qp = QParams(module.input_scale, module.input_zero_point)
        x = dequantize(quantize(x, spec.format, qp, gran), spec.format, qp, gran, x.shape, x.dtype)
    return x.movedim(-1, 1) if conv else x


@register_kernel("linear", "reference", priority=-100)
def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = module.qweight.dequantize(x.dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.linear(quantize_input(x, module), w, bias)  # outlier channels: split off by kernels.run


@register_kernel("conv2d", "reference", priority=-100)
def conv2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = module.pre_pad(x)
    w = module.qweight.dequantize(x.dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.conv2d(quantize_input(x, module), w, bias, module.stride, module.padding, module.dilation, module.groups)


@register_kernel("embedding", "reference", priority=-100)
def embedding(module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    rows = module.dequantize_rows(ids.reshape(-1))
    return rows.reshape(*ids.shape, rows.shape[-1])
