"""Weight-only CPU kernels: float activations (fp32/bf16/fp16) x packed low-bit weights.

Native (``csrc/weightonly.cpp``, ``csrc/codebook.cpp``): one op call per layer. Few tokens run
an int16-VNNI GEMV that streams the packed codes once (integer and level-table formats) or a
table-gather (codebooks); from ``PREFILL_FROM`` tokens on, the weight is dequantized to bf16
and multiplied by oneDNN. Weights are rearranged once per module (``prepacked``). Portable
fallbacks on torch's own int8/int4 ops live in ``torch_weightonly.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..formats import Codebook, Int
from ..granularity import PerGroup, PerTensor
from . import native_available, prepacked, register_kernel
from .build import cpu_flags
from .weightonly_pack import (
    ROWS,
    BlockPlan,
    block_bits,
    dense_params,
    group_size,
    on_huge_pages,
    pack_blocks,
    pack_nibbles,
    pack_params,
    plan_for,
)


def _prefill_from() -> int:
    """Tokens from which dequantize-to-bf16 + oneDNN matmul beats the integer GEMV.

    16 on an AMD Zen 4 (bench/kernels_weightonly.py). On an Intel Xeon with AMX the GEMV wins up to
    about 96 rows at every shape measured (384x1536 ... 4096x4096, w8 and w4-g128; 4096x4096 w8 at 32
    rows: GEMV 2.36 ms, dequantize + matmul 5.74 ms); there the dequantize + matmul path costs about
    0.25-0.4 ms per MiniLM-sized layer and 5.6 ms at 4096x4096 even for 8 rows. MiniLM w8-weight,
    1 x 32 tokens, eager: 10.6 ms with 16, 5.6 ms with 96 (fp32: 6.6-8 ms). AMX marks such Xeons
    (Sapphire Rapids and later); other CPUs keep the measured 16."""
    return 96 if "amx_bf16" in cpu_flags() else 16


PREFILL_FROM = _prefill_from()
CODEBOOK_PREFILL_FROM = 16  # the codebook table-gather kept at the Zen 4 figure (not measured on a Xeon)
FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
GRANULARITIES = ("group", "channel", "tensor")
VQ_CHUNK = 16  # sub-vectors per pass of csrc/codebook.cpp


def _layouts(names: list[str]) -> set[str]:
    return {f"{name}/{gran}" for name in names for gran in GRANULARITIES}


def _int_names(bits: range) -> list[str]:
    return [
        Int(b, symmetric, full).name
        for b in bits
        for symmetric in (True, False)
        for full in (False, True)
        if not (symmetric and b == 1 and not full) and not (full and not symmetric)
    ]


W4_LAYOUTS = _layouts(_int_names(range(4, 5)))
W3_LAYOUTS = _layouts(_int_names(range(3, 4)))
W8_LAYOUTS = _layouts(_int_names(range(5, 9)))
W2_LAYOUTS = _layouts([*_int_names(range(1, 3)), "ternary"])
LUT_LAYOUTS = _layouts(["nf2", "nf3", "nf4", "log2-2", "log2-3", "log2-4", "binary"])
VQ_LAYOUTS = _layouts([f"vq{2**e}x{d}" for e in range(1, 9) for d in range(1, 17)])


@dataclass(frozen=True)
class Blocks:
    """A module's weight in the block layout, plus the op's constant arguments."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    table: torch.Tensor | None
    bits: int
    n: int
    group: int
    zero_const: int
    segment: int
    out_mul: float
    zero_frac: torch.Tensor | None = None  # [groups, n] float32: scale * fractional part of float zero points


@functools.cache
def _register_fakes() -> None:
    """Shape-only implementations of the native ops, so torch.compile can trace models using them."""

    @torch.library.register_fake("lowbit::wo_linear")
    def _(x, codes, scales, zeros, table, bias, smooth, bits, n, group, zero_const, segment, out_mul, prefill_from):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("lowbit::vq_linear")
    def _(x, codes, codebook, per_book, n, bias, smooth, prefill_from):
        return x.new_empty(x.shape[0], n)


@functools.cache
def _native() -> bool:
    """Native library loaded, with the ops' fake implementations registered."""
    if not native_available():
        return False
    _register_fakes()
    return True


