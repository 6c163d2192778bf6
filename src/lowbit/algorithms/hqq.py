"""HQQ (Badri & Shaji 2023): calibration-free half-quadratic optimisation of scale and zero point.

The error ``W - dequant(quant(W))`` is split off into an auxiliary ``W_e`` that a proximal step
keeps sparse under an l_p (p < 1) norm; the quantization parameters are then fitted, in closed
form, to ``W - W_e``. Two variants, chosen by ``zero``:

- ``"integer"`` (default): scale and zero are fitted jointly by least squares with the codes
  fixed, and the zero is rounded to an integer every step. The result is stored exactly like
  round-to-nearest (uint8 zero points), so every kernel and exporter runs it.
- ``"float"``: the paper's update of the zero point alone, which ends up fractional and is
  stored as fp16 per group (the native kernels run it: integer part in the kernel, the fraction
  corrected per group).

Per group, the candidate with the least squared weight error is kept among the min-max start and
every iterate, so the result never has a larger weight error than round-to-nearest. ``protect``
(default on with integer zeros) admits only candidates that round the group's largest-magnitude
weight within half a min-max step, i.e. never clip the outlier weights.

Why the default differs from the paper, measured on SmolLM2-135M (WikiText-2 test perplexity,
closing notes): fractional zero points cost perplexity there even where they lower the weight
error (no exact 0 on the grid moves the near-zero weights that multiply the model's outlier
activation channels, some 1000x the median), and so does any clipping of a group's largest
weights; integer zeros with protected peaks beat round-to-nearest at 4, 3 and 2 bits.
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

ZERO_MODES = ("integer", "float")


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
    zero: str = "integer",
    protect: bool | None = None,
) -> QTensor:
    """Quantize ``weight`` with an asymmetric Int ``spec``, its (scale, zero) found by HQQ."""
    fmt, gran = spec.format, spec.granularity
    if not (isinstance(fmt, Int) and not fmt.symmetric):
        raise SpecError(f"{name}: hqq optimises zero points, so it needs an asymmetric Int format (e.g. int2-asym)")
    if not isinstance(gran, (PerGroup, PerChannel, PerTensor)):
        raise SpecError(f"{name}: hqq supports per-tensor, per-channel and per-group weights")
    if zero not in ZERO_MODES:
        raise SpecError(f"{name}: hqq zero={zero!r}; use one of {', '.join(ZERO_MODES)}")
    protect = zero == "integer" if protect is None else bool(protect)
    w = weight.detach().float()
    start = choose_qparams(w, fmt, gran, spec.range, spec.torch_scale_dtype, name)
    scale_dtype = start.scale.dtype
    scale0, zero0 = start.scale.float(), start.zero_point.float()
    s, z = scale0, zero0
    best_err = _group_error(w, fmt, gran, s, z)
    best_s, best_z = s, z
    for _ in range(iters):
        s_full, z_full = gran.expand(s, w.shape), gran.expand(z, w.shape)
        codes = _codes(w, fmt, s_full, z_full)
        target = w - shrink_lp(w - (codes - z_full) * s_full, beta, p)
        if zero == "integer":
            s, z = fit_affine(target, codes, gran, s, z)
            s = _round_scale(s, scale_dtype).float()
            z = torch.round(z).clamp(fmt.qmin, fmt.qmax)
        else:
            z = _stored_zero(gran.reduce(codes - target / s_full, lambda r: r.mean(dim=1)), fmt)
        err = _group_error(w, fmt, gran, s, z)
        better = err < best_err
        if protect:
            better &= _peak_error(w, fmt, gran, s, z) <= 0.5 * scale0 * (1 + 1e-3)
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        beta *= kappa
    zero_dtype = torch.uint8 if zero == "integer" else torch.float16
    qp = QParams(_round_scale(best_s, scale_dtype), best_z.to(zero_dtype))
    codes = quantize(w, fmt, qp, gran)
    return QTensor.from_codes(codes, qp, spec, weight.shape, weight.dtype)


def _codes(w: torch.Tensor, fmt: Int, s_full: torch.Tensor, z_full: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / s_full + z_full), fmt.qmin, fmt.qmax)


def _stored_zero(zero: torch.Tensor, fmt: Int) -> torch.Tensor:
    """A fractional zero point as it will be stored: clamped to the code range, fp16."""
    return zero.clamp(fmt.qmin, fmt.qmax).to(torch.float16).float()


def _group_sum(gran, x: torch.Tensor) -> torch.Tensor:
    return gran.reduce(x, lambda rows: rows.sum(dim=1))


def _group_error(w: torch.Tensor, fmt: Int, gran, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per-group squared error of rounding ``w`` on the grid (scale, zero)."""
    s_full, z_full = gran.expand(scale, w.shape), gran.expand(zero, w.shape)
    return _group_sum(gran, (w - (_codes(w, fmt, s_full, z_full) - z_full) * s_full) ** 2)


def _peak_error(w: torch.Tensor, fmt: Int, gran, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Per group, the rounding error of the group's largest-magnitude weight(s)."""
    absw = w.abs()
    peak = absw >= gran.expand(gran.reduce(absw, lambda rows: rows.amax(dim=1)), w.shape)
    s_full, z_full = gran.expand(scale, w.shape), gran.expand(zero, w.shape)
    err = (w - (_codes(w, fmt, s_full, z_full) - z_full) * s_full).abs() * peak
    return gran.reduce(err, lambda rows: rows.amax(dim=1))


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
    options={"iters", "p", "beta", "kappa", "zero", "protect"},
    stats=set(),
    description="HQQ: calibration-free half-quadratic optimisation of scale and zero point",
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
    zero: str = "integer",
    protect: bool | None = None,
    **_,
) -> QTensor:
    if not (isinstance(iters, int) and iters >= 1 and 0 < p <= 1 and beta > 0 and kappa >= 1):
        raise SpecError(f"{name}: hqq needs iters >= 1, 0 < p <= 1, beta > 0, kappa >= 1")
    return hqq_quantize(weight, spec, iters, p, beta, kappa, name, zero, protect)


def dequantized(qt: QTensor) -> torch.Tensor:
    """Convenience for tests: the float weight a QTensor stands for."""
    return dequantize(qt.codes(), qt.fmt, qt.qparams(), qt.granularity, qt.shape)
