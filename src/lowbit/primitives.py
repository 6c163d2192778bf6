"""THE numeric reference, plain torch: choose_qparams, quantize, dequantize, fake_quantize.

Every fast kernel and every algorithm is checked against these functions; nothing else
re-derives the arithmetic. Codes are uint8 (an Int code is stored as q - qmin so that it
is unsigned), fp16/bf16 "codes" are the cast tensor itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import NonFiniteError, SpecError
from .formats import Binary, Codebook, Float, Format, Int, Ternary
from .granularity import Granularity, PerChannel, PerGroup, PerTensor

FP16_NORMAL_MIN = 2.0**-14
FP16_MAX = 65504.0


@dataclass
class QParams:
    """Quantization parameters in compact (parameter) shape; which fields are set depends on
    the format: Int needs scale (+ zero_point if asymmetric), level-table and fp8 formats a
    scale, Codebook a codebook [n_codebooks, entries, dim], fp16/bf16 nothing."""

    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    codebook: torch.Tensor | None = None


def check_finite(
    x: torch.Tensor, name: str = "tensor", fix: str = "fix or drop the tensor (e.g. re-export the checkpoint)"
) -> None:
    """Raise NonFiniteError if ``x`` holds NaN or Inf; ``fix`` says what the user should do."""
    if x.is_floating_point() and x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"{name}: {bad} of {x.numel()} values are NaN or Inf; {fix} before quantizing")


def _check_granularity(fmt: Format, gran: Granularity) -> None:
    if isinstance(fmt, Codebook) and not isinstance(gran, (PerTensor, PerGroup)):
        raise SpecError(
            f"Codebook uses one codebook per tensor or per column group; {gran.name} is not "
            "supported (use PerTensor() or PerGroup(size))"
        )


def _matrix(shape: torch.Size) -> tuple[int, int]:
    """[rows, input] view used for sub-vectors: [shape[0], rest]; 0-D/1-D tensors are one row."""
    if len(shape) < 2:
        return 1, shape.numel()
    return shape[0], math.prod(shape[1:])


def subvectors(x: torch.Tensor, fmt: Codebook, gran: Granularity) -> list[torch.Tensor]:
    """Sub-vectors of ``dim`` consecutive input elements, one [rows, n_sub, dim] tensor per
    codebook (the whole tensor, or each column group of PerGroup). Rows are zero-padded to
    a multiple of ``dim``."""
    rows, cols = _matrix(x.shape)
    if isinstance(gran, PerGroup) and gran.size % fmt.dim:
        raise SpecError(f"Codebook dim={fmt.dim} must divide the group size {gran.size}")
    n_sub = -(-cols // fmt.dim)
    padded = torch.zeros(rows, n_sub * fmt.dim, dtype=torch.float32)
    padded[:, :cols] = x.detach().float().reshape(rows, cols)
    sub = padded.view(rows, n_sub, fmt.dim)
    per = gran.size // fmt.dim if isinstance(gran, PerGroup) else max(n_sub, 1)
    return [sub[:, i : i + per] for i in range(0, n_sub, per)] or [sub]


def assign_codes(parts: list[torch.Tensor], codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry (squared L2) for every sub-vector: [rows, n_sub]."""
    from .algorithms.codebook import nearest_center

    out = [
        nearest_center(part.reshape(-1, part.shape[-1]), book).view(part.shape[0], part.shape[1])
        for part, book in zip(parts, codebook.float())
    ]
    return torch.cat(out, dim=1).to(torch.uint8)


