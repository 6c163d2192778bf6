"""GPTQ, HQQ, AWQ, outlier split and bias correction against round-to-nearest on small problems."""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.awq import awq_quantize
from lowbit.algorithms.gptq import gptq_quantize
from lowbit.algorithms.hqq import hqq_quantize
from lowbit.algorithms.outliers import outlier_channels
from lowbit.errors import SpecError
from lowbit.formats import Int, NormalFloat, Ternary
from lowbit.granularity import PerChannel, PerGroup, PerTensor
from lowbit.spec import QuantSpec
from lowbit.tensor import QTensor


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated channels and a few large ones, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d // 4, generator=gen) @ torch.randn(d // 4, d, generator=gen)
    x = base + 0.3 * torch.randn(n, d, generator=gen)
    x[:, :3] *= 8
    return x


def output_error(x, w, qt):
    return float(((x @ w.T - x @ qt.dequantize().T) ** 2).mean())


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(Int(4), PerChannel()),
        QuantSpec(Int(4, False), PerGroup(16)),
        QuantSpec(NormalFloat(4), PerGroup(32)),
        QuantSpec(Int(3), PerTensor()),
    ],
    ids=lambda s: s.name,
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_diagonal_hessian_is_round_to_nearest(spec, act_order):
    """No correlation between inputs: nothing to compensate, so GPTQ must equal RTN exactly
    (this also checks the act-order permutation and group bookkeeping)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 70, generator=gen)  # 70: a remainder group
    hessian = torch.diag(torch.rand(70, generator=gen) + 0.5)
    qt, _ = gptq_quantize(w, hessian, spec, damp=0.0, block_size=32, act_order=act_order)
    assert torch.equal(qt.codes(), QTensor.quantize(w, spec).codes())


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(Int(4, False), PerGroup(32)), QuantSpec(Int(3), PerChannel()), QuantSpec(NormalFloat(4), PerGroup(32))],
    ids=lambda s: s.name,
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(spec, act_order):
    x = correlated_inputs(2048, 96)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    hessian = 2 * x.T @ x / x.shape[0]
    qt, _ = gptq_quantize(w, hessian, spec, act_order=act_order, block_size=32)
    rtn = output_error(x, w, QTensor.quantize(w, spec))
    assert output_error(x, w, qt) < 0.7 * rtn


def test_gptq_refuses_formats_it_cannot_handle():
    with pytest.raises(SpecError, match="gptq"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), QuantSpec(Ternary(), PerChannel()))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(Int(2, False), PerGroup(64)),
        QuantSpec(Int(3, False), PerGroup(64)),
        QuantSpec(Int(4, False), PerChannel()),
    ],
    ids=lambda s: s.name,
)
def test_hqq_lowers_weight_error_with_integer_or_fractional_zeros(spec):
    """The default keeps integer (uint8) zero points, stored like round-to-nearest; zero="float" is
    the paper's fractional fp16 zero. Both lower the weight error against min-max RTN."""
    gen = torch.Generator().manual_seed(0)
    w = (
        torch.distributions.StudentT(4.0).sample((64, 256))
        if spec.format.bits < 4
        else torch.randn(64, 256, generator=gen)
    )
    rtn = QTensor.quantize(w, spec)
    rtn_err = float(((w - rtn.dequantize()) ** 2).mean())
    integer = hqq_quantize(w, spec)
    assert integer.zero_point.dtype == torch.uint8
    assert float(((w - integer.dequantize()) ** 2).mean()) < rtn_err
    fractional = hqq_quantize(w, spec, zero="float")
    assert fractional.zero_point.dtype == torch.float16
    assert float(((w - fractional.dequantize()) ** 2).mean()) < rtn_err
    with pytest.raises(SpecError, match="asymmetric"):
        hqq_quantize(w, QuantSpec(Int(4), PerGroup(64)))
    with pytest.raises(SpecError, match="zero='half'"):
        hqq_quantize(w, spec, zero="half")


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(Int(4, False), PerGroup(32)),
        QuantSpec(Int(3, False), PerGroup(32)),
        QuantSpec(NormalFloat(4), PerGroup(32)),
    ],
    ids=lambda s: s.name,
)
@pytest.mark.parametrize("duo", [False, True], ids=["x-scaling", "duo-scaling"])
def test_awq_is_never_worse_than_rtn_on_its_samples(spec, duo):
    x = correlated_inputs(512, 64, seed=3)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    result = awq_quantize(w, x, spec, grid=10, duo=duo)
    w_eff = result.qweight.dequantize() / result.smooth  # (x / s) W_q^T == x (W_q / s)^T
    err = float(((x @ w.T - x @ w_eff.T) ** 2).mean())
    assert err <= output_error(x, w, QTensor.quantize(w, spec)) * 1.0001
    assert torch.all(result.smooth > 0)


