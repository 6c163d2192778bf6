"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales for weight quantization.

Salient input channels (large mean |x|) are scaled up in the weight before rounding, and the
input is divided by the same factor: x W^T = (x / s)(W s)^T. The exponent of s = mean|x|^a is
grid-searched for the least output error on sampled calibration inputs (jointly over layers
that read the same input), then a per-group clipping ratio is searched the same way. With
``gptq: true`` the scaled weight is rounded by GPTQ instead of clip search and round-to-nearest
(the two methods compose: AWQ picks the scales, GPTQ compensates the rounding).

``asymmetric: true`` searches and rounds GPTQ's float-output target W C H^-1 instead of W (see
``gptq.asymmetric_target``): in a block-by-block run each layer then also undoes, as far as a
linear map can, the error the quantized layers before it left in its inputs; and the searches
measure error on every calibration row through the Hessian (d^T H d) instead of a row sample.
It needs the Hessian and the float model's inputs (a float copy of each block), so it costs
about twice the time of plain AWQ. SmolLM2-135M, 32 calibration windows, w4-g128: plain AWQ
recovers 37% of round-to-nearest's perplexity gap to float, the float-output target alone 59%,
with the Hessian searches 71% (bench/results/llm_accuracy_awq_asym*.json).
"""

from __future__ import annotations

import torch

from ..errors import DataError, SpecError
from ..formats import Codebook, Float
from ..granularity import PerGroup
from ..primitives import choose_qparams, dequantize, qparams_from_range, quantize
from ..ranges import MinMax
from ..spec import QuantSpec
from ..tensor import QTensor
from . import LayerResult, register_algorithm
from .gptq import asymmetric_target, gptq_quantize


def fake_weight(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of a weight (the inner loop of the searches)."""
    qp = choose_qparams(weight, spec.format, spec.granularity, spec.range)
    return dequantize(
        quantize(weight, spec.format, qp, spec.granularity), spec.format, qp, spec.granularity, weight.shape
    )