def _decode_codebook(
    codes: torch.Tensor, codebook: torch.Tensor, fmt: Codebook, gran: Granularity, shape: torch.Size
) -> torch.Tensor:
    rows, cols = _matrix(shape)
    codes = codes.reshape(rows, -1).long()
    per = gran.size // fmt.dim if isinstance(gran, PerGroup) else max(codes.shape[1], 1)
    book_index = (torch.arange(codes.shape[1]) // per).unsqueeze(0).expand_as(codes)
    values = codebook.float()[book_index, codes]  # [rows, n_sub, dim]
    return values.reshape(rows, -1)[:, :cols].reshape(shape)


def _round_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Store scales in ``scale_dtype``; fp16 falls back to fp32 when a scale leaves fp16's
    normal range, so codes are always computed with exactly the stored scale."""
    scale = scale.float()
    if scale_dtype == torch.float16:
        if scale.numel() and (scale.min() < FP16_NORMAL_MIN or scale.max() > FP16_MAX):
            return scale
        return scale.to(torch.float16)
    return scale.to(scale_dtype)


def qparams_from_range(
    fmt: Format, lo: torch.Tensor, hi: torch.Tensor, scale_dtype: torch.dtype = torch.float32
) -> QParams:
    """Map a clipping range [lo, hi] (per group) to scale and zero point for ``fmt``.

    Constant groups (lo == hi) get scale |c| so that the constant is represented exactly;
    all-zero groups get scale 1 (no division by zero)."""
    lo, hi = lo.float(), hi.float()
    const = lo == hi
    if isinstance(fmt, Int):
        if fmt.symmetric:
            scale = torch.maximum(hi.clamp(min=0) / fmt.qmax, lo.clamp(max=0) / fmt.qmin)
            scale = torch.where(const, lo.abs(), scale)
            scale = _round_scale(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
            return QParams(scale=scale)
        lo0, hi0 = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi0 - lo0) / (fmt.qmax - fmt.qmin)
        scale = torch.where(const, lo.abs(), scale)
        scale = _round_scale(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
        zero = torch.round(fmt.qmin - lo0 / scale.float()).clamp(fmt.qmin, fmt.qmax)
        zero = torch.where(const & (lo < 0), torch.full_like(zero, fmt.qmin + 1), zero)
        zero = torch.where(const & (lo >= 0), torch.full_like(zero, fmt.qmin), zero)
        return QParams(scale=scale, zero_point=zero.to(torch.uint8))
    absmax = torch.maximum(lo.abs(), hi.abs())
    if isinstance(fmt, Float):
        if not fmt.scaled:
            return QParams()
        scale = torch.where(const, absmax, absmax / fmt.max_value)
    else:
        scale = absmax
    return QParams(scale=_round_scale(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype))


def _minmax_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.amin(dim=1), rows.amax(dim=1)


def choose_qparams(
    x: torch.Tensor,
    fmt: Format,
    granularity: Granularity | None = None,
    estimator: Any = None,
    scale_dtype: torch.dtype = torch.float32,
    name: str = "tensor",
) -> QParams:
    """Choose parameters for quantizing ``x`` in ``fmt`` at ``granularity``.

    ``estimator`` (see ranges.py) picks the clipping range per group; min-max by default.
    Binary and Ternary fix their scale by rule (mean |w|, TWN); Codebook runs k-means."""
    gran = granularity or PerTensor()
    _check_granularity(fmt, gran)
    check_finite(x, name)
    x = x.detach().float()
    if isinstance(fmt, Codebook):
        from .algorithms.codebook import fit_codebooks

        return QParams(codebook=fit_codebooks(subvectors(x, fmt, gran), fmt))
    if isinstance(fmt, Float) and not fmt.scaled:
        return QParams()
    shape = gran.param_shape(x.shape)
    if x.numel() == 0:
        zero = torch.zeros(shape, dtype=torch.uint8) if fmt.needs_zero_point else None
        return QParams(scale=torch.ones(shape).to(scale_dtype), zero_point=zero)
    if isinstance(fmt, Binary):  # mean |w|; 0 for an all-zero group, which then decodes to exact zeros
        return QParams(scale=_round_scale(gran.reduce(x, lambda r: r.abs().mean(dim=1)), scale_dtype))
    if isinstance(fmt, Ternary):
        return QParams(scale=_round_scale(_ternary_scale(x, fmt, gran), scale_dtype))
    if estimator is None:
        lo, hi = gran.reduce(x, _minmax_rows)
    else:
        lo, hi = gran.reduce(x, lambda r: estimator(r, fmt, last_dim=x.shape[-1] if x.dim() else 1))
    return qparams_from_range(fmt, lo, hi, scale_dtype)


def _ternary_threshold(x: torch.Tensor, fmt: Ternary, gran: Granularity) -> torch.Tensor:
    """TWN threshold per element: ``fmt.threshold`` * mean |x| of the element's group."""
    mean_abs = gran.reduce(x, lambda r: r.abs().mean(dim=1))
    return gran.expand(fmt.threshold * mean_abs, x.shape)


def _ternary_scale(x: torch.Tensor, fmt: Ternary, gran: Granularity) -> torch.Tensor:
    kept = (x.abs() > _ternary_threshold(x, fmt, gran)).float()
    total = gran.reduce(x.abs() * kept, lambda r: r.sum(dim=1))
    count = gran.reduce(kept, lambda r: r.sum(dim=1))
    scale = total / count.clamp(min=1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _expanded(qp: QParams, fmt: Format, gran: Granularity, shape: torch.Size):
    scale = gran.expand(qp.scale.float(), shape) if qp.scale is not None else None
    zero = gran.expand(qp.zero_point.float(), shape) if qp.zero_point is not None else None
    return scale, zero


def _nearest_level(t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(t.contiguous(), mids)


def quantize(x: torch.Tensor, fmt: Format, qp: QParams, granularity: Granularity | None = None) -> torch.Tensor:
    """Codes for ``x``: uint8 of x's shape (Codebook: [rows, sub-vectors]; fp16/bf16: cast)."""
    gran = granularity or PerTensor()
    x = x.detach().float()
    if isinstance(fmt, Codebook):
        return assign_codes(subvectors(x, fmt, gran), qp.codebook)
    if isinstance(fmt, Float):
        if not fmt.scaled:
            return x.to(fmt.torch_dtype)
        scale, _ = _expanded(qp, fmt, gran, x.shape)
        t = (x / scale).clamp(-fmt.max_value, fmt.max_value)
        return t.to(fmt.torch_dtype).view(torch.uint8)
    scale, zero = _expanded(qp, fmt, gran, x.shape)
    if isinstance(fmt, Int):
        if zero is None:
            q = torch.round(x / scale)
        elif qp.zero_point.is_floating_point():  # fractional zero point (HQQ): round after the shift
            q = torch.round(x / scale + zero)
        else:  # integer zero point: round, then shift (the ONNX QuantizeLinear convention)
            q = torch.round(x / scale) + zero
        return (q.clamp(fmt.qmin, fmt.qmax) - fmt.qmin).to(torch.uint8)
    if isinstance(fmt, Ternary):
        keep = x.abs() > _ternary_threshold(x, fmt, gran)
        return (1 + torch.sign(x) * keep).to(torch.uint8)
    if isinstance(fmt, Binary):
        return (x > 0).to(torch.uint8)
    return _nearest_level(x / scale, fmt.levels()).to(torch.uint8)


def dequantize(
    codes: torch.Tensor,
    fmt: Format,
    qp: QParams,
    granularity: Granularity | None = None,
    shape: torch.Size | tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Values the codes stand for, as ``dtype`` of ``shape`` (default: the codes' shape)."""
    gran = granularity or PerTensor()
    if isinstance(fmt, Codebook):
        if shape is None:
            raise SpecError("dequantize: Codebook codes need the original tensor shape")
        return _decode_codebook(codes, qp.codebook, fmt, gran, torch.Size(shape)).to(dtype)
    shape = torch.Size(shape if shape is not None else codes.shape)
    codes = codes.reshape(shape)
    if isinstance(fmt, Float):
        if not fmt.scaled:
            return codes.to(dtype)
        scale, _ = _expanded(qp, fmt, gran, shape)
        return (codes.view(fmt.torch_dtype).float() * scale).to(dtype)
    scale, zero = _expanded(qp, fmt, gran, shape)
    if isinstance(fmt, Int):
        q = codes.float() + fmt.qmin - (zero if zero is not None else 0.0)
        return (q * scale).to(dtype)
    return (fmt.levels()[codes.long()] * scale).to(dtype)


def representable_range(fmt: Format, qp: QParams, gran: Granularity, shape: torch.Size):
    """Per-element [lo, hi] outside which values clip (the straight-through window)."""
    if isinstance(fmt, Float) and not fmt.scaled:
        m = fmt.max_value
        return torch.full(shape, -m), torch.full(shape, m)
    scale, zero = _expanded(qp, fmt, gran, shape)
    if isinstance(fmt, Int):
        z = zero if zero is not None else 0.0
        return (fmt.qmin - 0.5 - z) * scale, (fmt.qmax + 0.5 - z) * scale
    top = fmt.max_value if isinstance(fmt, Float) else 1.0
    return -top * scale, top * scale


class _StraightThrough(torch.autograd.Function):
    """Forward: dequantize(quantize(x)). Backward: gradient 1 inside the range, 0 outside."""

    @staticmethod
    def forward(ctx, x, fmt, qp, gran):  # type: ignore[override]
        out = dequantize(quantize(x, fmt, qp, gran), fmt, qp, gran, x.shape, x.dtype)
        if isinstance(fmt, Codebook):
            ctx.save_for_backward(torch.ones_like(x, dtype=torch.bool))
        else:
            lo, hi = representable_range(fmt, qp, gran, x.shape)
            ctx.save_for_backward((x >= lo) & (x <= hi))
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize(x: torch.Tensor, fmt: Format, qp: QParams, granularity: Granularity | None = None) -> torch.Tensor:
    """Quantize-dequantize with the straight-through estimator (QAT, error measurement)."""
    return _StraightThrough.apply(x, fmt, qp, granularity or PerTensor())


class _LearnedScale(torch.autograd.Function):
    """LSQ: fake quantization whose scale (and zero point) receive gradients.

    d out/d x = 1 inside the range, 0 outside; d out/d s = (q - z) - x/s inside, (q - z)
    outside (for level tables: L[q] - x/s inside, L[q] outside); d out/d z = -s outside.
    The scale gradient is multiplied by ``grad_factor`` (1/sqrt(n * qmax) in the paper)."""

    @staticmethod
    def forward(ctx, x, scale, zero, fmt, gran, grad_factor):  # type: ignore[override]
        qp = QParams(scale=scale.detach(), zero_point=None if zero is None else zero.detach())
        codes = quantize(x, fmt, qp, gran)
        out = dequantize(codes, fmt, qp, gran, x.shape, x.dtype)
        lo, hi = representable_range(fmt, qp, gran, x.shape)
        s, _ = _expanded(qp, fmt, gran, x.shape)
        ctx.save_for_backward(x, out, s, (x >= lo) & (x <= hi))
        learn_zero = zero is not None and zero.is_floating_point()  # an integer zero point stays fixed
        ctx.meta = (gran, grad_factor, learn_zero, scale.shape, None if zero is None else zero.shape)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, out, s, inside = ctx.saved_tensors
        gran, grad_factor, has_zero, scale_shape, zero_shape = ctx.meta
        level = out / s  # (q - z) for Int, L[q] for level tables
        d_scale = torch.where(inside, level - x / s, level) * grad
        g_scale = gran.reduce(d_scale, lambda r: r.sum(dim=1)).reshape(scale_shape) * grad_factor
        g_zero = None
        if has_zero:
            d_zero = torch.where(inside, torch.zeros_like(s), -s) * grad
            g_zero = gran.reduce(d_zero, lambda r: r.sum(dim=1)).reshape(zero_shape)
        return grad * inside, g_scale, g_zero, None, None, None


def fake_quantize_lsq(
    x: torch.Tensor,
    scale: torch.Tensor,
    fmt: Format,
    granularity: Granularity | None = None,
    zero_point: torch.Tensor | None = None,
    grad_factor: float | None = None,
) -> torch.Tensor:
    """Fake quantization with a learnable ``scale`` (LSQ) and an optional zero point: a float
    tensor is learned (LSQ+), an integer tensor stays fixed."""
    gran = granularity or PerTensor()
    if isinstance(fmt, (Codebook, Float)):
        raise SpecError(f"learnable scales need an Int or level-table format, not {fmt.name}")
    if grad_factor is None:
        per_scale = max(1, x.numel() // max(1, scale.numel()))
        top = max(abs(fmt.qmin), fmt.qmax) if isinstance(fmt, Int) else 2 ** (fmt.bits - 1)
        grad_factor = float((per_scale * top) ** -0.5)
    return _LearnedScale.apply(x, scale, zero_point, fmt, gran, grad_factor)


def channel_rows() -> PerChannel:
    """Granularity for [groups, n] row blocks (one parameter per row), used by range search."""
    return PerChannel(0)
