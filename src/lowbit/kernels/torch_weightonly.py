"""Portable weight-only fallbacks on torch's own CPU ops (no lowbit native code): used when the
native kernels are unavailable (``LOWBIT_NATIVE=0``, no compiler, no AVX-512) and faster than
dequantize-then-matmul.

- int8 per channel: ``aten._weight_int8pack_mm`` (int8 [N, K] x per-row scales in x's dtype).
- int4 groups: ``aten._weight_int4pack_mm_for_cpu``; it decodes w = (q - 8) * s + zf, so our
  w = (q - z) * s becomes zf = (8 - z) * s, stored with s as ``scales_and_zeros`` [G, N, 2].
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import Int
from ..granularity import PerChannel, PerGroup
from . import prepacked, register_kernel

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
INT4_GROUPS = (32, 64, 128, 256)
# torch's CPU int8/int4 weight-only ops are GEMV kernels: on a Zen 3 (AVX2) at 576 x 1536 they took
# 262-455 ms for 512 rows where dequantize + matmul (the reference) took 7-10 ms, and were slower
# than the reference from 8 rows on. More rows go to the next kernel.
MAX_ROWS = 4


def _few_rows(x: torch.Tensor) -> bool:
    return x.numel() <= MAX_ROWS * x.shape[-1]


def _prepare(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x as 2-D in its dtype, divided by ``input_smooth`` (as the reference does); bias in x's dtype."""
    if module.input_smooth is not None:
        x = x / module.input_smooth.to(x.dtype)
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return x.reshape(-1, x.shape[-1]), bias


def _int8_ok(module: nn.Module, x: torch.Tensor) -> bool:
    fmt, gran = module.weight_format, module.weight_granularity
    return (
        module.op == "linear"
        and isinstance(fmt, Int)
        and fmt.bits == 8
        and fmt.symmetric
        and isinstance(gran, PerChannel)
        and gran.axis in (0, -2)
        and len(module.weight_shape) == 2
        and module.weight_shape[1] % 16 == 0  # torch's bf16 path reads past K otherwise
        and x.dtype in FLOAT_INPUTS
        and _few_rows(x)
    )


@register_kernel("linear", "torch-int8pack", layouts={"int8/channel", "int8-full/channel"}, acts={"none"},
                 devices={"cpu"}, priority=5, available=_int8_ok)  # fmt: skip
def int8pack_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """int8 per-channel weights through ``aten._weight_int8pack_mm``."""
    fmt: Int = module.weight_format

    def build(m: nn.Module) -> torch.Tensor:
        return (m.qweight.codes().to(torch.int16) + fmt.qmin).to(torch.int8).contiguous()

    w = prepacked(module, "torch-int8pack", build)
    x2, bias = _prepare(module, x)
    y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), w, module.scale.to(x.dtype).reshape(-1).contiguous())
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])


def int4_groups(module: nn.Module) -> bool:
    """A 2-D weight of 4-bit integer codes with group scales (what torch's int4 ops take)."""
    fmt, gran = module.weight_format, module.weight_granularity
    return isinstance(fmt, Int) and fmt.bits == 4 and isinstance(gran, PerGroup) and len(module.weight_shape) == 2


def int4_scales_and_zeros(module: nn.Module) -> torch.Tensor:
    """[groups, N, 2] fp32 (scale, zf) for torch's int4 ops, which decode w = (q - 8) * scale + zf."""
    fmt: Int = module.weight_format
    scale = module.scale.float()
    zero = module.zero_point.float() if module.zero_point is not None else torch.full_like(scale, float(-fmt.qmin))
    return torch.stack([scale, (8.0 - zero) * scale], dim=-1).transpose(0, 1).contiguous()


def _int4_ok(module: nn.Module, x: torch.Tensor) -> bool:
    if not int4_groups(module):
        return False
    gran = module.weight_granularity
    n, k = module.weight_shape
    return (
        module.op == "linear"
        and gran.size in INT4_GROUPS
        and k % gran.size == 0
        and n % 16 == 0
        and x.dtype in FLOAT_INPUTS
        and _few_rows(x)
    )


@register_kernel("linear", "torch-int4pack", layouts={"int4/group", "int4-asym/group", "int4-full/group"},
                 acts={"none"}, devices={"cpu"}, priority=5, available=_int4_ok)  # fmt: skip
def int4pack_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """int4 group weights through ``aten._weight_int4pack_mm_for_cpu``."""
    group = module.weight_granularity.size

    def build(m: nn.Module) -> torch.Tensor:
        n, k = m.weight_shape
        codes = m.qweight.codes().reshape(n, k).to(torch.int32)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)

    packed = prepacked(module, "torch-int4pack", build)
    scales_and_zeros = prepacked(
        module, f"torch-int4pack-params-{x.dtype}", lambda m: int4_scales_and_zeros(m).to(x.dtype)
    )
    x2, bias = _prepare(module, x)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, group, scales_and_zeros)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])
