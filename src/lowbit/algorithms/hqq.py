"""HQQ (Badri & Shaji 2023): calibration-free half-quadratic optimisation of the zero point.

Starting from min-max, alternate (a) a proximal step that lets the quantization error be
sparse under an l_p (p < 1) norm and (b) a closed-form zero-point update; the scale stays
fixed. The zero point ends up fractional, so it is stored as a float (fp16) per group.
"""

from __future__ import annotations

import torch

from ..errors import SpecError
from ..formats import Int
from ..granularity import PerChannel, PerGroup, PerTensor
from ..primitives import QParams, choose_qparams, dequantize, quantize
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
    zero = best_zero.clamp(fmt.qmin, fmt.qmax).to(torch.float16)
    qp = QParams(start.scale, zero)
    codes = quantize(w, fmt, qp, gran)
    return QTensor.from_codes(codes, qp, spec, weight.shape, weight.dtype)


@register_algorithm(
    "hqq",
    options={"iters", "p", "beta", "kappa"},
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
    **_,
) -> QTensor:
    if not (isinstance(iters, int) and iters >= 1 and 0 < p <= 1 and beta > 0 and kappa >= 1):
        raise SpecError(f"{name}: hqq needs iters >= 1, 0 < p <= 1, beta > 0, kappa >= 1")
    return hqq_quantize(weight, spec, iters, p, beta, kappa, name)


def dequantized(qt: QTensor) -> torch.Tensor:
    """Convenience for tests: the float weight a QTensor stands for."""
    return dequantize(qt.codes(), qt.fmt, qt.qparams(), qt.granularity, qt.shape)
