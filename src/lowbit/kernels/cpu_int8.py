"""W8A8 CPU kernels: int8 per-channel weights x int8 activations quantized per token at run time
(dynamic) or per tensor with calibrated parameters (static), SmoothQuant's divisor fused.

``cpu-int8`` runs lowbit's AVX-512 VNNI ops (``csrc/int8.cpp``), one ``torch.ops.lowbit.w8a8_linear``
call per layer: a weight-streaming GEMV/GEMM below ``ONEDNN_MIN_ROWS`` activation rows, oneDNN's int8
matmul above; on CPUs with AMX, lowbit's AMX tile GEMM from ``AMX_MIN_ROWS`` rows instead of both.
``cpu-int8-portable`` needs no native code (``torch._int_mm`` on codes from ``lowbit.primitives``)
for CPUs without AVX-512. Both give the reference's activation codes exactly;
outputs differ from the reference kernel only by float summation order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import Int
from ..granularity import PerChannel, PerTensor, PerToken
from ..primitives import QParams, choose_qparams, quantize
from . import native_available, prepacked, register_kernel

# Activation rows (tokens, pixels) from which oneDNN's int8 matmul beats the weight-streaming
# GEMM (bench/kernels_int8.py measures both; at 4096x4096 they cross between 16 and 32 rows).
ONEDNN_MIN_ROWS = 24
# Small layers (e.g. MiniLM's 384-wide ones) stay on the native GEMM up to ONEDNN_SMALL_MIN_ROWS:
# oneDNN's per-call cost dominates there (bench/models.py: 1 x 32 tokens 3.7 -> 2.5 ms).
ONEDNN_SMALL_MIN_ROWS = 64
ONEDNN_LARGE_WEIGHT = 1 << 21  # N * K from which a layer counts as large


# Activation rows from which lowbit's AMX GEMM runs (CPUs with AMX int8: Sapphire Rapids and later).
# It beat both the VNNI GEMM and oneDNN from 8 rows on, at every shape bench/kernel_speed.py and
# MiniLM use; the VNNI GEMV keeps decode, whose weight stream it is tuned for.
AMX_MIN_ROWS = 8


def use_onednn(rows: int, weight_shape: tuple[int, ...]) -> bool:
    """oneDNN's int8 matmul for many rows without AMX; the native GEMM below that, or with AMX."""
    if rows >= AMX_MIN_ROWS and _amx_ready():
        return False
    large = weight_shape[0] * math.prod(weight_shape[1:]) >= ONEDNN_LARGE_WEIGHT
    return rows >= (ONEDNN_MIN_ROWS if large else ONEDNN_SMALL_MIN_ROWS)


INT8 = Int(8)
UINT8 = Int(8, symmetric=False)


@dataclass(frozen=True)
class PackedWeight:
    """A layer's weight in the layouts the native ops read (built once, see ``prepacked``)."""

    packed: torch.Tensor  # [N/32][K/4][32][4] int8 panels on huge pages
    sums: torch.Tensor  # int32 row sums of the codes (zero-point compensation), N padded to 32
    scale: torch.Tensor  # float32 [N]
    bias: torch.Tensor | None  # float32 [N]


def weight_codes(module: nn.Module) -> torch.Tensor:
    """Signed int8 weight codes [out, in * kh * kw] from the module's stored uint8 codes."""
    stored = module.qdata.reshape(module.weight_shape[0], -1)
    return (stored.to(torch.int16) + module.weight_format.qmin).to(torch.int8)


def _float_bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().float().contiguous()


def _pack(module: nn.Module) -> PackedWeight:
    packed, sums = torch.ops.lowbit.w8a8_pack(weight_codes(module))
    return PackedWeight(packed, sums, module.scale.float().reshape(-1).contiguous(), _float_bias(module))


def _pack_onednn_linear(module: nn.Module) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(weight_codes(module), None)


def _pack_onednn_conv(module: nn.Module) -> torch.Tensor:
    codes = weight_codes(module).reshape(module.weight_shape)
    zero = 0 if module.input_zero_point is None else int(module.input_zero_point)
    return torch.ops.onednn.qconv_prepack(
        codes,
        module.scale.float().reshape(-1),
        float(module.input_scale),
        zero,
        list(module.stride),
        list(module.padding),
        list(module.dilation),
        module.groups,
        None,
    )


@torch.compiler.assume_constant_result
def _build_while_tracing(module: nn.Module, key: str, build: Callable[[nn.Module], object]) -> bool:
    module.__dict__[f"_traced_{key}"] = prepacked(module, key, build)
    return True


def cached(module: nn.Module, key: str, build: Callable[[nn.Module], object]):
    """``prepacked(module, key, build)`` that torch.compile can trace: while tracing, the layout
    is built eagerly and read back as a module attribute, which the graph holds as a constant."""
    if torch.compiler.is_compiling():
        _build_while_tracing(module, key, build)
        return getattr(module, f"_traced_{key}")
    return prepacked(module, key, build)