def test_outlier_channels_are_limited_and_sorted():
    absmax = torch.tensor([1.0, 9.0, 2.0, 30.0, 7.0, 0.5])
    assert outlier_channels(absmax, 6.0, 1.0).tolist() == [1, 3, 4]
    assert outlier_channels(absmax, 6.0, 0.34).tolist() == [1, 3]  # at most 2 of 6: the largest


def test_hqq_never_raises_the_per_group_weight_error_over_rtn():
    from lowbit.algorithms.hqq import fit_affine, hqq_quantize
    from lowbit.spec import QuantSpec
    from lowbit.tensor import QTensor

    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.rand(16, 1)
    w[3, 7] = 9.0  # an outlier group
    spec = QuantSpec.from_dict({"format": "int3-asym", "granularity": "group:64", "scale_dtype": "float16"})
    rtn = QTensor.quantize(w, spec).dequantize().float()
    for zero in ("integer", "float"):
        for protect in (False, True):
            hqq = hqq_quantize(w, spec, zero=zero, protect=protect).dequantize().float()
            err_rtn = ((w - rtn) ** 2).reshape(16, 4, 64).sum(-1)
            err_hqq = ((w - hqq) ** 2).reshape(16, 4, 64).sum(-1)
            assert (err_hqq <= err_rtn * (1 + 1e-3) + 1e-6).all(), (zero, protect)
            if protect:  # the largest weight of every group rounds within half a min-max step
                groups = w.reshape(16, 4, 64)
                step = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 7  # min-max step
                peak = groups.abs().argmax(-1, keepdim=True)
                peak_err = (w - hqq).reshape(16, 4, 64).gather(-1, peak).squeeze(-1).abs()
                assert (peak_err <= 0.5 * step * 1.01 + 1e-6).all(), zero
    # least squares recovers an exact affine grid
    gran = spec.granularity
    codes = torch.randint(0, 8, (4, 128)).float()
    scale, zero = torch.tensor([[0.5, 2.0]] * 4), torch.tensor([[3.25, 1.5]] * 4)
    w_exact = (codes - gran.expand(zero, codes.shape)) * gran.expand(scale, codes.shape)
    fitted_s, fitted_z = fit_affine(w_exact, codes, gran, torch.ones(4, 2), torch.zeros(4, 2))
    torch.testing.assert_close(fitted_s, scale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fitted_z, zero, rtol=1e-4, atol=1e-4)


def test_awq_with_gptq_rounding_equals_gptq_on_the_scaled_problem():
    """AWQ + GPTQ: the scaled weight W s rounded by GPTQ on the Hessian of x / s. With s fixed the
    codes equal GPTQ's on that problem, and the output error is below AWQ's round-to-nearest."""
    spec = QuantSpec(Int(4, False), PerGroup(32))
    x = correlated_inputs(2048, 96, seed=5)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(6))
    hessian = 2 * x.T @ x / x.shape[0]
    plain = awq_quantize(w, x, spec, grid=10)
    combined = awq_quantize(w, x, spec, grid=10, hessian=hessian)
    assert torch.equal(combined.smooth, plain.smooth)
    s = plain.smooth
    direct, _ = gptq_quantize(w * s, 2 * (x / s).T @ (x / s) / x.shape[0], spec, act_order=True)
    assert torch.equal(combined.qweight.codes(), direct.codes())

    def err(result):
        w_eff = result.qweight.dequantize() / result.smooth
        return float(((x @ w.T - x @ w_eff.T) ** 2).mean())

    assert err(combined) < err(plain)


def test_asymmetric_target_is_the_least_squares_map_from_seen_to_float_inputs():
    """W C H^-1 with (almost) no damping equals lstsq(X, X_f W^T): the weight whose outputs on the
    inputs the layer sees are closest to the float model's outputs W X_f."""
    from lowbit.algorithms.gptq import asymmetric_target

    x_float = correlated_inputs(1024, 32, seed=2).double()
    x_seen = x_float + 0.2 * torch.randn(x_float.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = torch.randn(12, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    n = x_float.shape[0]
    target = asymmetric_target(w, 2 * x_seen.T @ x_seen / n, 2 * x_float.T @ x_seen / n, damp=1e-12)
    expected = torch.linalg.lstsq(x_seen, x_float @ w.T).solution.T
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-8)
    h_float = 2 * x_float.T @ x_float / n
    same = asymmetric_target(w, h_float, h_float, damp=0.01)
    torch.testing.assert_close(same, w, rtol=1e-9, atol=1e-9)  # float inputs: the plain target, damping or not


def drifted_problem():
    """Inputs that drifted from the float model's (as after quantized blocks): (x_float, x_seen, w,
    statistics with the Hessian of x_seen, the cross term with x_float and a row sample)."""
    from lowbit.calibration import LayerStats

    x_float = correlated_inputs(2048, 96, seed=7)
    drift = torch.randn(96, 96, generator=torch.Generator().manual_seed(8)) * 0.05
    x_seen = x_float + x_float @ drift
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(9))
    stats = LayerStats(
        hessian_sum=(x_seen.T @ x_seen).double(),
        hessian_rows=2048,
        cross_sum=(x_float.T @ x_seen).double(),
        samples=x_seen[:1024],
    )
    return x_float, x_seen, w, stats


