"""SmoothQuant: move activation outliers into the weights with a per-input-channel factor.

x W^T = (x / s)(W s)^T with s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha). The quantized layer
keeps s as its ``input_smooth`` divisor (applied while activations are quantized, so nothing
needs folding into the previous op). ``alpha`` is fixed, or "auto": searched per layer for
the least output error on sampled calibration inputs.
"""

from __future__ import annotations

import torch

from ..errors import DataError, SpecError
from ..primitives import choose_qparams, dequantize, quantize
from ..recipe import ActivationSpec
from ..spec import QuantSpec
from ..tensor import QTensor
from . import LayerResult, register_algorithm

ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def input_channel_view(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Index of the layer input channel each weight column reads: [out, in/groups] (x kernel)."""
    out_ch, per_group = weight.shape[0], weight.shape[1]
    group = torch.arange(out_ch) // (out_ch // groups)
    return group.unsqueeze(1) * per_group + torch.arange(per_group).unsqueeze(0)


def scale_input_channels(weight: torch.Tensor, s: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """W with every column multiplied by the factor of the input channel it reads."""
    factors = s[input_channel_view(weight, groups)]
    return weight * factors.reshape(*factors.shape, *([1] * (weight.dim() - 2)))


def weight_channel_absmax(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """max |W| over everything that multiplies input channel j."""
    index = input_channel_view(weight, groups)
    col = weight.abs().reshape(weight.shape[0], weight.shape[1], -1).amax(dim=2)
    out = torch.zeros(int(index.max()) + 1)
    return out.scatter_reduce(0, index.reshape(-1), col.reshape(-1), reduce="amax")


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, groups: int = 1) -> torch.Tensor:
    """s_j = max|x_j|^alpha / max|W_j|^(1-alpha); 1 for channels that never fire."""
    w = weight_channel_absmax(weight.float(), groups).clamp(min=1e-5)
    a = act_absmax.float().clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).clamp(min=1e-5, max=1e5)


def fake_quantize_input(x: torch.Tensor, act: ActivationSpec) -> torch.Tensor:
    """What a layer's kernel does to its (already smoothed) input rows."""
    if act.mode == "none":
        return x
    gran = act.resolved_granularity
    qp = choose_qparams(x, act.format, gran, act.range)
    return dequantize(quantize(x, act.format, qp, gran), act.format, qp, gran, x.shape)


def output_error(
    samples: torch.Tensor, weight: torch.Tensor, qweight: QTensor, s: torch.Tensor, act: ActivationSpec
) -> float:
    """|| X W^T - Q(X / s) deq(W s)^T ||^2 on sampled input rows (Linear layers)."""
    ref = samples @ weight.float().T
    got = fake_quantize_input(samples / s, act) @ qweight.dequantize(torch.float32).T
    return float(((ref - got) ** 2).sum())


@register_algorithm(
    "smoothquant",
    options={"alpha"},
    stats={"channels", "samples"},
    description="SmoothQuant: per-channel activation/weight balancing for W8A8 (alpha or 'auto')",
    option_stats=lambda options: {"channels", "samples"} if options.get("alpha") == "auto" else {"channels"},
)
def smoothquant(
    weight: torch.Tensor,
    spec: QuantSpec,
    stats,
    *,
    name: str = "weight",
    activation: ActivationSpec | None = None,
    groups: int = 1,
    alpha: float | str = 0.5,
) -> LayerResult:
    """Smooth, then round to nearest; ``alpha="auto"`` searches 0.0..1.0 per layer."""
    if stats is None or stats.channel_min is None:
        raise DataError(f"{name}: smoothquant needs calibration statistics; pass calibration data")
    if alpha == "auto":
        alphas = ALPHA_GRID
    elif isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0:
        alphas = (float(alpha),)
    else:
        raise SpecError(f"{name}: smoothquant alpha={alpha!r} must be a number in [0, 1] or 'auto'")
    act = activation or ActivationSpec()
    weight = weight.detach().float()
    if weight.dim() != 2:  # conv: the search would need unfolded patches; use the middle of the grid
        alphas = alphas if len(alphas) == 1 else (0.5,)
    best: tuple[float, LayerResult] | None = None
    for a in alphas:
        s = smoothing_factors(stats.channel_absmax, weight, a, groups)
        qweight = QTensor.quantize(scale_input_channels(weight, s, groups), spec, name=name)
        result = LayerResult(qweight, smooth=s)
        if len(alphas) == 1:
            return result
        err = output_error(stats.samples, weight, qweight, s, act)
        if best is None or err < best[0]:
            best = (err, result)
    return best[1]