def packed_weight(module: nn.Module) -> PackedWeight:
    return cached(module, "cpu-int8", _pack)


def onednn_linear_weight(module: nn.Module) -> torch.Tensor:
    return cached(module, "cpu-int8-onednn", _pack_onednn_linear)


def onednn_conv_weight(module: nn.Module) -> torch.Tensor:
    return cached(module, "cpu-int8-onednn-conv", _pack_onednn_conv)


# ---------------------------------------------------------------------------------------------
# What the kernels handle


def weight_supported(module: nn.Module) -> bool:
    """Symmetric int8 codes with one scale per output channel."""
    gran = module.weight_granularity
    return module.weight_format == INT8 and isinstance(gran, PerChannel) and gran.axis == 0


def activation_supported(module: nn.Module) -> bool:
    """Dynamic symmetric int8 per token (min-max), or static int8 / uint8 per tensor."""
    spec = module.activation
    gran = spec.resolved_granularity
    if spec.mode == "dynamic":
        return spec.format == INT8 and isinstance(gran, PerToken) and spec.range.name in ("minmax", "moving_minmax")
    if spec.mode == "static":
        return (
            spec.format in (INT8, UINT8)
            and isinstance(gran, PerTensor)
            and module.input_scale is not None
            and module.input_scale.numel() == 1
            and (spec.format == INT8) == (module.input_zero_point is None)
        )
    return False


def _input_supported(module: nn.Module, x: torch.Tensor) -> bool:
    return x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu" and x.numel() > 0


def _linear_ok(module: nn.Module, x: torch.Tensor) -> bool:
    return weight_supported(module) and activation_supported(module) and _input_supported(module, x)


def conv_is_pointwise(module: nn.Module) -> bool:
    """A 1x1 convolution without padding or groups: a linear layer over channels-last pixels."""
    return module.kernel_size == (1, 1) and module.groups == 1 and module.padding in ((0, 0), "valid", "same")


def _conv_ok(module: nn.Module, x: torch.Tensor) -> bool:
    if not (_linear_ok(module, x) and x.dim() == 4):
        return False
    if conv_is_pointwise(module):
        return True
    # k x k: oneDNN's int8 convolution takes one activation scale, so static activations only.
    return module.activation.mode == "static" and not isinstance(module.padding, str)


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant
def _native_ready() -> bool:
    return _load_native()


@torch.compiler.assume_constant_result
def _amx_ready() -> bool:
    return _native_ready() and _amx_available()


@functools.cache
def _amx_available() -> bool:
    """Whether the native ops run AMX tiles here (the CPU has AMX int8 and Linux grants its state;
    LOWBIT_NO_AMX=1, read once per process, turns it off)."""
    return bool(torch.ops.lowbit.amx_available())


@functools.cache
def _load_native() -> bool:
    if not native_available():
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shape-only implementations of the native ops, so torch.compile can trace models using them."""

    def rows(n: int) -> int:
        return -(-n // 32) * 32

    @torch.library.register_fake("lowbit::w8a8_pack")
    def _pack_fake(w):
        n, k = w.shape
        return w.new_empty(rows(n) * -(-k // 4) * 4), w.new_empty(rows(n), dtype=torch.int32)

    @torch.library.register_fake("lowbit::w8a8_quantize")
    def _quantize_fake(x, smooth, x_scale, x_zero_point):
        return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("lowbit::w8a8_linear")
    def _linear_fake(
        x, w_packed, w_sum, w_scale, bias, smooth, x_scale, x_zero_point, w_onednn, onednn_min_rows, amx_min_rows
    ):
        return x.new_empty((*x.shape[:-1], w_scale.shape[0]))

    def _linear_group_fake(x, w_packed, w_sum, w_scale, bias, smooths, x_scales, x_zero_points, amx_min_rows):
        return tuple(x.new_empty((*x.shape[:-1], scale.shape[0])) for scale in w_scale)

    torch.library.register_fake("lowbit::w8a8_linear_pair", _linear_group_fake)
    torch.library.register_fake("lowbit::w8a8_linear_triple", _linear_group_fake)

    @torch.library.register_fake("lowbit::w8a8_conv2d")
    def _conv2d_fake(x, smooth, x_scale, x_zero_point, w_onednn, w_scale, bias, stride, padding, dilation, groups):
        kh, kw = w_onednn.shape[-2:]
        h, w = (
            (size + 2 * pad - dil * (k - 1) - 1) // st + 1
            for size, pad, dil, k, st in zip(x.shape[-2:], padding, dilation, (kh, kw), stride)
        )
        out = x.new_empty((x.shape[0], w_scale.shape[0], h, w))
        return out.contiguous(memory_format=torch.channels_last)


def _native_linear_ok(module: nn.Module, x: torch.Tensor) -> bool:
    return _native_ready() and _linear_ok(module, x)


def _native_conv_ok(module: nn.Module, x: torch.Tensor) -> bool:
    return _native_ready() and _conv_ok(module, x)


# ---------------------------------------------------------------------------------------------
# Native kernels


def _static_params(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if module.activation.mode != "static":
        return None, None
    return module.input_scale, module.input_zero_point


def native_linear_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b over the last dimension of ``x`` (any leading shape): one native call."""
    weight = packed_weight(module)
    rows = x.numel() // x.shape[-1]
    onednn = onednn_linear_weight(module) if use_onednn(rows, module.weight_shape) else None
    x_scale, x_zero = _static_params(module)
    return torch.ops.lowbit.w8a8_linear(
        x,
        weight.packed,
        weight.sums,
        weight.scale,
        weight.bias,
        module.input_smooth,
        x_scale,
        x_zero,
        onednn,
        ONEDNN_MIN_ROWS,
        AMX_MIN_ROWS,
    )


