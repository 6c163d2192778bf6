"""The numeric reference: round-trip bounds, monotone and idempotent codes, edge cases,
straight-through and LSQ gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import NonFiniteError
from lowbit.formats import Binary, Codebook, Float, Int, Log2, NormalFloat, Ternary
from lowbit.granularity import PerChannel, PerGroup, PerTensor, PerToken
from lowbit.primitives import (
    choose_qparams,
    dequantize,
    fake_quantize,
    fake_quantize_lsq,
    qparams_from_range,
    quantize,
)

INT_FORMATS = [Int(b, s) for b in (2, 3, 4, 8) for s in (True, False)]
INT_FORMATS += [Int(1, symmetric=False), Int(8, full_range=True)]
LUT_FORMATS = [NormalFloat(4), NormalFloat(2), Log2(4), Binary(), Ternary()]
FLOAT_FORMATS = [Float("fp8_e4m3"), Float("fp8_e5m2"), Float("fp16"), Float("bf16")]
ALL_FORMATS = INT_FORMATS + LUT_FORMATS + FLOAT_FORMATS
GRANS = [PerTensor(), PerChannel(0), PerGroup(5), PerToken()]

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
matrices = st.integers(1, 6).flatmap(
    lambda r: st.lists(st.lists(finite, min_size=7, max_size=7), min_size=r, max_size=r)
)


def _rt(x, fmt, gran):
    qp = choose_qparams(x, fmt, gran)
    codes = quantize(x, fmt, qp, gran)
    return qp, codes, dequantize(codes, fmt, qp, gran, x.shape)


@settings(max_examples=150, deadline=None)
@given(rows=matrices, fmt=st.sampled_from(INT_FORMATS), gran=st.sampled_from(GRANS))
def test_uniform_round_trip_within_half_a_step(rows, fmt, gran):
    x = torch.tensor(rows, dtype=torch.float32)
    qp, _, x_hat = _rt(x, fmt, gran)
    scale = gran.expand(qp.scale.float(), x.shape)
    # Tolerance: half a step, plus float32 rounding of x / scale (a few ulps of |x|).
    assert torch.all((x - x_hat).abs() <= scale / 2 + 4e-7 * x.abs() + 1e-30)


@settings(max_examples=150, deadline=None)
@given(rows=matrices, fmt=st.sampled_from(ALL_FORMATS), gran=st.sampled_from(GRANS))
def test_codes_are_idempotent(rows, fmt, gran):
    x = torch.tensor(rows, dtype=torch.float32)
    qp, codes, x_hat = _rt(x, fmt, gran)
    assert torch.equal(quantize(x_hat, fmt, qp, gran), codes)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(finite, min_size=2, max_size=64), fmt=st.sampled_from(ALL_FORMATS))
def test_codes_are_monotone(values, fmt):
    x = torch.tensor(sorted(values), dtype=torch.float32)
    qp = choose_qparams(x, fmt, PerTensor())
    codes = quantize(x, fmt, qp, PerTensor())
    decoded = dequantize(codes, fmt, qp, PerTensor(), x.shape)
    assert torch.all(decoded[1:] >= decoded[:-1])
    if not isinstance(fmt, Float):
        assert torch.all(codes[1:] >= codes[:-1])


@pytest.mark.parametrize("fmt", [*ALL_FORMATS, Codebook(16, 2)], ids=lambda f: f.name)
@pytest.mark.parametrize("value", [0.0, 3.25, -0.7, 1e-20])
def test_zero_and_constant_tensors_are_exact(fmt, value):
    gran = PerTensor() if isinstance(fmt, Codebook) else PerGroup(4)
    x = torch.full((3, 10), value)
    qp = choose_qparams(x, fmt, gran)
    # No division by zero: scales are finite and positive (binary: mean |w|, so 0 for zeros).
    floor = 0.0 if isinstance(fmt, Binary) and value == 0 else 1e-38
    assert qp.scale is None or bool(torch.isfinite(qp.scale).all() and (qp.scale >= floor).all())
    x_hat = dequantize(quantize(x, fmt, qp, gran), fmt, qp, gran, x.shape)
    if isinstance(fmt, Float) and not fmt.scaled:
        assert torch.equal(x_hat, x.to(fmt.torch_dtype).float())
    else:
        assert torch.equal(x_hat, x)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_empty_tensors(fmt):
    x = torch.zeros(0, 8)
    qp = choose_qparams(x, fmt, PerChannel())
    assert dequantize(quantize(x, fmt, qp, PerChannel()), fmt, qp, PerChannel(), x.shape).shape == (0, 8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_raise(bad):
    x = torch.randn(4, 4)
    x[1, 2] = bad
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        choose_qparams(x, Int(8), PerChannel(), name="layer.weight")


def test_symmetric_int_uses_restricted_range_and_asym_an_integer_zero():
    x = torch.tensor([[-1.0, 0.5, 1.0]])
    qp = choose_qparams(x, Int(8), PerTensor())
    assert qp.zero_point is None and torch.isclose(qp.scale, torch.tensor(1 / 127))
    codes = quantize(x, Int(8), qp, PerTensor()).int() + Int(8).qmin
    assert codes.tolist() == [[-127, 64, 127]]
    qp = choose_qparams(torch.tensor([[0.5, 2.0]]), Int(4, symmetric=False), PerTensor())
    assert qp.zero_point.dtype == torch.uint8 and int(qp.zero_point) == 0
    qp = choose_qparams(torch.tensor([[-1.0, 2.0]]), Int(2, symmetric=False), PerTensor())
    assert int(qp.zero_point) == 1 and torch.isclose(qp.scale, torch.tensor(1.0))


def test_ternary_follows_twn():
    w = torch.tensor([[0.1, -0.2, 1.0, -2.0, 0.05, 0.9]])
    qp = choose_qparams(w, Ternary(), PerTensor())
    delta = 0.7 * w.abs().mean()
    kept = w.abs() > delta
    assert torch.isclose(qp.scale, w.abs()[kept].mean())
    w_hat = dequantize(quantize(w, Ternary(), qp, PerTensor()), Ternary(), qp, PerTensor(), w.shape)
    assert torch.equal(w_hat, torch.sign(w) * kept * qp.scale)


def test_binary_scale_is_mean_abs():
    w = torch.randn(3, 16)
    qp = choose_qparams(w, Binary(), PerChannel())
    assert torch.allclose(qp.scale, w.abs().mean(dim=1))


def test_fp16_scales_fall_back_when_out_of_range():
    qp = qparams_from_range(Int(8), torch.tensor([-1e-9]), torch.tensor([1e-9]), torch.float16)
    assert qp.scale.dtype == torch.float32
    qp = qparams_from_range(Int(8), torch.tensor([-1.0]), torch.tensor([1.0]), torch.float16)
    assert qp.scale.dtype == torch.float16


@pytest.mark.parametrize(
    "fmt", [Int(4), Int(4, symmetric=False), NormalFloat(4), Float("fp8_e4m3")], ids=lambda f: f.name
)
def test_straight_through_gradient_is_one_inside_zero_outside(fmt):
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    qp = qparams_from_range(fmt, torch.tensor([-1.0]), torch.tensor([1.0]))
    fake_quantize(x, fmt, qp, PerTensor()).sum().backward()
    # The range [-1, 1] maps to the grid; Int adds half a step of rounding slack at each end.
    step = float(qp.scale) if isinstance(fmt, Int) else 0.0
    inside = (x.detach() >= -1 - step / 2 - 1e-6) & (x.detach() <= 1 + step / 2 + 1e-6)
    if isinstance(fmt, Int) and not fmt.symmetric:
        lo = (fmt.qmin - 0.5 - float(qp.zero_point)) * float(qp.scale)
        hi = (fmt.qmax + 0.5 - float(qp.zero_point)) * float(qp.scale)
        inside = (x.detach() >= lo) & (x.detach() <= hi)
    if isinstance(fmt, Float):
        inside = x.detach().abs() <= 1.0
    assert torch.equal(x.grad, inside.float())


def _ste_reference(x, scale, zero, fmt):
    """An independent LSQ: plain autograd with round() made straight-through."""
    v = x / scale + zero
    r = v + (torch.round(v) - v).detach()
    q = torch.clamp(r, fmt.qmin, fmt.qmax)
    return (q - zero) * scale


@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(0), PerGroup(8)], ids=lambda g: g.name)
def test_lsq_scale_gradient_matches_autograd_and_finite_differences(gran):
    fmt = Int(4)
    x = torch.randn(4, 16) * 2
    s0 = choose_qparams(x, fmt, gran).scale * 0.6  # narrow enough that some values clip
    w = torch.randn_like(x)  # upstream gradient

    scale = s0.clone().requires_grad_(True)
    (fake_quantize_lsq(x, scale, fmt, gran, grad_factor=1.0) * w).sum().backward()

    ref_scale = s0.clone().requires_grad_(True)
    (_ste_reference(x, gran.expand(ref_scale, x.shape), 0.0, fmt) * w).sum().backward()
    assert torch.allclose(scale.grad, ref_scale.grad, rtol=1e-5, atol=1e-5)

    # Finite differences of the surrogate the STE differentiates: rounding offsets frozen at s0.
    def surrogate(s):
        s_full = gran.expand(s, x.shape)
        s0_full = gran.expand(s0, x.shape)
        v0 = x / s0_full
        q0 = torch.clamp(torch.round(v0), fmt.qmin, fmt.qmax)
        inside = (v0 >= fmt.qmin - 0.5) & (v0 <= fmt.qmax + 0.5)
        out = torch.where(inside, s_full * (q0 - v0) + x, s_full * q0)
        return (out * w).sum()

    eps = 1e-3
    fd = torch.zeros_like(s0)
    for i in range(s0.numel()):
        d = torch.zeros_like(s0).view(-1)
        d[i] = eps
        d = d.view_as(s0)
        fd.view(-1)[i] = (surrogate(s0 + d) - surrogate(s0 - d)) / (2 * eps)
    assert torch.allclose(scale.grad, fd, rtol=1e-3, atol=1e-3)


def test_lsq_default_grad_factor_and_zero_point_gradient():
    fmt = Int(4, symmetric=False)
    x = torch.randn(64) * 3
    qp = choose_qparams(x, fmt, PerTensor())
    scale = (qp.scale * 0.5).requires_grad_(True)
    zero = qp.zero_point.float().requires_grad_(True)
    out = fake_quantize_lsq(x, scale, fmt, PerTensor(), zero_point=zero)
    out.sum().backward()
    v = x / scale.detach() + zero.detach()
    clipped = (v < fmt.qmin - 0.5) | (v > fmt.qmax + 0.5)
    assert torch.isclose(zero.grad, -(scale.detach() * clipped).sum())
    assert scale.grad is not None and torch.isfinite(scale.grad).all()
