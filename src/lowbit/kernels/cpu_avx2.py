"""Weight-only linear kernel for x86 CPUs with AVX2 + FMA but no AVX-512 (``csrc_avx2/``).

Integer weights of 1-8 bits, per group (a multiple of 32 inputs), per output channel or per tensor,
with any zero point (integer or fractional), and level-table formats of up to 16 levels (NF2-4,
Log2 2-4, binary, ternary: two in-register permutes per 8 codes): codes are decoded to fp32 in
registers and multiplied with the float activations, so the float weight never exists for a few
tokens (decode); from ``DEQUANT_FROM`` tokens on, the weight (a large one in slabs of rows) is
dequantized to fp32 and multiplied by at::mm. Codes of 1-4 bits are held as nibbles (two per
byte), 5-8 bits as bytes. One token with 1-4 bit integer codes (decode) instead quantizes the activation to int16 per
segment of the group and multiplies it with the nibble codes on vpmaddubsw (``int16_act``):
0.63-0.74 ms against 1.21-1.27 ms for the fp32 decoding at 4096 x 4096 w4-g128 from DRAM on a
Zen 3, at 87-96 dB SQNR to the reference (the activation's int16 rounding). Fewer than
``DEQUANT_FROM`` tokens with 5-8 bit codes do the same on vpmaddwd (codes held as code - 128 in
int8): 0.64-0.68 ms against 0.93 ms for the fp32 decoding at 4096 x 4096 w8 per channel from DRAM
on a Zen 3, at 91-94 dB. On AVX-512 machines the VNNI kernels (priority 10) run first; these
cover the other x86 CPUs (Zen 1-3, older Intel). ``cpu-avx2-w8a8`` runs W8A8 layers there (integer
codes x codes for few tokens, fake-quantized activations for many; see its docstring); on
AVX-512 machines it also takes the W8A8 layers the VNNI kernel refuses (e.g. per-tensor dynamic
activations), which would otherwise fall to the reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import Int, _LevelTable
from ..granularity import PerChannel, PerGroup, PerTensor, PerToken
from . import reference, register_kernel
from .build import load_avx2
from .cpu_weightonly import _int_names, _layouts, _packed
from .weightonly_pack import on_huge_pages

BLOCK = 32  # inputs per code block of the kernel
DEQUANT_FROM = 40  # tokens from which fp32 slabs + at::mm beat the register-decoding GEMV (measured on a Zen 3)
FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
LEVEL_TABLES = ["nf2", "nf3", "nf4", "log2-2", "log2-3", "log2-4", "binary", "ternary"]
LAYOUTS = _layouts(_int_names(range(1, 9)) + LEVEL_TABLES)  # per group / channel / tensor


@dataclass(frozen=True)
class Avx2Weight:
    """A layer's weight as the AVX2 kernel reads it: value = scale * (code - zero) per group."""

    codes: torch.Tensor  # uint8 [N, Kp] holding code - 128 as int8 (bits 8), or [N, Kp / 2] nibble blocks (bits 4)
    scale: torch.Tensor  # float32 [N, groups]
    zero: torch.Tensor  # float32 [N, groups], in code units (minus 128 for bits 8)
    bits: int  # 8 or 4: the storage width of one code
    group: int  # inputs per group, a multiple of 32
    n: int
    table: torch.Tensor | None = None  # float32 [16]: value = scale * table[code] (level-table formats)


