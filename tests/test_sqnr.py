"""Signal-to-quantization-noise floors and orderings, on Gaussian data and real MiniLM weights.

Floors sit a little under the values measured when they were set (deterministic code, fixed
weights): a drop below them is a regression in the numeric core.
"""

from __future__ import annotations

import pytest
import torch

from lowbit.evaluation.weights import format_study
from lowbit.formats import Binary, Float, Int, Log2, NormalFloat, Ternary
from lowbit.granularity import PerChannel, PerGroup, PerTensor
from lowbit.ranges import MSE
from lowbit.spec import QuantSpec

# (spec, Gaussian floor dB, MiniLM floor dB)
FLOORS = [
    (QuantSpec(Int(8), PerChannel()), 41.5, 40.0),
    (QuantSpec(Int(8), PerTensor()), 38.0, 19.0),
    (QuantSpec(Int(4), PerChannel()), 16.5, 15.7),
    (QuantSpec(Int(4), PerGroup(128)), 18.3, 17.5),
    (QuantSpec(Int(3), PerGroup(128)), 11.0, 10.2),
    (QuantSpec(Int(2, symmetric=False), PerGroup(64)), 6.5, 6.2),
    (QuantSpec(NormalFloat(4), PerGroup(64)), 20.4, 20.2),
    (QuantSpec(Log2(4), PerChannel()), 13.9, 13.9),
    (QuantSpec(Ternary(), PerChannel()), 6.9, 6.5),
    (QuantSpec(Binary(), PerChannel()), 4.2, 3.9),
    (QuantSpec(Float("fp8_e4m3"), PerChannel()), 31.2, 31.2),
    (QuantSpec(Float("bf16"), PerTensor()), 55.0, 55.0),
    (QuantSpec(Float("fp16"), PerTensor()), 73.0, 73.0),
]


@pytest.fixture(scope="module")
def gaussian() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"g": torch.randn(1024, 1024, generator=gen)}


def _sqnr(weights, spec):
    return format_study(weights, [spec])[0]["sqnr_db"]


@pytest.mark.parametrize("spec, gauss_floor, minilm_floor", FLOORS, ids=lambda v: getattr(v, "name", ""))
def test_sqnr_floors(spec, gauss_floor, minilm_floor, gaussian, minilm_weights):
    assert _sqnr(gaussian, spec) >= gauss_floor
    assert _sqnr(minilm_weights, spec) >= minilm_floor


def test_nf4_beats_int4_on_gaussian_weights(gaussian):
    for gran in (PerChannel(), PerGroup(64)):
        assert _sqnr(gaussian, QuantSpec(NormalFloat(4), gran)) > _sqnr(gaussian, QuantSpec(Int(4), gran)) + 1.0


@pytest.mark.parametrize("bits", [3, 4])
def test_mse_range_never_worse_than_minmax(bits, gaussian, minilm_weights):
    for weights in (gaussian, minilm_weights):
        base = _sqnr(weights, QuantSpec(Int(bits), PerChannel()))
        assert _sqnr(weights, QuantSpec(Int(bits), PerChannel(), MSE())) >= base


def test_group_128_beats_per_channel_at_4_bits(gaussian, minilm_weights):
    for weights in (gaussian, minilm_weights):
        assert _sqnr(weights, QuantSpec(Int(4), PerGroup(128))) > _sqnr(weights, QuantSpec(Int(4), PerChannel()))


def test_more_bits_more_signal(minilm_weights):
    values = [_sqnr(minilm_weights, QuantSpec(Int(b), PerGroup(128))) for b in (2, 3, 4, 5, 6, 8)]
    assert values == sorted(values)
    # Each extra bit buys roughly 6 dB in the well-behaved regime.
    assert 4.5 < values[3] - values[2] < 7.5
