"""lowbit weights as llama.cpp (ggml) quantized blocks.

Lossless where the grids agree: per-element scales (and zero points) constant over each block
of 32 inputs (groups of 32, 64, 128..., per-channel or per-tensor) map onto

  symmetric int1..4           -> Q4_0  value = d * (nibble - 8),  nibble = q + 8
  symmetric int5..6, scale constant over 256 inputs -> Q6_K  value = d * 1 * (q6 - 32)
  symmetric int5..8           -> Q8_0  value = d * q
  asymmetric int1..4, scale constant over 256 inputs, integer zero
                              -> Q4_K  value = (d * 1) * c - (d * 1) * zero   (exact)
  asymmetric int1..4          -> Q4_1  value = d * c + m,         m = -scale * zero
  asymmetric int5..8, integer zero, |c - zero| in int8 -> Q8_0  value = d * (c - zero)
  binary, ternary             -> Q4_0  value = d * level
  log2-b                      -> Q8_0  value = (d / 2^k) * (2^k level), an integer for k = 2^(b-1) - 2

with d = the lowbit scale rounded to f16 (exact for fp16 scales, which the presets use; fp32
scales move each weight by at most 2^-11 of its value). Q4_1's minimum m is rounded to f16 too
(at most 2^-11 |m| <= 0.0073 scale): the one near-exact case, measured by the exporter.
Everything else is re-quantized from lowbit's dequantized weight (Q8_0, Q6_K, Q4_K) or
written as F16. The bit layouts follow ggml's block structs; ``gguf.quants`` decodes them
independently in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from ..formats import Codebook, Float, Int, NormalFloat
from ..primitives import FP16_MAX, FP16_NORMAL_MIN, QParams, channel_rows, quantize
from ..tensor import QTensor

BLOCK = 32
SUPER = 256  # K-quant super-block
REQUANT_TARGETS = ("f16", "f32", "q8_0", "q6_k", "q4_k")


@dataclass
class Encoded:
    """One tensor in ggml form: ``data`` is uint8 [rows, bytes per row] for quantized types,
    f16/bf16/f32 [rows, cols] otherwise; ``note`` says why it is not lossless (empty if it is)."""

    qtype: T
    data: np.ndarray
    note: str = ""

    @property
    def lossless(self) -> bool:
        return not self.note


@dataclass
class Grid:
    """Integer codes and per-32-block parameters of a weight whose grid fits a ggml type."""

    qtype: T
    q: torch.Tensor  # int16 [rows, cols]: stored unsigned value (Q4_0/Q4_1/Q4_K/Q6_K) or int8 value (Q8_0)
    d: torch.Tensor  # float32 [rows, cols // 32]: the scale
    m: torch.Tensor | None = None  # float32 [rows, cols // 32]: the minimum (Q4_1 only)
    z: torch.Tensor | None = None  # float32 [rows, cols // 32]: the integer zero point (Q4_K only)

    def permute_rows(self, order: torch.Tensor) -> Grid:
        pick = lambda t: None if t is None else t[order]  # noqa: E731
        return Grid(self.qtype, self.q[order], self.d[order], pick(self.m), pick(self.z))

    def scale_rows(self, factor: torch.Tensor) -> Grid:
        """Multiply output row r by factor[r] (folds a following layer's input divisor)."""
        f = factor.float().reshape(-1, 1)
        return Grid(self.qtype, self.q, self.d * f, None if self.m is None else self.m * f, self.z)

    def fits_f16(self) -> bool:
        """Whether every scale (and minimum) stays finite and normal when stored as f16."""
        parts = [self.d] + ([self.m] if self.m is not None else [])
        return all(bool(((t == 0) | (t.abs() >= FP16_NORMAL_MIN) & (t.abs() <= FP16_MAX)).all()) for t in parts)


def _per_block(t: torch.Tensor, rows: int, cols: int, block: int = BLOCK) -> torch.Tensor | None:
    """[rows, cols] per-element parameter -> [rows, cols // block] if constant over every block."""
    blocks = t.reshape(rows, cols // block, block)
    first = blocks[..., 0]
    return first if bool((blocks == first.unsqueeze(-1)).all()) else None


def _super_constant(d: torch.Tensor) -> bool:
    """Whether per-32 scales [rows, cols // 32] are constant over each 256-input super-block."""
    rows, nb = d.shape
    return nb % (SUPER // BLOCK) == 0 and _per_block(d, rows, nb, SUPER // BLOCK) is not None


def _integer_levels(fmt) -> int | None:
    """k such that every level of ``fmt`` times k is an integer in int8 (1 for Int formats;
    a power of two for binary, ternary and log2 tables), or None."""
    if isinstance(fmt, Int):
        return 1
    if isinstance(fmt, (Float, Codebook, NormalFloat)):
        return None
    levels = fmt.levels().double()
    for k in (1, 2, 4, 8, 16, 32, 64, 128):
        scaled = levels * k
        if bool((scaled == scaled.round()).all()) and float(scaled.abs().max()) <= 127:
            return k
    return None


def _symmetric(q: torch.Tensor, d: torch.Tensor) -> Grid:
    """Signed integer values q (any range within int8) with per-block scales d."""
    lo, hi = int(q.min()), int(q.max())
    if lo >= -8 and hi <= 7:
        return Grid(T.Q4_0, q + 8, d)
    if lo >= -32 and hi <= 31 and _super_constant(d):
        return Grid(T.Q6_K, q + 32, d)
    return Grid(T.Q8_0, q, d)


def grid_of(qt: QTensor) -> tuple[Grid | None, str]:
    """The lossless ggml grid of a 2-D integer QTensor, or (None, why not)."""
    fmt, shape = qt.fmt, qt.shape
    if len(shape) != 2:
        return None, f"{len(shape)}-D weight"
    rows, cols = shape
    if cols % BLOCK:
        return None, f"{cols} inputs are not a multiple of {BLOCK}"
    multiplier = _integer_levels(fmt)
    if multiplier is None:
        return None, f"{fmt.name} has no ggml grid"
    scale = _per_block(qt.granularity.expand(qt.scale.float(), shape).expand(rows, cols), rows, cols)
    if scale is None:
        return None, f"{qt.granularity.name} scales change inside blocks of {BLOCK}"
    codes = qt.codes().to(torch.int16)
    keep = qt.keep_mask()
    if not isinstance(fmt, Int):  # level table with integer multiples: value = (scale / k) * (k * level)
        q = torch.round(fmt.levels()[codes.long()] * multiplier).to(torch.int16)
        if keep is not None:
            q = torch.where(keep, q, torch.zeros_like(q))
        return _symmetric(q, scale / multiplier), ""
    if fmt.symmetric:
        q = codes + fmt.qmin
        if keep is not None:
            q = torch.where(keep, q, torch.zeros_like(q))
        return _symmetric(q, scale), ""
    zero_el = qt.granularity.expand(qt.zero_point.float(), shape).expand(rows, cols)
    zero = _per_block(zero_el, rows, cols)
    if zero is None:
        return None, f"{qt.granularity.name} zero points change inside blocks of {BLOCK}"
    integral = bool((zero == zero.round()).all())
    if keep is not None:
        if not integral:
            return None, "pruned weights with fractional zero points"
        codes = torch.where(keep, codes, zero_el.to(torch.int16))
    if fmt.bits <= 4:
        if integral and _super_constant(scale):
            return Grid(T.Q4_K, codes, scale, z=zero), ""
        return Grid(T.Q4_1, codes, scale, -scale * zero), ""
    if not integral:
        return None, f"{fmt.name} with fractional zero points has no ggml grid"
    q = codes - zero_el.to(torch.int16)
    if int(q.min()) < -128 or int(q.max()) > 127:
        return None, f"{fmt.name}: code - zero leaves int8"
    return _symmetric(q, scale), ""


# -- packing ---------------------------------------------------------------------------------------
def _f16_bytes(x: torch.Tensor | np.ndarray) -> np.ndarray:
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return x.astype(np.float32).astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] values 0..15 -> [n, 16] bytes: element j in the low nibble, j + 16 in the high."""
    q = q.astype(np.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _pack_legacy(grid: Grid) -> np.ndarray:
    """Q8_0 / Q4_0 / Q4_1 blocks of 32: [d, (m), quants] per block."""
    rows, cols = grid.q.shape
    q = grid.q.reshape(rows * (cols // BLOCK), BLOCK).numpy()
    d = _f16_bytes(grid.d.reshape(-1))
    if grid.qtype == T.Q8_0:
        return np.concatenate([d, q.astype(np.int8).view(np.uint8)], axis=1)
    if grid.qtype == T.Q4_0:
        return np.concatenate([d, _nibbles(q)], axis=1)
    return np.concatenate([d, _f16_bytes(grid.m.reshape(-1)), _nibbles(q)], axis=1)


def _pack_k_exact(grid: Grid) -> np.ndarray:
    """Q6_K / Q4_K with one scale per super-block: super-block d = the lowbit scale, every
    sub-block scale 1 (and for Q4_K dmin = d, sub-block minimum = the integer zero point)."""
    rows, cols = grid.q.shape
    n = rows * cols // SUPER
    q = grid.q.reshape(n, SUPER).numpy()
    d = grid.d.reshape(n, SUPER // BLOCK)[:, 0].numpy()
    if grid.qtype == T.Q6_K:
        return _pack_q6_k(q, np.ones((n, 16), np.int8), d)
    ones = np.ones((n, 8), np.uint8)
    return _pack_q4_k(q, ones, grid.z.reshape(n, 8).numpy(), d, d)


PACKERS = {
    T.Q8_0: _pack_legacy,
    T.Q4_0: _pack_legacy,
    T.Q4_1: _pack_legacy,
    T.Q6_K: _pack_k_exact,
    T.Q4_K: _pack_k_exact,
}


def pack(grid: Grid) -> Encoded:
    """Bytes [rows, bytes per row] of a lossless grid in its ggml type."""
    rows = grid.q.shape[0]
    return Encoded(grid.qtype, PACKERS[grid.qtype](grid).reshape(rows, -1))


def _pack_q6_k(q: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K super-blocks: q [n, 256] in 0..63, int8 scales [n, 16], f16 d [n]."""
    n = q.shape[0]
    q = q.astype(np.uint8).reshape(n, 2, 4, 32)  # [half, quarter, j]
    low, high = q & 0x0F, q >> 4
    ql = (low[:, :, :2] | (low[:, :, 2:] << 4)).reshape(n, 128)
    qh = sum(high[:, :, r] << (2 * r) for r in range(4)).astype(np.uint8).reshape(n, 64)
    return np.concatenate([ql, qh, scales.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


def _pack_q4_k(q: np.ndarray, sc: np.ndarray, mn: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """Q4_K super-blocks: q [n, 256] in 0..15, 6-bit scales and mins [n, 8], f16 d, dmin [n]."""
    n = q.shape[0]
    q = q.astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    packed = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qs], axis=1)


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _q6_k(w: torch.Tensor) -> np.ndarray:
    """Round-to-nearest Q6_K with lowbit's primitives: int6 (full range) per 16, int8 sub-scales."""
    rows = w.shape[0]
    x = w.reshape(-1, 16)
    fmt = Int(6, symmetric=True, full_range=True)
    s = torch.maximum(x.amax(dim=1).clamp(min=0) / fmt.qmax, x.amin(dim=1).clamp(max=0) / fmt.qmin)
    s = s.reshape(-1, 16)  # [super-blocks, 16 sub-scales]
    d = _f16(s.amax(dim=1) / 127)
    sc = torch.where(d[:, None] > 0, torch.round(s / d[:, None].clamp(min=1e-30)), torch.zeros_like(s)).clamp(0, 127)
    real = (d[:, None] * sc).reshape(-1, 1)
    codes = quantize(x, fmt, QParams(scale=torch.where(real > 0, real, torch.ones_like(real))), channel_rows())
    codes = torch.where(real > 0, codes, torch.full_like(codes, -fmt.qmin))  # all-zero sub-block -> 0
    out = _pack_q6_k(codes.reshape(-1, SUPER).numpy(), sc.numpy(), d.numpy())
    return out.reshape(rows, -1)


def _q4_k(w: torch.Tensor) -> np.ndarray:
    """Round-to-nearest Q4_K: asymmetric int4 per 32 (min <= 0), 6-bit scales and mins."""
    rows = w.shape[0]
    x = w.reshape(-1, BLOCK)
    lo, hi = x.amin(dim=1).clamp(max=0), x.amax(dim=1).clamp(min=0)
    s, mins = ((hi - lo) / 15).reshape(-1, 8), (-lo).reshape(-1, 8)
    d, dmin = _f16(s.amax(dim=1) / 63), _f16(mins.amax(dim=1) / 63)
    sc = torch.round(s / d[:, None].clamp(min=1e-30)).clamp(0, 63)
    mn = torch.round(mins / dmin[:, None].clamp(min=1e-30)).clamp(0, 63)
    real_s, real_m = (d[:, None] * sc).reshape(-1, 1), (dmin[:, None] * mn).reshape(-1, 1)
    safe = torch.where(real_s > 0, real_s, torch.ones_like(real_s))
    codes = quantize(x, Int(4, symmetric=False), QParams(scale=safe, zero_point=real_m / safe), channel_rows())
    out = _pack_q4_k(codes.reshape(-1, SUPER).numpy(), sc.numpy(), mn.numpy(), d.numpy(), dmin.numpy())
    return out.reshape(rows, -1)


def requantize(weight: torch.Tensor, target: str, why: str) -> Encoded:
    """Re-quantize a float weight [rows, cols] to ``target`` (one of REQUANT_TARGETS); K-quants
    need cols % 256 == 0 and fall back to Q8_0, Q8_0 needs cols % 32 == 0 and falls back to F16."""
    w = weight.detach().float()
    cols = w.shape[-1]
    if w.dim() == 2 and cols % SUPER == 0 and target in ("q6_k", "q4_k"):
        data = _q6_k(w) if target == "q6_k" else _q4_k(w)
        return Encoded(T.Q6_K if target == "q6_k" else T.Q4_K, data, f"{why}; re-quantized to {target.upper()}")
    if w.dim() == 2 and cols % BLOCK == 0 and target in ("q8_0", "q6_k", "q4_k"):
        return Encoded(T.Q8_0, quants.quantize(w.numpy(), T.Q8_0), f"{why}; re-quantized to Q8_0")
    enc = float_tensor(w, "f32" if target == "f32" else "f16")
    return Encoded(enc.qtype, enc.data, f"{why}; written as {enc.qtype.name}")


def float_tensor(t: torch.Tensor, target: str = "f16") -> Encoded:
    """A float tensor as F16, F32 or BF16 (``target``): the 'no ggml grid' case."""
    t = t.detach()
    if target == "bf16":
        raw = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
        return Encoded(T.BF16, raw.reshape(*t.shape[:-1], -1))
    if target == "f32":
        return Encoded(T.F32, t.float().numpy())
    return Encoded(T.F16, t.float().numpy().astype(np.float16))


def decode(enc: Encoded) -> np.ndarray:
    """float32 values of an encoded tensor (gguf.quants' reference decoder)."""
    if enc.qtype in (T.F16, T.F32):
        return enc.data.astype(np.float32)
    return quants.dequantize(enc.data, enc.qtype)