def _padded(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def nibble_blocks(codes: torch.Tensor) -> torch.Tensor:
    """[N, Kp] codes < 16 -> [N, Kp / 2] bytes: in each block of 32, byte j = code j | code (j + 16) << 4."""
    n, kp = codes.shape
    blocks = codes.reshape(n, kp // BLOCK, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()


def build_weight(module: nn.Module) -> Avx2Weight:
    """The kernel's layout of ``module``'s weight (built once per module, see ``prepacked``)."""
    fmt = module.weight_format
    gran = module.weight_granularity
    n, k = module.weight_shape
    kp = _padded(k)
    codes = module.qweight.codes().reshape(n, k)
    if kp != k:
        codes = torch.nn.functional.pad(codes, (0, kp - k))
    group = gran.size if isinstance(gran, PerGroup) else kp
    groups = -(-kp // group)
    rows, cols = (1 if isinstance(gran, PerTensor) else n), (groups if isinstance(gran, PerGroup) else 1)
    scale = module.scale.float().reshape(rows, cols).expand(n, groups)
    table = None
    if isinstance(fmt, _LevelTable):
        levels = fmt.levels().float()
        table = torch.cat([levels, levels.new_zeros(16 - len(levels))])
        zero = torch.zeros(n, groups)
    elif module.zero_point is not None:
        zero = module.zero_point.float().reshape(rows, cols).expand(n, groups)
    else:
        zero = torch.full((n, groups), float(-fmt.qmin))
    bits = 8 if fmt.bits > 4 else 4
    if bits == 8:  # signed bytes for the kernel's int8 loads: code - 128 against zero - 128 (the same values)
        stored = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8).contiguous()
        zero = zero - 128.0
    else:
        stored = nibble_blocks(codes)
    return Avx2Weight(on_huge_pages(stored), scale.contiguous(), zero.contiguous(), bits, group, n, table)


def weight_supported(module: nn.Module) -> bool:
    """Integer weights of a 2-D linear layer in a grouping the kernel reads (fixed per module)."""
    ok = module.__dict__.get("_cpu_avx2_ok")
    if ok is None:
        fmt, gran = module.weight_format, module.weight_granularity
        ok = (
            module.op == "linear"
            and len(module.weight_shape) == 2
            and (isinstance(fmt, Int) or (isinstance(fmt, _LevelTable) and fmt.bits <= 4))
            and module.scale is not None
            and (
                (isinstance(gran, PerGroup) and gran.size % BLOCK == 0)
                or (isinstance(gran, PerChannel) and gran.axis in (0, -2))
                or isinstance(gran, PerTensor)
            )
        )
        module.__dict__["_cpu_avx2_ok"] = ok
    return ok


@functools.cache
def _ready() -> bool:
    """The AVX2 library loaded, with the op's fake implementation registered (for torch.compile)."""
    if not load_avx2():
        return False

    @torch.library.register_fake("lowbit_avx2::wo_linear")
    def _linear_fake(x, codes, scale, zero, bits, group, n, dequant_from, int16_act, table):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("lowbit_avx2::w8a8_linear_int")
    def _linear_int_fake(x, smooth, x_scale, x_zero_point, qmin, qmax, codes, scale, zero, group, n):
        return x.new_empty(x.shape[0], n), x.new_empty((), dtype=torch.bool)

    @torch.library.register_fake("lowbit_avx2::w8a8_fake_quant")
    def _fake_quant_fake(x, smooth, x_scale, x_zero_point, qmin, qmax):
        return x.new_empty(x.shape), x.new_empty((), dtype=torch.bool)

    return True


@torch.compiler.assume_constant_result
def _ready_traced() -> bool:
    return _ready()


def _available(module: nn.Module, x: torch.Tensor) -> bool:
    ready = _ready_traced() if torch.compiler.is_compiling() else _ready()
    return ready and x.dtype in FLOAT_INPUTS and weight_supported(module)


def _linear(module: nn.Module, x: torch.Tensor, x2: torch.Tensor, dequant_from: int, int16_act: bool) -> torch.Tensor:
    w: Avx2Weight = _packed(module, "cpu-avx2", build_weight)
    y = torch.ops.lowbit_avx2.wo_linear(x2.float().contiguous(), w.codes, w.scale, w.zero, w.bits, w.group, w.n,
                                        dequant_from, int16_act, w.table)  # fmt: skip
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], w.n)


@register_kernel("linear", "cpu-avx2", layouts=LAYOUTS, acts={"none"}, devices={"cpu"}, priority=8,
                 available=_available)  # fmt: skip
def avx2_linear(
    module: nn.Module, x: torch.Tensor, dequant_from: int = DEQUANT_FROM, int16_act: bool = True
) -> torch.Tensor:
    """y = x W^T + b over the last dimension of ``x`` (any leading shape), fp32 inside; one token with
    1-4 bit codes goes through int16 activations x codes on vpmaddubsw unless ``int16_act`` is False."""
    x2 = x.reshape(-1, x.shape[-1])
    if module.input_smooth is not None:
        x2 = x2.float() / module.input_smooth.float()
    return _linear(module, x, x2, dequant_from, int16_act)


