"""Weight layouts for the native weight-only kernels (``csrc/weightonly.cpp``), built once per module.

A ``BlockPlan`` says how a module's format maps onto the kernel's 64-byte blocks (block bits,
level table or integer codes, zero point); ``pack_blocks`` arranges the codes so that one
block holds 16 output rows (one per 32-bit lane) times ``span`` inputs, ordered so the kernel
widens them to int16 (input 2s, input 2s+1) pairs with a shift and a mask. 4-bit integer codes
use ``pack_nibbles`` instead: bytes that vpdpbusd multiplies four inputs at a time.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from dataclasses import dataclass

import torch

from ..formats import Binary, Format, Int, Log2, NormalFloat, Ternary
from ..granularity import Granularity, PerChannel, PerGroup, PerTensor

ROWS = 16  # output rows per block
X_MAX = 32767  # int16 activations
ACC_MAX = 2**31 - 1
TABLE_BITS = 11  # level tables scaled by at most 2^11: int32 sums flushed every 32 inputs
SEGMENT = 128  # inputs per activation scale (one int16 scale per token and segment)


def span_of(bits: int) -> int:
    """Inputs per block of 16 rows (64 bytes; 192 for 3-bit bit planes)."""
    return {8: 4, 3: 32}.get(bits, 32 // bits)


@dataclass(frozen=True)
class BlockPlan:
    """How a weight format runs on the block kernel."""

    bits: int  # block bits: 1, 2, 3, 4 or 8 (5- to 7-bit integer codes ride in 8-bit blocks)
    offset: int  # stored code = code - offset (8-bit blocks are signed)
    zero_const: int  # constant zero point when the format has none per group (symmetric Int, ternary)
    table: tuple[int, ...] | None  # int16 levels * 2^exp, for level-table formats
    exp: int  # table scale exponent: the output is multiplied by 2^-exp
    max_value: int  # largest |decoded value|: bounds the int32 partial sums

    @property
    def span(self) -> int:
        return span_of(self.bits)

    def segment(self, group: int, k: int) -> int:
        """Inputs per activation scale: at most SEGMENT, few enough that int32 partial sums cannot
        overflow, a multiple of the span, and a divisor of the group (unless one group spans K)."""
        limit = min(SEGMENT, ACC_MAX // (X_MAX * max(1, self.max_value)))
        limit = max(self.span, limit // self.span * self.span)
        if group >= k:
            return limit
        return next(s for s in range(limit, 0, -self.span) if group % s == 0)


def _table(levels: torch.Tensor) -> tuple[tuple[int, ...], int, int]:
    """Levels as int16 * 2^exp: exact when a small exp allows, else exp = TABLE_BITS."""
    levels = levels.double()
    exp = next((e for e in range(TABLE_BITS + 1) if torch.equal(levels * 2**e, torch.round(levels * 2**e))), TABLE_BITS)
    ints = torch.round(levels * 2**exp).long()
    padded = ints.tolist() + [0] * (32 - ints.numel())
    return tuple(padded), exp, int(ints.abs().max())


def block_bits(fmt: Format) -> int | None:
    """Block bits the kernel runs ``fmt`` with (1, 2, 3, 4 or 8), None when unsupported. Pure Python
    (no tensor work), so availability checks stay cheap and traceable."""
    if isinstance(fmt, Int):
        return fmt.bits if fmt.bits <= 4 else 8
    if isinstance(fmt, Ternary):
        return 2
    if isinstance(fmt, (NormalFloat, Log2, Binary)) and fmt.bits <= 4:
        return fmt.bits
    return None


def group_size(gran: Granularity, shape: torch.Size, bits: int) -> int | None:
    """Inputs per scale group (the padded row for per-channel/per-tensor); None when the kernel
    cannot run this granularity (groups not a multiple of the block span, channels on axis 1)."""
    if len(shape) != 2:
        return None
    span = span_of(bits)
    if isinstance(gran, PerGroup):
        return gran.size if gran.size % span == 0 else None
    if isinstance(gran, PerTensor) or (isinstance(gran, PerChannel) and gran.axis in (0, -2)):
        return math.ceil(shape[1] / span) * span
    return None


def plan_for(fmt: Format) -> BlockPlan:
    """The block plan for a format that ``block_bits`` accepts."""
    bits = block_bits(fmt)
    if isinstance(fmt, Int):
        offset = 0
        if bits == 8:
            offset = -fmt.qmin if fmt.symmetric else (128 if fmt.bits == 8 else 0)
        zero = -fmt.qmin - offset if fmt.symmetric else 0
        return BlockPlan(bits, offset, zero, None, 0, max(abs(fmt.qmax - fmt.qmin - offset), abs(offset)))
    if isinstance(fmt, Ternary):  # codes 0, 1, 2 stand for -1, 0, 1: an integer code with zero point 1
        return BlockPlan(bits, 0, 1, None, 0, 2)
    table, exp, top = _table(fmt.levels())
    return BlockPlan(bits, 0, 0, table, exp, top)


def pack_blocks(codes: torch.Tensor, bits: int, offset: int = 0) -> torch.Tensor:
    """Codes [N, K] (uint8) -> blocks [ceil(N/16), ceil(K/span), block bytes] (see csrc/weightonly.cpp)."""
    if bits == 3:  # bit planes: two 2-bit vectors (low bits) then one 1-bit vector (high bit) per 32 inputs
        padded = torch.zeros(codes.shape[0], math.ceil(codes.shape[1] / 32) * 32, dtype=torch.uint8)
        padded[:, : codes.shape[1]] = codes
        low, high = pack_blocks(padded & 3, 2), pack_blocks(padded >> 2, 1)
        return torch.cat([low.view(low.shape[0], -1, 128), high], dim=2)
    n, k = codes.shape
    span = span_of(bits)
    nb, kb = math.ceil(n / ROWS), math.ceil(k / span)
    out = torch.empty(nb, kb, 64, dtype=torch.uint8)
    step = max(1, (1 << 22) // max(1, kb * span * ROWS))  # bound the int32 scratch to ~16 MB
    shifts = (torch.arange(span // 2, dtype=torch.int32) * bits).view(1, 1, 1, -1, 1)
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        rows = codes[b0 * ROWS : b1 * ROWS]
        c = torch.zeros((b1 - b0) * ROWS, kb * span, dtype=torch.int32)
        c[: rows.shape[0], :k] = rows.to(torch.int32) - offset
        c = c.view(b1 - b0, ROWS, kb, span // 2, 2)  # [block, row, k-block, pair s, half h]: input 2s+h
        if bits == 8:  # lane bytes: (h0 s0, h0 s1, h1 s0, h1 s1)
            lanes = c.permute(0, 2, 1, 4, 3) & 0xFF
        else:  # 16-bit word h keeps input 2s+h at bits [bits*s, bits*s+bits)
            words = (c << shifts).sum(dim=3).permute(0, 2, 1, 3)  # [block, k-block, row, h]
            lanes = torch.stack([words & 0xFF, words >> 8], dim=-1)
        out[b0:b1] = lanes.to(torch.uint8).reshape(b1 - b0, kb, 64)
    return out


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit integer codes [N, K] (uint8, 0..15) -> blocks [ceil(N/16), ceil(K/8), 64]: byte j of
    row r's 32-bit lane holds input k0+j in its low nibble and input k0+4+j in its high nibble, so
    one mask (or shift and mask) yields the unsigned bytes of four consecutive inputs per row."""
    n, k = codes.shape
    nb, kb = math.ceil(n / ROWS), math.ceil(k / 8)
    c = torch.zeros(nb * ROWS, kb * 8, dtype=torch.uint8)
    c[:n, :k] = codes
    c = c.view(nb, ROWS, kb, 2, 4)  # [block, row, k-block, nibble, byte]
    lanes = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # [block, row, k-block, byte]
    return lanes.permute(0, 2, 1, 3).contiguous().view(nb, kb, 64)


