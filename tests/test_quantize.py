"""quantize(): calibration, module swap, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import DataError, NonFiniteError, SpecError
from lowbit.nn import QConv2d, QLinear


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def test_weight_only_int8_keeps_outputs_close():
    model = mlp()
    x = torch.randn(32, 16)
    ref = model(x)
    lowbit.quantize(model, "w8-weight")
    assert isinstance(model[0], QLinear) and isinstance(model[2], QLinear) and isinstance(model[4], QLinear)
    rel = (model(x) - ref).norm() / ref.norm()
    assert rel < 0.01
    assert set(model.lowbit.schemes) == {"0", "2", "4"}  # the head too (the preset's int8 head scheme)
    activations = mlp()
    lowbit.quantize(activations, "int8-dynamic-rtn")
    assert isinstance(activations[4], nn.Linear) and not isinstance(activations[4], QLinear)  # head stays float


def test_static_calibration_records_input_ranges():
    model = mlp()
    batches = [torch.randn(8, 16) * 3 for _ in range(4)]
    lo = min(float(b.min()) for b in batches)
    hi = max(float(b.max()) for b in batches)
    lowbit.quantize(model, "w8a8-static", calib=batches)  # SmoothQuant-balanced
    smooth = model[0].input_smooth
    x = torch.cat(batches)
    assert float(model[0].input_scale) == pytest.approx(
        float(((x / smooth).max() - (x / smooth).min()) / 255), rel=1e-5
    )
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(4, 16))).all()

    plain = mlp()
    recipe = {
        "rules": [{"types": ["Linear"], "weight": "int8", "activation": {"mode": "static", "format": "int8-asym"}}]
    }
    lowbit.quantize(plain, lowbit.Recipe.from_dict(recipe), calib=batches)
    scale = float(plain[0].input_scale)
    assert plain[0].input_smooth is None
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert int(plain[0].input_zero_point) == round(-lo / scale)


def test_smoothquant_is_exact_in_float_and_helps_outliers():
    from lowbit.algorithms.smoothquant import scale_input_channels, smoothing_factors

    torch.manual_seed(0)
    w = torch.randn(32, 16)
    x = torch.randn(64, 16)
    x[:, 3] *= 40  # an outlier channel
    s = smoothing_factors(x.abs().amax(0), w, 0.5)
    assert torch.allclose((x / s) @ scale_input_channels(w, s).T, x @ w.T, rtol=1e-4, atol=1e-4)
    # Depthwise conv: each output channel reads its own input channel.
    dw = torch.randn(8, 1, 3, 3)
    s8 = torch.arange(1, 9, dtype=torch.float32)
    assert torch.equal(scale_input_channels(dw, s8, groups=8), dw * s8.view(8, 1, 1, 1))

    errors = {}
    for alg in ("rtn", "smoothquant"):
        model = nn.Sequential(nn.Linear(16, 32))
        model[0].weight.data = w.clone()
        recipe = {"include_head": True, "rules": [{"weight": "int8", "activation": "dynamic", "algorithm": alg}]}
        lowbit.quantize(model, lowbit.Recipe.from_dict(recipe), calib=[x])
        errors[alg] = float((model(x) - x @ w.T - model[0].bias).pow(2).mean())
    assert errors["smoothquant"] < 0.5 * errors["rtn"]


def test_smoothquant_collects_sampled_rows_only_for_the_alpha_search():
    from lowbit.algorithms import get_algorithm
    from lowbit.quantize import stats_needed
    from lowbit.recipe import LayerScheme

    algorithm = get_algorithm("smoothquant")
    for options, expected in [
        ({}, {"channels"}),
        ({"alpha": 0.7}, {"channels"}),
        ({"alpha": "auto"}, {"channels", "samples"}),
    ]:
        scheme = LayerScheme.from_dict(
            {"weight": "int8", "activation": "dynamic", "algorithm": "smoothquant", "options": options}
        )
        assert stats_needed(algorithm, scheme) == expected, options


@pytest.mark.parametrize("estimator", ["mse", {"type": "percentile", "percentile": 99.9}])
def test_static_smoothquant_with_a_clipping_range_estimator(estimator):
    """A smoothed input's static range from a clipping estimator is found from sampled rows, which
    calibration collects for it even when alpha is fixed; it clips below min-max."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    x[:, 3] *= 40
    x[0, 5] = 500.0  # one extreme value that a clipping estimator gives up
    ranges = {}
    for name, rng in (("minmax", "minmax"), ("clip", estimator)):
        model = nn.Sequential(nn.Linear(16, 32))
        act = {"mode": "static", "format": "int8-asym", "range": rng}
        rule = {"weight": "int8", "activation": act, "algorithm": "smoothquant", "options": {"alpha": 0.5}}
        lowbit.quantize(model, lowbit.Recipe.from_dict({"include_head": True, "rules": [rule]}), calib=[x])
        ranges[name] = float(model[0].input_scale.float().max())
    assert ranges["clip"] < ranges["minmax"]


def test_bad_input():
    with pytest.raises(DataError, match="needs calibration data"):
        lowbit.quantize(mlp(), "w8a8-static")
    with pytest.raises(SpecError, match="matches no"):
        lowbit.quantize(nn.Sequential(nn.ReLU()), "w8-weight")
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"2\.weight"):
        lowbit.quantize(model, "w8-weight")
    model = mlp()
    lowbit.quantize(model, "w8-weight")
    with pytest.raises(SpecError, match="already quantized"):
        lowbit.quantize(model, "w8-weight")


def test_cnn_conv_layers_are_swapped():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(10)
    )
    x = torch.randn(2, 3, 12, 12)
    ref = model(x)
    lowbit.quantize(model, "int8-dynamic", calib=[torch.randn(4, 3, 12, 12) for _ in range(2)])
    assert isinstance(model[0], QConv2d) and model[0].input_smooth is not None and isinstance(model[2], QConv2d)
    assert (model(x) - ref).norm() / ref.norm() < 0.03
