"""Range estimators and the activation observer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import SpecError
from lowbit.formats import Float, Int, NormalFloat
from lowbit.granularity import PerChannel, PerTensor
from lowbit.primitives import choose_qparams, dequantize, qparams_from_range, quantize
from lowbit.ranges import (
    MSE,
    Entropy,
    MinMax,
    MovingMinMax,
    Percentile,
    RangeObserver,
    SoftmaxCE,
    estimator_from_dict,
    estimator_to_dict,
)


def _mse_rows(x, fmt, est, gran=None):
    gran = gran or PerChannel()
    qp = choose_qparams(x, fmt, gran, est)
    x_hat = dequantize(quantize(x, fmt, qp, gran), fmt, qp, gran, x.shape)
    return ((x - x_hat) ** 2).mean(dim=1)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    fmt=st.sampled_from([Int(4), Int(3, symmetric=False), Int(8), NormalFloat(4), Float("fp8_e4m3")]),
    tail=st.floats(1.0, 8.0),
)
def test_mse_search_is_never_worse_than_minmax(seed, fmt, tail):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 96, generator=gen) * torch.rand(8, 1, generator=gen)
    x[:, 0] *= tail  # an outlier per row
    assert torch.all(_mse_rows(x, fmt, MSE(grid=40)) <= _mse_rows(x, fmt, MinMax()) * (1 + 1e-6))


def test_mse_search_beats_minmax_on_heavy_tails():
    x = torch.distributions.StudentT(2.0).sample((16, 512))
    assert _mse_rows(x, Int(4), MSE()).mean() < 0.9 * _mse_rows(x, Int(4), MinMax()).mean()


def test_percentile_symmetric_and_asymmetric():
    x = torch.arange(1, 10001, dtype=torch.float32).reshape(1, -1)
    lo, hi = Percentile(99.0)(x, Int(8))
    assert float(hi) == 9900.0 and float(lo) == -9900.0
    lo, hi = Percentile(99.0)(x, Int(8, symmetric=False))
    assert float(lo) == 100.0 and float(hi) == 9900.0
    lo, hi = Percentile(100.0)(x, Int(8, symmetric=False))
    assert (float(lo), float(hi)) == (1.0, 10000.0)
    for bad in (0.0, 100.5, -1.0):
        with pytest.raises(SpecError, match="percentile"):
            Percentile(bad)


def test_entropy_clips_heavy_tailed_activations():
    gen = torch.Generator().manual_seed(0)
    bulk = torch.randn(1, 200_000, generator=gen)
    outliers = (30 + 30 * torch.rand(1, 20, generator=gen)) * torch.sign(torch.randn(1, 20, generator=gen))
    lo, hi = Entropy()(torch.cat([bulk, outliers], dim=1), Int(8))
    assert 2.5 < float(hi) < 10.0  # rare 30-60x outliers clipped, the N(0, 1) bulk kept

    acts = torch.distributions.StudentT(3.0).sample((1, 200_000))
    lo, hi = Entropy()(acts, Int(8))
    top = float(acts.abs().max())
    assert float(hi) < 0.5 * top and float(hi) > 3.0  # clips the tail, keeps the bulk
    assert float(lo) == -float(hi)
    # And the clipped grid has lower error on the bulk (|x| < 4) than min-max.
    bulk = acts.abs() < 4
    err = {}
    for name, est in (("kl", Entropy()), ("minmax", MinMax())):
        qp = choose_qparams(acts, Int(8), PerTensor(), est)
        x_hat = dequantize(quantize(acts, Int(8), qp, PerTensor()), Int(8), qp, PerTensor(), acts.shape)
        err[name] = float(((acts - x_hat)[bulk] ** 2).mean())
    assert err["kl"] < err["minmax"]


def test_softmax_ce_keeps_the_largest_logits_in_order():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 1000, generator=gen)
    top = torch.tensor([9.0, 8.5, 8.0, 7.5, 7.0])
    logits[:, :5] = top + 0.1 * torch.randn(64, 5, generator=gen)
    fmt = Int(4)
    ce = {}
    for name, est in (("ce", SoftmaxCE()), ("mse", MSE()), ("minmax", MinMax())):
        qp = choose_qparams(logits, fmt, PerTensor(), est)
        fq = dequantize(quantize(logits, fmt, qp, PerTensor()), fmt, qp, PerTensor(), logits.shape)
        ce[name] = float(-(torch.softmax(logits, -1) * torch.log_softmax(fq, -1)).sum(-1).mean())
        if name == "ce":
            # The top logit survives: the argmax of every row is unchanged.
            assert torch.equal(fq.argmax(-1), logits.argmax(-1)) or (fq.max(-1).values == fq[:, 0]).all()
            assert float(qp.scale) * fmt.qmax >= 7.0  # the clip keeps the large logits unclipped
    assert ce["ce"] <= ce["mse"] + 1e-6 and ce["ce"] <= ce["minmax"] + 1e-6
    assert ce["ce"] < ce["mse"]


def test_observer_minmax_is_global_and_moving_average_follows_formula():
    batches = [torch.randn(4, 16) * (i + 1) for i in range(5)]
    obs = RangeObserver(MinMax())
    for b in batches:
        obs.update(b)
    lo, hi = obs.compute(Int(8))
    allx = torch.cat(batches)
    assert float(lo) == float(allx.min()) and float(hi) == float(allx.max())

    obs = RangeObserver(MovingMinMax(momentum=0.5))
    exp_lo, exp_hi = None, None
    for b in batches:
        obs.update(b)
        blo, bhi = float(b.min()), float(b.max())
        exp_lo = blo if exp_lo is None else 0.5 * exp_lo + 0.5 * blo
        exp_hi = bhi if exp_hi is None else 0.5 * exp_hi + 0.5 * bhi
    lo, hi = obs.compute(Int(8))
    assert abs(float(lo) - exp_lo) < 1e-5 and abs(float(hi) - exp_hi) < 1e-5


def test_observer_percentile_over_batches_matches_direct_and_is_seeded():
    batches = [torch.randn(256, 64) for _ in range(8)]
    direct = Percentile(99.9)(torch.cat(batches).reshape(1, -1), Int(8))[1]
    results = []
    for _ in range(2):
        obs = RangeObserver(Percentile(99.9), max_samples=1 << 16, seed=3)
        for b in batches:
            obs.update(b)
        results.append(float(obs.compute(Int(8))[1]))
    assert results[0] == results[1]
    assert abs(results[0] - float(direct)) / float(direct) < 0.05  # sub-sample of 1/2 of the data


def test_observer_per_channel_activations():
    x = torch.randn(32, 10) * torch.arange(1, 11)
    obs = RangeObserver(MinMax(), PerChannel(-1))
    obs.update(x)
    lo, hi = obs.compute(Int(8))
    assert torch.equal(hi, x.amax(dim=0)) and torch.equal(lo, x.amin(dim=0))


def test_observer_without_data_is_an_error():
    with pytest.raises(SpecError, match="no batch"):
        RangeObserver().compute(Int(8))


@pytest.mark.parametrize(
    "est",
    [MinMax(), MovingMinMax(0.8), Percentile(99.0), MSE(grid=10), Entropy(bins=256), SoftmaxCE(grid=7)],
    ids=lambda e: e.name,
)
def test_estimator_dict_round_trip(est):
    assert estimator_from_dict(estimator_to_dict(est)) == est
    assert estimator_from_dict(est.name) == type(est)()


def test_estimator_bad_input():
    with pytest.raises(SpecError, match="unknown"):
        estimator_from_dict("histogram")
    with pytest.raises(SpecError, match="unknown key"):
        estimator_from_dict({"type": "mse", "grids": 3})
    with pytest.raises(SpecError, match="grid"):
        MSE(grid=0)


def test_qparams_from_range_symmetric_uses_both_ends():
    qp = qparams_from_range(Int(8, full_range=True), torch.tensor([-2.0]), torch.tensor([1.0]))
    assert torch.isclose(qp.scale, torch.tensor(2.0 / 128))
