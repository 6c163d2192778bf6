"""HQQ (Badri & Shaji 2023): calibration-free half-quadratic optimisation of the zero point.

Starting from min-max, alternate (a) a proximal step that lets the quantization error be
sparse under an l_p (p < 1) norm and (b) a closed-form zero-point update. Optionally
(``refine`` > 0) refine scale and zero by least squares with the codes fixed; per group the
candidate (min-max, HQQ, refined) with the least squared weight error is kept, so the result is
never worse than round-to-nearest on that measure. ``protect`` admits only candidates that
round each group's largest weight within half a min-max step. On SmolLM2 at w4-g128 the
refinement lowers weight and layer-output error but not perplexity, so it is off by default.
The zero point ends up fractional, so it is stored as a float (fp16) per group (the native
kernels run it: integer part in the kernel, the fraction corrected per group).

Measured on SmolLM2-135M (bench/results/llm_accuracy_low_bits.json and the closing notes): any
fractional zero point costs perplexity there even when it lowers the weight error (a min-max grid
with its exact fractional zero: 46.4 vs 34.9 for the rounded zero on 4096 tokens; our reading: a
grid without an exact 0 moves near-zero weights that multiply the model's outlier activation
channels, some 1000x the median), so HQQ does not beat round-to-nearest there at w4/w3.
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from ..formats import Int
from ..granularity import PerChannel, PerGroup, PerTensor
from ..primitives import QParams, _round_scale, choose_qparams, dequantize, quantize
from ..spec import QuantSpec
from ..tensor import QTensor
from . import register_algorithm


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the l_p (quasi-)norm, the generalised soft threshold."""
    if p == 1:
        return torch.sign(x) * torch.relu(x.abs() - 1.0 / beta)
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp(min=1e-12).pow(p - 1))


def hqq_quantize(
    weight: torch.Tensor,
    spec: QuantSpec,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    name: str = "weight",
    refine: int = 0,
    protect: bool = False,
) -> QTensor:
    """Optimise the (float) zero points of an asymmetric Int spec; the scale stays min-max."""
    fmt, gran = spec.format, spec.granularity
    if not (isinstance(fmt, Int) and not fmt.symmetric):
        raise SpecError(f"{name}: hqq optimises zero points, so it needs an asymmetric Int format (e.g. int2-asym)")
    if not isinstance(gran, (PerGroup, PerChannel, PerTensor)):
        raise SpecError(f"{name}: hqq supports per-tensor, per-channel and per-group weights")
    w = weight.detach().float()
    start = choose_qparams(w, fmt, gran, spec.range, spec.torch_scale_dtype, name)
    scale = start.scale.float()
    zero = start.zero_point.float()
    s_full = gran.expand(scale, w.shape)
    best_err, best_zero = float("inf"), zero.clone()
    for _ in range(iters):
        z_full = gran.expand(zero, w.shape)
        q = torch.clamp(torch.round(w / s_full + z_full), fmt.qmin, fmt.qmax)
        w_r = (q - z_full) * s_full
        err = float((w - w_r).abs().mean())
        if err < best_err:
            best_err, best_zero = err, zero.clone()
        else:
            break
        w_e = shrink_lp(w - w_r, beta, p)
        zero = gran.reduce(q - (w - w_e) / s_full, lambda r: r.mean(dim=1))
        beta *= kappa
    scale_dtype = start.scale.dtype
    candidates = [(scale, start.zero_point.float()), (scale, _stored_zero(best_zero, fmt))]
    s, z = candidates[-1]
    for _ in range(refine):
        codes = torch.clamp(torch.round(w / gran.expand(s, w.shape) + gran.expand(z, w.shape)), fmt.qmin, fmt.qmax)
        s, z = fit_affine(w, codes, gran, s, z)
        s, z = _round_scale(s, scale_dtype).float(), _stored_zero(z, fmt)
        candidates.append((s, z))
    errors = torch.stack([_group_error(w, fmt, gran, cs, cz) for cs, cz in candidates])
    if protect:  # the group's largest weight stays within half an RTN step (no clipping of outliers)
        peak = _peak_error(w, fmt, gran, candidates)
        allowed = peak <= 0.5 * scale.unsqueeze(0) * (1 + 1e-3)
        allowed[0] = True
        errors = torch.where(allowed, errors, torch.full_like(errors, float("inf")))
    pick = errors.argmin(dim=0)
    best_s = torch.stack([c[0] for c in candidates]).gather(0, pick.unsqueeze(0)).squeeze(0)
    best_z = torch.stack([c[1] for c in candidates]).gather(0, pick.unsqueeze(0)).squeeze(0)
    qp = QParams(_round_scale(best_s, scale_dtype), best_z.to(torch.float16))
    codes = quantize(w, fmt, qp, gran)
    return QTensor.from_codes(codes, qp, spec, weight.shape, weight.dtype)