@register_kernel(
    "linear",
    "cpu-int8",
    layouts={"int8/channel"},
    acts={"dynamic", "static"},
    devices={"cpu"},
    priority=10,
    available=_native_linear_ok,
)
def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return native_linear_rows(module, x)


@register_kernel(
    "conv2d",
    "cpu-int8",
    layouts={"int8/channel"},
    acts={"dynamic", "static"},
    devices={"cpu"},
    priority=10,
    available=_native_conv_ok,
)
def conv2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = module.pre_pad(x)
    if conv_is_pointwise(module):
        x = x[:, :, :: module.stride[0], :: module.stride[1]]
        y = native_linear_rows(module, x.permute(0, 2, 3, 1))  # pixels as tokens, channels last
        return y.permute(0, 3, 1, 2)
    x_scale, x_zero = _static_params(module)
    bias = packed_weight(module).bias
    return torch.ops.lowbit.w8a8_conv2d(
        x,
        module.input_smooth,
        x_scale,
        x_zero,
        onednn_conv_weight(module),
        packed_weight(module).scale,
        bias,
        list(module.stride),
        list(module.padding),
        list(module.dilation),
        module.groups,
    )


# ---------------------------------------------------------------------------------------------
# Portable kernel: no native code, the same integer arithmetic with torch ops


def activation_codes(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes u - 128 [M, K], float32 scales [M] or [1], zero [M, 1] or [1]) for rows of ``x``:
    the reference's codes u (lowbit.primitives) stand for (u + qmin - zero_point) * scale."""
    spec = module.activation
    x = x.reshape(-1, x.shape[-1])
    if module.input_smooth is not None:
        x = x / module.input_smooth.to(x.dtype)
    gran = spec.resolved_granularity
    if spec.mode == "dynamic":
        qp = choose_qparams(x, spec.format, gran, spec.range, name="activation")
        zero = torch.zeros(1)
    else:
        qp = QParams(module.input_scale, module.input_zero_point)
        zero = torch.zeros(1) if qp.zero_point is None else qp.zero_point.float().reshape(1)
    codes = quantize(x, spec.format, qp, gran)
    offset = 128 + spec.format.qmin - zero  # u + qmin - zero = (u - 128) + offset
    return (codes.to(torch.int16) - 128).to(torch.int8), qp.scale.float().reshape(-1), offset


def _portable_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = weight_codes(module)
    return codes.t().contiguous(), codes.sum(dim=1, dtype=torch.int32), module.scale.float().reshape(-1)


def portable_linear_rows(module: nn.Module, x: torch.Tensor, min_rows: int = 0) -> torch.Tensor:
    """W8A8 with torch ops only (``torch._int_mm``); activation codes are zero-padded to
    ``min_rows`` rows for backends that need more (cuBLASLt: over 16)."""
    w_t, w_sum, w_scale = prepacked(module, "cpu-int8-portable", _portable_weight)
    a, x_scale, offset = activation_codes(module, x)
    rows = a.shape[0]
    padded = a if rows >= min_rows else torch.nn.functional.pad(a, (0, 0, 0, min_rows - rows))
    acc = torch._int_mm(padded, w_t)[:rows] + offset.to(torch.int32).reshape(-1, 1) * w_sum
    y = acc.float() * (x_scale.reshape(-1, 1) * w_scale)
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w_t.shape[1])


@register_kernel(
    "linear",
    "cpu-int8-portable",
    layouts={"int8/channel"},
    acts={"dynamic", "static"},
    devices={"cpu"},
    priority=5,
    available=_linear_ok,
)
def portable_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return portable_linear_rows(module, x)


@register_kernel(
    "conv2d",
    "cpu-int8-portable",
    layouts={"int8/channel"},
    acts={"dynamic", "static"},
    devices={"cpu"},
    priority=5,
    available=lambda module, x: _linear_ok(module, x) and x.dim() == 4 and conv_is_pointwise(module),
)
def portable_conv2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = module.pre_pad(x)[:, :, :: module.stride[0], :: module.stride[1]]
    return portable_linear_rows(module, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