def dense_params(params: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """Per-(row, group) parameters [n, groups], or per row / per tensor broadcast to that shape."""
    full = params.reshape(-1, 1) if params.dim() < 2 else params
    return full.expand(n, groups) if full.shape[0] == 1 or full.shape[1] == 1 else full


def pack_params(params: torch.Tensor, n: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-(row, group) parameters [n, groups] (or per row / per tensor) -> [ceil(n/16), groups, 16]."""
    full = dense_params(params, n, groups)
    nb = math.ceil(n / ROWS)
    out = torch.zeros(nb * ROWS, groups, dtype=dtype)
    out[:n] = full.to(dtype)
    return out.view(nb, ROWS, groups).transpose(1, 2).contiguous()


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose whole 2 MB pages are advised for transparent huge pages (Linux).

    Streaming weights from DRAM runs 1.3-1.5x faster here without a TLB miss and a prefetcher
    restart at every 4 KB page. The copy is made before its pages are first touched so the OS
    can back them with 2 MB pages; the tail shorter than 2 MB stays on 4 KB pages (no waste).
    Returns ``t`` itself when that is not possible (other OS, under 2 MB, not contiguous)."""
    nbytes = t.numel() * t.element_size()
    madvise = _madvise()
    if madvise is None or nbytes < HUGE_PAGE or not t.is_contiguous():
        return t
    buf = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -buf.data_ptr() % HUGE_PAGE
    if madvise(buf.data_ptr() + start, nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE) != 0:
        return t
    out = buf[start : start + nbytes]
    out.copy_(t.reshape(-1).view(torch.uint8))
    return out.view(t.dtype).view(t.shape)