def native_activation(module: nn.Module) -> bool:
    """Activations the native fake-quantizer reproduces: dynamic symmetric integers per token (min-max),
    or static integers per tensor with an integer zero point; other specs take the reference's path."""
    spec = module.activation
    fmt, gran = spec.format, spec.resolved_granularity
    if not isinstance(fmt, Int):
        return False
    if spec.mode == "dynamic":
        return fmt.qmin == -fmt.qmax and isinstance(gran, PerToken) and spec.range.name in ("minmax", "moving_minmax")
    zero = module.input_zero_point
    return (
        spec.mode == "static"
        and isinstance(gran, PerTensor)
        and module.input_scale is not None
        and module.input_scale.numel() == 1
        and (zero is None or (zero.numel() == 1 and not zero.is_floating_point()))
    )


def quantized_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``reference.quantize_input`` of W8A8 rows [M, K], in one native pass where it applies (fp32
    rows, see ``native_activation``): the same values bit for bit. Non-finite rows go to the
    reference, which names the problem."""
    if x.dtype != torch.float32 or not native_activation(module):
        return reference.quantize_input(x, module)
    fmt, static = module.activation.format, module.activation.mode == "static"
    out, finite = torch.ops.lowbit_avx2.w8a8_fake_quant(
        x,
        module.input_smooth,
        module.input_scale if static else None,
        module.input_zero_point if static else None,
        float(fmt.qmin),
        float(fmt.qmax),
    )
    if not torch.compiler.is_compiling() and not bool(finite):
        return reference.quantize_input(x, module)
    return out


@register_kernel("linear", "cpu-avx2-w8a8", layouts={"int8/channel"}, acts={"dynamic", "static"}, devices={"cpu"},
                 priority=7, available=_available)  # fmt: skip
def avx2_w8a8_linear(module: nn.Module, x: torch.Tensor, dequant_from: int = DEQUANT_FROM) -> torch.Tensor:
    """W8A8 on AVX2 CPUs: the reference's activation codes (dynamic per token or static, after
    SmoothQuant's divisor). Fewer than ``dequant_from`` tokens (decode) multiply those codes with the
    int8 weight codes in int32 on vpmaddwd (exact sums, one fp32 rescale: memory-bound, 0.69 ms at
    4096 x 4096 from DRAM on a Zen 3 against 3.16 ms for fp32 F.linear in the same run). More tokens get the codes
    dequantized in one native pass, times the int8 weight decoded by the AVX2 kernel and at::mm.

    Not an integer GEMM for many tokens: torch._int_mm (cpu-int8-portable) has no fast AVX2 path
    (2048 x 384 x 1536 took 2.9 s against 81 ms in fp32 on a Zen 3), and AVX2 has no int8 instruction
    that beats fp32 FMA by much (measured on a Zen 3: 32 int8 MACs per vpmaddubsw + vpmaddwd + vpaddd
    + vpsignb step at 1.16x the fp32 FMA rate, 16 per vpmaddwd + vpaddd at 0.68x), so prefill stays at
    about float speed with the reference's numbers (fp32 summation order aside)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] < dequant_from and x2.dtype == torch.float32 and native_activation(module):
        return _w8a8_few_tokens(module, x, x2)
    return _linear(module, x, quantized_input(module, x2), dequant_from, False)


def _w8a8_few_tokens(module: nn.Module, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Few tokens (decode): the activation codes times the weight codes in int32 on vpmaddwd, one
    rescale per segment; the same products as the reference, summed exactly. NaN/Inf rows go to
    the reference, which names the problem."""
    w: Avx2Weight = _packed(module, "cpu-avx2", build_weight)
    fmt, static = module.activation.format, module.activation.mode == "static"
    y, finite = torch.ops.lowbit_avx2.w8a8_linear_int(
        x2.contiguous(),
        module.input_smooth,
        module.input_scale if static else None,
        module.input_zero_point if static else None,
        float(fmt.qmin),
        float(fmt.qmax),
        w.codes,
        w.scale,
        w.zero,
        w.group,
        w.n,
    )
    if not torch.compiler.is_compiling() and not bool(finite):
        return _linear(module, x, reference.quantize_input(x2, module), DEQUANT_FROM, False)
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], w.n)