@torch.compiler.assume_constant_result
def _native_traced() -> bool:
    return _native()


def _ops_ready() -> bool:
    """``_native()``: cached in eager mode, a constant to torch.compile."""
    return _native_traced() if torch.compiler.is_compiling() else _native()


def _build_blocks(module: nn.Module) -> Blocks:
    qt = module.qweight
    plan = plan_for(qt.fmt)
    n, k = qt.shape
    gk = group_size(qt.granularity, qt.shape, plan.bits)
    groups = math.ceil(k / gk)
    scale_dtype = torch.float16 if qt.scale.dtype == torch.float16 else torch.float32
    scales = on_huge_pages(pack_params(qt.scale, n, groups, scale_dtype))
    zeros = zero_frac = None
    if qt.zero_point is not None:
        zdtype = torch.int8 if plan.bits == 8 else torch.uint8
        whole = qt.zero_point
        if whole.is_floating_point():  # HQQ: the kernel takes floor(z); the fraction is corrected after
            whole = torch.floor(qt.zero_point.float())
            fraction = qt.scale.float() * (qt.zero_point.float() - whole)
            zero_frac = dense_params(fraction.float(), n, groups).t().contiguous()
        zeros = pack_params(whole.to(torch.int16) - plan.offset, n, groups, torch.int16).to(zdtype)
    table = None if plan.table is None else torch.tensor(plan.table, dtype=torch.int16)
    return Blocks(
        on_huge_pages(pack_codes(qt.codes().reshape(n, k), plan)),
        scales,
        zeros,
        table,
        plan.bits,
        n,
        gk,
        plan.zero_const,
        plan.segment(gk, k),
        2.0**-plan.exp,
        zero_frac,
    )