def _stored_zero(zero: torch.Tensor, fmt: Int) -> torch.Tensor:
    """The zero point as it will be stored: clamped to the code range, fp16."""
    return zero.clamp(fmt.qmin, fmt.qmax).to(torch.float16).float()


def _peak_error(w: torch.Tensor, fmt: Int, gran, candidates) -> torch.Tensor:
    """Per candidate and group, the rounding error of the group's largest-magnitude weight."""
    absw = w.abs()
    peak_mask = absw >= gran.expand(gran.reduce(absw, lambda rows: rows.amax(dim=1)), w.shape)
    out = []
    for scale, zero in candidates:
        s_full, z_full = gran.expand(scale, w.shape), gran.expand(zero, w.shape)
        q = torch.clamp(torch.round(w / s_full + z_full), fmt.qmin, fmt.qmax)
        err = (w - (q - z_full) * s_full).abs() * peak_mask
        out.append(gran.reduce(err, lambda rows: rows.amax(dim=1)))
    return torch.stack(out)


def _group_sum(gran, x: torch.Tensor) -> torch.Tensor:
    return gran.reduce(x, lambda rows: rows.sum(dim=1))


def _group_error(w: torch.Tensor, fmt: Int, gran, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per-group squared error of rounding ``w`` on the grid (scale, zero)."""
    s_full, z_full = gran.expand(scale, w.shape), gran.expand(zero, w.shape)
    q = torch.clamp(torch.round(w / s_full + z_full), fmt.qmin, fmt.qmax)
    return _group_sum(gran, (w - (q - z_full) * s_full) ** 2)


def fit_affine(
    w: torch.Tensor, codes: torch.Tensor, gran, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (scale, zero) per group for fixed codes: w ~ scale * (codes - zero).
    Groups whose codes are constant or anti-correlated with w keep the given parameters."""
    n = _group_sum(gran, torch.ones_like(w))
    mean_q, mean_w = _group_sum(gran, codes) / n, _group_sum(gran, w) / n
    cov = _group_sum(gran, codes * w) / n - mean_q * mean_w
    var = _group_sum(gran, codes * codes) / n - mean_q**2
    ok = (var > 1e-12) & (cov > 0)
    a = torch.where(ok, cov / var.clamp(min=1e-12), scale)
    return a, torch.where(ok, mean_q - mean_w / a, zero)


@register_algorithm(
    "hqq",
    options={"iters", "p", "beta", "kappa", "refine", "protect"},
    stats=set(),
    description="HQQ: calibration-free half-quadratic zero-point optimisation",
)
def hqq(
    weight: torch.Tensor,
    spec: QuantSpec,
    stats=None,
    *,
    name: str = "weight",
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    refine: int = 0,
    protect: bool = False,
    **_,
) -> QTensor:
    if not (isinstance(iters, int) and iters >= 1 and 0 < p <= 1 and beta > 0 and kappa >= 1):
        raise SpecError(f"{name}: hqq needs iters >= 1, 0 < p <= 1, beta > 0, kappa >= 1")
    if not (isinstance(refine, int) and refine >= 0):
        raise SpecError(f"{name}: hqq refine={refine!r} must be an integer >= 0 (least-squares refinement steps)")
    return hqq_quantize(weight, spec, iters, p, beta, kappa, name, refine, bool(protect))


def dequantized(qt: QTensor) -> torch.Tensor:
    """Convenience for tests: the float weight a QTensor stands for."""
    return dequantize(qt.codes(), qt.fmt, qt.qparams(), qt.granularity, qt.shape)
