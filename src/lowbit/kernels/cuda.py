"""GPU kernels, chosen when a layer's input is on a CUDA device; each runs torch's own GPU ops.

- ``cuda-int8``: W8A8 (dynamic per-token or static per-tensor int8 activations x int8
  per-channel weights): the integer path of ``cpu_int8.portable_linear_rows`` (codes from
  lowbit.primitives, ``torch._int_mm`` on cuBLASLt with int32 accumulation, fp32 rescale).
  cuBLASLt needs more than 16 rows, so decode-sized inputs are zero-padded to 32.
- ``cuda-fp8``: fp8 e4m3 per-channel weights x per-token dynamic fp8 activations through
  ``torch._scaled_mm`` with row-wise scales (Ada / Hopper, compute capability 8.9+).
- ``cuda-int4``: int4 weights in groups of 32-256 on bf16 activations through tinygemm
  (``aten._weight_int4pack_mm``: w = (q - 8) * s + zf, so zf = (8 - zero) * s as on the CPU op).
- ``cuda-2of4``: 2:4 sparse weights, dequantized once to the activation dtype and stored as a
  semi-structured sparse tensor (cuSPARSELt / CUTLASS) for ``F.linear``.

Every GPU kernel checks itself against the reference kernel on its first call for each layer
(relative error at most ``SELF_CHECK_TOL``); one that disagrees is dropped for that layer with a
warning and the reference runs instead, so a driver or torch difference never gives silently
wrong outputs. The int8 and fp8 arithmetic is tested on the CPU, where torch runs the same ops.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import Float
from ..granularity import PerChannel, PerToken
from ..primitives import choose_qparams, quantize
from . import prepacked, reference, register_kernel
from .cpu_int8 import activation_supported, portable_linear_rows, weight_supported
from .torch_weightonly import int4_groups, int4_scales_and_zeros

SELF_CHECK_TOL = 0.03  # relative L2 error vs the reference (bf16 outputs carry ~0.4%)
CUBLAS_MIN_ROWS = 32  # torch._int_mm on CUDA needs more than 16 rows
FP8_ROW_MULTIPLE = 16
INT4_GROUPS = (32, 64, 128, 256)
HALF_INPUTS = (torch.bfloat16, torch.float16)


def _verdict(module: nn.Module, name: str) -> bool | None:
    return module.__dict__.get("_gpu_self_check", {}).get(name)


def self_checked(name: str, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
    """``fn`` with a first-call comparison against the reference kernel for each layer."""

    def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        verdict = _verdict(module, name)
        if verdict is True:
            return fn(module, x)
        y = fn(module, x)
        ref = reference.linear(module, x)
        err = float((y.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))
        ok = err <= SELF_CHECK_TOL
        module.__dict__.setdefault("_gpu_self_check", {})[name] = ok
        if not ok:
            warnings.warn(
                f"lowbit kernel {name}: relative error {err:.3g} against the reference on this layer "
                f"(> {SELF_CHECK_TOL}); this layer uses the next kernel from now on",
                RuntimeWarning,
                stacklevel=2,
            )
            return ref
        return y

    return run


def _on_gpu(module: nn.Module, x: torch.Tensor, name: str) -> bool:
    return x.is_cuda and x.numel() > 0 and module.op == "linear" and _verdict(module, name) is not False


# ---- int8 x int8 -------------------------------------------------------------------------------


def int8_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W8A8 through ``torch._int_mm`` with rows padded for cuBLASLt (any device torch supports)."""
    return portable_linear_rows(module, x, min_rows=CUBLAS_MIN_ROWS)


def _int8_ok(module: nn.Module, x: torch.Tensor) -> bool:
    k, n = module.weight_shape[1], module.weight_shape[0]
    return (
        _on_gpu(module, x, "cuda-int8")
        and weight_supported(module)
        and activation_supported(module)
        and k % 8 == 0
        and n % 8 == 0
        and x.dtype in (torch.float32, *HALF_INPUTS)
    )


register_kernel(
    "linear", "cuda-int8", layouts={"int8/channel"}, acts={"dynamic", "static"}, devices={"cuda"},
    priority=10, available=_int8_ok,
)(self_checked("cuda-int8", int8_rows))  # fmt: skip


# ---- fp8 x fp8 ---------------------------------------------------------------------------------

FP8 = Float("fp8_e4m3")