def pack_codes(codes: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """The kernel's code blocks: nibble bytes for 4-bit integer codes (the vpdpbusd kernel),
    int16-pair blocks for every other plan."""
    if plan.bits == 4 and plan.table is None:
        return pack_nibbles(codes)
    return pack_blocks(codes, plan.bits, plan.offset)


def _fraction_correction(x2: torch.Tensor, smooth: torch.Tensor | None, p: Blocks) -> torch.Tensor:
    """sum over groups of (x / smooth) summed per group times scale * frac(zero): what the integer
    zero point floor(z) leaves out of x (q - z) s."""
    xs = x2.float() if smooth is None else x2.float() / smooth
    k = xs.shape[-1]
    pad = p.zero_frac.shape[0] * p.group - k
    sums = torch.nn.functional.pad(xs, (0, pad)).view(xs.shape[0], -1, p.group).sum(-1)
    return sums @ p.zero_frac


@torch.compiler.disable
def _packed_eager(module: nn.Module, key: str, build: Callable[[nn.Module], Any]) -> Any:
    return prepacked(module, key, build)


def _packed(module: nn.Module, key: str, build: Callable[[nn.Module], Any]) -> Any:
    """``prepacked``, traceable by torch.compile: a graph reads the layout built by an eager call
    (the codes' storage cannot change inside a compiled graph); the first call builds it eagerly."""
    if not torch.compiler.is_compiling():
        return prepacked(module, key, build)
    entry = module.__dict__.get("_kernel_cache", {}).get(key)
    return entry[1] if entry is not None else _packed_eager(module, key, build)


def _float_bias(module: nn.Module) -> torch.Tensor | None:
    bias = module.bias
    return None if bias is None else bias.float().contiguous()


def _common_ok(module: nn.Module, x: torch.Tensor) -> bool:
    return module.op == "linear" and x.dtype in FLOAT_INPUTS and x.dim() >= 1 and _ops_ready()


def _blocks_layout_ok(module: nn.Module) -> bool:
    """The module's format/granularity/shape run on the block kernel (fixed per module: cached on it)."""
    ok = module.__dict__.get("_cpu_blocks_ok")
    if ok is None:
        bits = block_bits(module.weight_format)
        ok = (
            bits is not None
            and group_size(module.weight_granularity, module.weight_shape, bits) is not None
            and module.scale is not None
        )
        module.__dict__["_cpu_blocks_ok"] = ok
    return ok


def _blocks_ok(module: nn.Module, x: torch.Tensor) -> bool:
    return _common_ok(module, x) and _blocks_layout_ok(module)


def _flat(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def _smooth(module: nn.Module) -> torch.Tensor | None:
    s = module.input_smooth
    return None if s is None else s.float().contiguous()


def blocks_linear(module: nn.Module, x: torch.Tensor, prefill_from: int = PREFILL_FROM) -> torch.Tensor:
    """Native weight-only linear for integer and level-table weights (any leading dims)."""
    p: Blocks = _packed(module, "cpu-blocks", _build_blocks)
    bias = _float_bias(module)
    x2, smooth = _flat(x), _smooth(module)
    y = torch.ops.lowbit.wo_linear.default(
        x2, p.codes, p.scales, p.zeros, p.table, bias, smooth,
        p.bits, p.n, p.group, p.zero_const, p.segment, p.out_mul, prefill_from,
    )  # fmt: skip
    if p.zero_frac is not None:
        y = (y.float() - _fraction_correction(x2, smooth, p)).to(y.dtype)
    return y.view(*x.shape[:-1], p.n)


for _name, _layouts_set in (("cpu-w4", W4_LAYOUTS), ("cpu-w3", W3_LAYOUTS), ("cpu-w8", W8_LAYOUTS),
                            ("cpu-w2", W2_LAYOUTS), ("cpu-lut", LUT_LAYOUTS)):  # fmt: skip
    register_kernel(
        "linear", _name, layouts=_layouts_set, acts={"none"}, devices={"cpu"}, priority=10, available=_blocks_ok
    )(blocks_linear)


# ---- codebooks ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CodebookPack:
    codes: torch.Tensor  # [ceil(n_sub/16), ceil(N/16), 16 sub-vectors, 16 rows] uint8
    codebook: torch.Tensor  # [books, entries, dim] float32
    per_book: int
    n: int


def _build_codebook(module: nn.Module) -> CodebookPack:
    qt = module.qweight
    fmt: Codebook = qt.fmt
    n = qt.shape[0]
    n_sub = math.ceil(math.prod(qt.shape[1:]) / fmt.dim)
    nb, nj = math.ceil(n / ROWS), math.ceil(n_sub / VQ_CHUNK)
    codes = torch.zeros(nb * ROWS, nj * VQ_CHUNK, dtype=torch.uint8)
    codes[:n, :n_sub] = qt.codes().reshape(n, n_sub)
    per = qt.granularity.size // fmt.dim if isinstance(qt.granularity, PerGroup) else n_sub
    packed = codes.view(nb, ROWS, nj, VQ_CHUNK).permute(2, 0, 3, 1).contiguous()  # [chunk, block, sub-vector, row]
    return CodebookPack(on_huge_pages(packed), qt.codebook.float().contiguous(), max(1, per), n)


def _codebook_ok(module: nn.Module, x: torch.Tensor) -> bool:
    fmt, gran = module.weight_format, module.weight_granularity
    return (
        _common_ok(module, x)
        and isinstance(fmt, Codebook)
        and fmt.entries <= 256
        and len(module.weight_shape) == 2
        and isinstance(gran, (PerTensor, PerGroup))
    )


@register_kernel(
    "linear", "cpu-vq", layouts=VQ_LAYOUTS,
    acts={"none"}, devices={"cpu"}, priority=10, available=_codebook_ok,
)  # fmt: skip
def codebook_linear(module: nn.Module, x: torch.Tensor, prefill_from: int = CODEBOOK_PREFILL_FROM) -> torch.Tensor:
    """Native codebook linear: per-call dot tables, then a gather-add per output row."""
    p: CodebookPack = _packed(module, "cpu-vq", _build_codebook)
    bias = _float_bias(module)
    smooth = _smooth(module)
    y = torch.ops.lowbit.vq_linear.default(_flat(x), p.codes, p.codebook, p.per_book, p.n, bias, smooth, prefill_from)
    return y.view(*x.shape[:-1], p.n)


from . import torch_weightonly  # noqa: E402, F401  (registers the portable fallbacks)