def test_asymmetric_gptq_lowers_the_error_against_float_outputs():
    """Inputs that drifted from the float model's (as after quantized blocks): GPTQ on the
    asymmetric target gets closer to W X_f than GPTQ on W, which only matches W X."""
    from lowbit.algorithms.gptq import gptq

    spec = QuantSpec(Int(4, False), PerGroup(32))
    x_float, x_seen, w, stats = drifted_problem()

    def err(qt):
        return float(((x_float @ w.T - x_seen @ qt.dequantize().T) ** 2).mean())

    plain = gptq(w, spec, stats)
    asymmetric = gptq(w, spec, stats, asymmetric=True)
    assert err(asymmetric) < 0.5 * err(plain)
    with pytest.raises(SpecError, match="asymmetric"):
        gptq(w, spec, stats, asymmetric="yes")


def test_asymmetric_awq_scales_and_rounds_the_float_output_target():
    """AWQ with ``asymmetric``: drifted inputs (as after quantized blocks) with the float model's
    inputs in the statistics. It searches and rounds GPTQ's least-squares target W C H^-1, with
    errors measured through the Hessian (all rows), so it lands closer to W X_f than plain AWQ;
    without cross statistics it keeps W as the target."""
    from lowbit.algorithms.awq import awq, hessian_rows
    from lowbit.algorithms.gptq import asymmetric_target
    from lowbit.calibration import LayerStats

    spec = QuantSpec(Int(4, False), PerGroup(32))
    x_float, x_seen, w, stats = drifted_problem()

    def err(result):
        w_eff = result.qweight.dequantize() / result.smooth
        return float(((x_float @ w.T - x_seen @ w_eff.T) ** 2).mean())

    plain, asymmetric = awq(w, spec, stats, grid=10), awq(w, spec, stats, grid=10, asymmetric=True)
    assert err(asymmetric) < 0.5 * err(plain)
    rows = hessian_rows(stats.hessian)
    torch.testing.assert_close(rows.T.double() @ rows.double(), stats.hessian, rtol=1e-4, atol=1e-4)
    target = asymmetric_target(w, stats.hessian, stats.cross, 0.01)
    direct = awq_quantize(target, rows, spec, grid=10)
    assert torch.equal(asymmetric.smooth, direct.smooth)
    assert torch.equal(asymmetric.qweight.codes(), direct.qweight.codes())
    no_cross = LayerStats(hessian_sum=stats.hessian_sum, hessian_rows=2048, samples=stats.samples)
    same = awq(w, spec, no_cross, grid=10, asymmetric=True)
    assert torch.equal(same.qweight.codes(), awq_quantize(w, rows, spec, grid=10).qweight.codes())
    with pytest.raises(SpecError, match="asymmetric"):
        awq(w, spec, stats, asymmetric="yes")


@pytest.mark.parametrize("groups", [2, 8], ids=["grouped", "depthwise"])
def test_gptq_on_grouped_convolutions_runs_per_group(groups):
    """A grouped (or depthwise) Conv2d: GPTQ per group on that group's block of the unfolded
    input's Hessian. Codes equal GPTQ on each group alone; the output error is below RTN's."""
    import torch.nn.functional as F

    from lowbit.algorithms.gptq import gptq
    from lowbit.calibration import LayerStats

    spec = QuantSpec(Int(3, False), PerChannel())
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, groups=groups, bias=False)
    x = correlated_inputs(4 * 64, 8, seed=11).reshape(4, 8, 8, 8)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 8 * 9).double()
    stats = LayerStats(hessian_sum=patches.T @ patches, hessian_rows=patches.shape[0])
    qt = gptq(conv.weight.detach(), spec, stats, groups=groups)
    cols, rows = 8 // groups * 9, 16 // groups
    part = conv.weight.detach().reshape(16, -1)[rows : 2 * rows]
    alone, _ = gptq_quantize(part, stats.hessian[cols : 2 * cols, cols : 2 * cols].float(), spec, act_order=True)
    assert torch.equal(qt.codes().reshape(16, -1)[rows : 2 * rows], alone.codes())

    def err(w):
        with torch.no_grad():
            return float(((F.conv2d(x, w, padding=1, groups=groups) - conv(x)) ** 2).mean())

    assert err(qt.dequantize()) < err(QTensor.quantize(conv.weight.detach(), spec).dequantize())