def weight_mean(weights: list[torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """Per input channel, the mean over output rows of |w| relative to its group's largest |w|."""
    gran = spec.granularity
    rel = []
    for w in weights:
        absw = w.float().abs()
        if isinstance(gran, PerGroup):
            peak = gran.expand(gran.reduce(absw, lambda r: r.amax(dim=1)), absw.shape)
        else:
            peak = absw.amax(dim=1, keepdim=True)
        rel.append(absw / peak.clamp(min=1e-12))
    return torch.cat(rel).mean(dim=0)


def search_scales(
    weights: list[torch.Tensor], samples: torch.Tensor, spec: QuantSpec, grid: int = 20, duo: bool = False
) -> torch.Tensor:
    """The per-input-channel factor s (shared by ``weights``, which all read ``samples``):
    s = mean|x|^a, or with ``duo`` mean|x|^a / mean|w|^(1-a) (AutoAWQ's duo scaling), for the
    grid's exponents a; s = 1 (round-to-nearest) is always a candidate."""
    x = samples.float()
    x_mean = x.abs().mean(dim=0)
    w_mean = weight_mean(weights, spec) if duo else None
    refs = [x @ w.float().T for w in weights]

    def error(s: torch.Tensor) -> float:
        return sum(
            float(((x @ (fake_weight(w.float() * s, spec) / s).T - ref) ** 2).mean()) for w, ref in zip(weights, refs)
        )

    best_s = torch.ones_like(x_mean)
    best = error(best_s)
    for step in range(0 if duo else 1, grid):
        alpha = step / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        if w_mean is not None:
            s = (s / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = error(s)
        if err < best:
            best, best_s = err, s
    return best_s


def search_clipping(
    weight: torch.Tensor, samples: torch.Tensor, spec: QuantSpec, grid: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """Per (row, group) shrink ratio of the min-max range with the least output error."""
    gran = spec.granularity
    rows = weight.shape[0]
    size = gran.size if isinstance(gran, PerGroup) else weight.shape[1]
    lo, hi = gran.reduce(weight, lambda r: (r.amin(dim=1), r.amax(dim=1)))
    best_err = torch.full(lo.shape, float("inf"))
    best_ratio = torch.ones(lo.shape)
    x = samples.float()
    n_groups = -(-weight.shape[1] // size)
    for step in range(grid + 1):
        ratio = 1.0 - max_shrink * step / grid
        qp = qparams_from_range(spec.format, lo * ratio, hi * ratio, spec.torch_scale_dtype)
        w_hat = dequantize(quantize(weight, spec.format, qp, gran), spec.format, qp, gran, weight.shape)
        diff = weight - w_hat
        err = torch.empty(rows, n_groups)
        for g in range(n_groups):
            cols = slice(g * size, min((g + 1) * size, weight.shape[1]))
            err[:, g] = ((x[:, cols] @ diff[:, cols].T) ** 2).sum(dim=0)
        err = err.reshape(lo.shape)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def awq_quantize(
    weight: torch.Tensor,
    samples: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor | None = None,
    grid: int = 20,
    clip: bool = True,
    name: str = "weight",
    duo: bool = False,
    hessian: torch.Tensor | None = None,
) -> LayerResult:
    """Scale (searched unless given), clip-search, then round: returns the weight and x's divisor.
    With ``hessian`` (of the unscaled input) the scaled weight is rounded by GPTQ instead, on the
    Hessian of x / s; the clipping search is then skipped (GPTQ chooses its grids as it goes)."""
    if isinstance(spec.format, (Codebook, Float)):
        raise SpecError(f"{name}: awq needs an Int or level-table format, not {spec.format.name}")
    if weight.dim() != 2:
        raise SpecError(f"{name}: awq handles Linear layers; keep convolutions on rtn or gptq")
    w = weight.detach().float()
    s = search_scales([w], samples, spec, grid, duo) if scale is None else scale
    scaled = w * s
    if hessian is not None:
        qweight, _ = gptq_quantize(scaled, hessian.float() / torch.outer(s, s), spec, act_order=True, name=name)
    elif clip and isinstance(spec.range, MinMax):
        ratio = search_clipping(scaled, samples / s, spec, grid)
        lo, hi = spec.granularity.reduce(scaled, lambda r: (r.amin(dim=1), r.amax(dim=1)))
        qp = qparams_from_range(spec.format, lo * ratio, hi * ratio, spec.torch_scale_dtype)
        codes = quantize(scaled, spec.format, qp, spec.granularity)
        qweight = QTensor.from_codes(codes, qp, spec, weight.shape, weight.dtype)
    else:
        qweight = QTensor.quantize(scaled, spec, name=name)
    return LayerResult(qweight, smooth=s)


def hessian_rows(hessian: torch.Tensor) -> torch.Tensor:
    """Rows R with R^T R = H (the transposed Cholesky factor, lightly damped): as "samples" they
    make the searches' output errors d^T H d, i.e. over every calibration row, not a sample."""
    H = hessian.double()
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    mean = float(H.diagonal().mean())
    for damp in (1e-6, 1e-4, 1e-2, 1.0):
        factor, info = torch.linalg.cholesky_ex(H + damp * max(mean, 1e-30) * eye)
        if int(info) == 0:
            return factor.T.float().contiguous()
    raise DataError("awq: the input Hessian is not positive definite even with damping; use more calibration data")


def search_rows(stats, asymmetric: bool) -> torch.Tensor:
    """The inputs AWQ's searches measure output error on: sampled rows, or with ``asymmetric``
    (which collects the Hessian anyway) the Hessian's rows, i.e. all calibration rows."""
    if asymmetric and stats.hessian_sum is not None:
        return hessian_rows(stats.hessian)
    return stats.samples


def awq_target(weight: torch.Tensor, stats, asymmetric: bool) -> torch.Tensor:
    """The weight AWQ scales and rounds: the layer's own, or with ``asymmetric`` GPTQ's float-output
    target W C H^-1 (the least-squares weight that maps the inputs this layer sees in a block-by-block
    run onto the float model's outputs), where the statistics hold the float model's inputs."""
    if not asymmetric or stats is None or stats.cross_sum is None:
        return weight
    return asymmetric_target(weight.float(), stats.hessian, stats.cross, 0.01)


@register_algorithm(
    "awq",
    options={"grid", "clip", "duo", "gptq", "asymmetric"},
    stats={"samples", "hessian", "cross"},
    description="AWQ: activation-aware channel scales plus clipping search (or GPTQ rounding)",
    option_stats=lambda options: (
        {"samples"}
        | ({"hessian"} if options.get("gptq") or options.get("asymmetric") else set())
        | ({"cross"} if options.get("asymmetric") else set())
    ),
)
def awq(
    weight: torch.Tensor,
    spec: QuantSpec,
    stats,
    *,
    name: str = "weight",
    grid: int = 20,
    clip: bool = True,
    duo: bool = False,
    gptq: bool = False,
    asymmetric: bool = False,
    shared_scale: torch.Tensor | None = None,
    **_,
) -> LayerResult:
    if stats is None or stats.samples is None:
        raise DataError(f"{name}: awq needs calibration data (sampled layer inputs)")
    if not (isinstance(grid, int) and grid >= 1):
        raise SpecError(f"{name}: awq grid={grid!r} must be a positive integer")
    if asymmetric not in (True, False):
        raise SpecError(f"{name}: awq asymmetric={asymmetric!r} must be true or false")
    weight = awq_target(weight, stats, asymmetric)
    samples = search_rows(stats, asymmetric)
    hessian = None
    if gptq:
        if stats.hessian_sum is None:
            raise DataError(f"{name}: awq with gptq rounding needs a Hessian of the layer inputs; calibrate again")
        hessian = stats.hessian
    return awq_quantize(weight, samples, spec, shared_scale, grid, bool(clip), name, bool(duo), hessian)