def fp8_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp8 weights x per-token fp8 activations through ``torch._scaled_mm`` (row-wise scales,
    bf16 out, rows padded to a multiple of 16)."""
    spec = module.activation
    x2 = x.reshape(-1, x.shape[-1])
    if module.input_smooth is not None:
        x2 = x2 / module.input_smooth.to(x2.dtype)
    qp = choose_qparams(x2, spec.format, PerToken(), spec.range, name="activation")
    a = quantize(x2, spec.format, qp, PerToken()).view(torch.float8_e4m3fn)
    rows = a.shape[0]
    pad = -rows % FP8_ROW_MULTIPLE
    scale_a = qp.scale.float().reshape(-1, 1)
    if pad:
        a = torch.cat([a, torch.zeros(pad, a.shape[1], dtype=a.dtype, device=a.device)])
        scale_a = torch.cat([scale_a, torch.ones(pad, 1, device=scale_a.device)])
    w = prepacked(module, "cuda-fp8", lambda m: m.qdata.reshape(m.weight_shape).view(torch.float8_e4m3fn).contiguous())
    scale_b = module.scale.float().reshape(1, -1)
    y = torch._scaled_mm(a, w.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)[:rows].float()
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def _fp8_ok(module: nn.Module, x: torch.Tensor) -> bool:
    spec, gran = module.activation, module.weight_granularity
    k, n = module.weight_shape[1], module.weight_shape[0]
    return (
        _on_gpu(module, x, "cuda-fp8")
        and torch.cuda.get_device_capability(x.device) >= (8, 9)
        and module.weight_format == FP8
        and isinstance(gran, PerChannel)
        and gran.axis in (0, -2)
        and spec.mode == "dynamic"
        and spec.format == FP8
        and isinstance(spec.resolved_granularity, PerToken)
        and k % 16 == 0
        and n % 16 == 0
    )


register_kernel(
    "linear", "cuda-fp8", layouts={"fp8_e4m3/channel"}, acts={"dynamic"}, devices={"cuda"}, priority=10,
    available=_fp8_ok,
)(self_checked("cuda-fp8", fp8_rows))  # fmt: skip


# ---- int4 weight-only (tinygemm) ---------------------------------------------------------------


def inner_k_tiles(k: int) -> int | None:
    """tinygemm's innerKTiles for an input width: the largest of 8, 4, 2 with k % (16 * it) == 0."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


def tinygemm_pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] (two 4-bit codes per byte, even column in the high nibble) for tinygemm."""
    codes = codes.to(torch.uint8)
    return (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()


def tinygemm_params(module: nn.Module) -> torch.Tensor:
    """[groups, N, 2] (scale, zf) with w = (q - 8) * scale + zf, in bf16 (tinygemm's dtype)."""
    return int4_scales_and_zeros(module).to(torch.bfloat16)


def int4_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    n, k = module.weight_shape

    def build(m: nn.Module) -> torch.Tensor:
        codes = m.qweight.codes().reshape(n, k)
        return torch.ops.aten._convert_weight_to_int4pack(tinygemm_pack(codes), inner_k_tiles(k))

    packed = prepacked(module, "cuda-int4", build)
    params = prepacked(module, "cuda-int4-params", tinygemm_params)
    x2 = x.reshape(-1, k)
    if module.input_smooth is not None:
        x2 = x2 / module.input_smooth.to(x2.dtype)
    y = torch.ops.aten._weight_int4pack_mm(
        x2.to(torch.bfloat16).contiguous(), packed, module.weight_granularity.size, params
    )
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _int4_ok(module: nn.Module, x: torch.Tensor) -> bool:
    if not int4_groups(module):
        return False
    gran = module.weight_granularity
    n, k = module.weight_shape
    return (
        _on_gpu(module, x, "cuda-int4")
        and gran.size in INT4_GROUPS
        and k % gran.size == 0
        and inner_k_tiles(k) is not None
        and n % 8 == 0
        and x.dtype in (torch.float32, *HALF_INPUTS)
    )


register_kernel(
    "linear", "cuda-int4", layouts={"int4/group", "int4-asym/group", "int4-full/group"}, acts={"none"},
    devices={"cuda"}, priority=10, available=_int4_ok,
)(self_checked("cuda-int4", int4_rows))  # fmt: skip


# ---- 2:4 sparse (semi-structured) --------------------------------------------------------------


def sparse24_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The dequantized 2:4 weight as a semi-structured sparse tensor in x's dtype, then F.linear."""
    from torch.sparse import to_sparse_semi_structured

    w = prepacked(
        module, f"cuda-2of4-{x.dtype}", lambda m: to_sparse_semi_structured(m.qweight.dequantize(x.dtype).contiguous())
    )
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.linear(x, w, bias)


def _sparse_ok(module: nn.Module, x: torch.Tensor) -> bool:
    """Any 2:4 layout (the values are dequantized, so their format does not matter)."""
    n, k = module.weight_shape[0], module.weight_shape[-1]
    return (
        _on_gpu(module, x, "cuda-2of4")
        and module.layout.endswith("+2:4")
        and len(module.weight_shape) == 2
        and module.input_smooth is None
        and x.dtype in HALF_INPUTS
        and n % 32 == 0
        and k % 64 == 0
    )


register_kernel(
    "linear", "cuda-2of4", acts={"none"}, devices={"cuda"}, priority=10, available=_sparse_ok,
)(self_checked("cuda-2of4", sparse24_rows))  # fmt: skip
