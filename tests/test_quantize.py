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
    assert isinstance(model[0], QLinear) and isinstance(model[2], QLinear)
    assert isinstance(model[4], nn.Linear) and not isinstance(model[4], QLinear)  # the head stays float
    rel = (model(x) - ref).norm() / ref.norm()
    assert rel < 0.01
    assert set(model.lowbit.schemes) == {"0", "2"}


def test_static_calibration_records_input_ranges():
    model = mlp()
    batches = [torch.randn(8, 16) * 3 for _ in range(4)]
    lo = min(float(b.min()) for b in batches)
    hi = max(float(b.max()) for b in batches)
    lowbit.quantize(model, "w8a8-static", calib=batches)
    scale = float(model[0].input_scale)
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert int(model[0].input_zero_point) == round(-lo / scale)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(4, 16))).all()


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
    lowbit.quantize(model, "int8-dynamic")
    assert isinstance(model[0], QConv2d) and isinstance(model[2], QConv2d)
    assert (model(x) - ref).norm() / ref.norm() < 0.03
