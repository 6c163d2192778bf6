"""W8A8 CPU kernels against the numeric reference.

Tolerances: activation codes and per-token scales are bit-identical to lowbit.primitives. Outputs
are checked two ways: against the exact integer result (codes multiplied in int64, scaled in
float64) to a few float32 ulps, and against the reference kernel to 1e-5 of sum |x_dq| |w_dq| + |b|
(float32 summation order) or 1e-2 of it for bfloat16 (the reference runs its matmul in bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lowbit import kernels
from lowbit.formats import Int
from lowbit.granularity import PerChannel, PerTensor, PerToken
from lowbit.kernels import cpu_int8
from lowbit.kernels.reference import quantize_input
from lowbit.nn import QConv2d, QLinear
from lowbit.primitives import QParams, choose_qparams, qparams_from_range, quantize
from lowbit.ranges import Percentile
from lowbit.recipe import ActivationSpec
from lowbit.spec import QuantSpec
from lowbit.tensor import QTensor

native = pytest.mark.skipif(not kernels.native_available(), reason="needs the AVX-512 VNNI native kernels")
DYNAMIC = ActivationSpec("dynamic", Int(8))
STATIC_SYM = ActivationSpec("static", Int(8))
STATIC_ASYM = ActivationSpec("static", Int(8, symmetric=False))


def make_layer(cls, weight, activation, bias=None, smooth=None, calib=None, **conv):
    """A QLinear / QConv2d with int8 per-channel weights; static layers calibrated on ``calib``."""
    layer = cls(QTensor.quantize(weight, QuantSpec(Int(8), PerChannel())), activation, bias, **conv)
    if smooth is not None:
        layer.set_input_smooth(smooth)
    if activation.mode == "static":
        seen = calib.movedim(1, -1) if cls is QConv2d else calib
        seen = seen if smooth is None else seen / smooth
        qp = qparams_from_range(activation.format, seen.min().reshape(1), seen.max().reshape(1))
        layer.set_input_qparams(qp.scale, qp.zero_point)
    return layer


def run_with(kernel: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    old = os.environ.get("LOWBIT_KERNEL")
    os.environ["LOWBIT_KERNEL"] = kernel
    try:
        assert kernels.select(layer.op, layer, x).name == kernel
        return layer(x)
    finally:
        if old is None:
            del os.environ["LOWBIT_KERNEL"]
        else:
            os.environ["LOWBIT_KERNEL"] = old


def reference_bound(layer: QLinear, x: torch.Tensor) -> torch.Tensor:
    """sum_k |x_dq| |w_dq| + |b|: the scale of float32 summation-order differences."""
    xq = quantize_input(x.float(), layer).abs()
    bound = xq @ layer.qweight.dequantize(torch.float32).abs().T
    return bound + (0 if layer.bias is None else layer.bias.abs())


def assert_close_to_reference(layer, x, y, rel):
    ref = run_with("reference", layer, x)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs()
    assert bool((err <= rel * reference_bound(layer, x) + 1e-30).all()), float((err / reference_bound(layer, x)).max())


# ---------------------------------------------------------------------------------------------
# Activation codes


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 4096), (2, 7), (3, 63), (5, 100), (17, 64), (300, 129), (2, 3, 40), (2, 8192), (2, 8209)]
)
def test_per_token_codes_equal_primitives(shape, smooth, dtype):
    x = (torch.randn(shape) * torch.logspace(-3, 3, shape[-1])).to(dtype)
    s = torch.rand(shape[-1]) + 0.25 if smooth else None
    seen = x if s is None else x / s.to(dtype)
    qp = choose_qparams(seen, Int(8), PerToken())
    codes, scales = torch.ops.lowbit.w8a8_quantize(x, s, None, None)
    assert torch.equal(scales, qp.scale.reshape(scales.shape))
    assert torch.equal(codes.to(torch.int16) - 128, quantize(seen, Int(8), qp, PerToken()).to(torch.int16) - 127)


@native
@pytest.mark.parametrize("smooth", ["none", "moderate", "extreme"])
def test_per_token_codes_near_rounding_ties_equal_primitives(smooth):
    """The kernel divides by multiplying with reciprocals plus one FMA correction (Markstein); the
    codes must still be the IEEE division's, also next to .5 ties and for divisors whose
    reciprocal is not a normal number (those lanes divide)."""
    torch.manual_seed(0)
    rows, K = 600, 257
    scale = torch.rand(rows, 1) * 3 + 1e-3
    ties = (torch.randint(-126, 126, (rows, K)) + 0.5) * scale
    ulp = torch.randint(-2, 3, (rows, K)).float()
    x = torch.nextafter(ties, ties + ulp)  # the ties themselves and their neighbours
    x[:, 0] = 127 * scale[:, 0]  # fixes each row's scale
    s = None
    if smooth == "moderate":
        s = torch.rand(K) * 4 + 0.01
        x = x * s
    elif smooth == "extreme":
        s = torch.rand(K) + 0.5
        s[:8] = torch.tensor([1.0, 1e-38, 3e-39, 2e38, 1e30, 1e-30, 0.1, 3.0])  # 3e-39, 2e38: no normal reciprocal
        x[:, 1:8] = x[:, 1:8] / 400 * s[1:8]  # x / s stays finite
    seen = x if s is None else x / s
    qp = choose_qparams(seen, Int(8), PerToken())
    codes, scales = torch.ops.lowbit.w8a8_quantize(x, s, None, None)
    assert torch.equal(scales, qp.scale.reshape(scales.shape))
    assert torch.equal(codes.to(torch.int16) - 128, quantize(seen, Int(8), qp, PerToken()).to(torch.int16) - 127)


@native
def test_per_token_codes_edge_rows():
    x = torch.tensor(
        [
            [0.0, 0.0, 0.0],  # all zero: scale 1
            [-2.5, -2.5, -2.5],  # constant: scale |c|
            [127.0, 2.5, -3.5],  # scale exactly 1: ties round half to even
            [-127.0, 0.5, 1.5],
            [1e-30, -1e-30, 3e-31],  # tiny
        ]
    )
    qp = choose_qparams(x, Int(8), PerToken())
    codes, scales = torch.ops.lowbit.w8a8_quantize(x, None, None, None)
    assert torch.equal(scales, qp.scale)
    assert torch.equal(codes.to(torch.int16) - 128, quantize(x, Int(8), qp, PerToken()).to(torch.int16) - 127)
    assert codes[2].tolist() == [255, 130, 124] and codes[3].tolist() == [1, 128, 130]


@native
@pytest.mark.parametrize("fmt", [Int(8), Int(8, symmetric=False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_tensor_codes_equal_primitives(fmt, dtype):
    x = (torch.randn(37, 70) * 3).to(dtype)
    s = torch.rand(70) + 0.5
    seen = x / s.to(dtype)
    qp = qparams_from_range(fmt, torch.tensor([-4.0]), torch.tensor([6.0]))  # some values clip
    codes, _ = torch.ops.lowbit.w8a8_quantize(x, s, qp.scale, qp.zero_point)
    expected = quantize(seen, fmt, qp, PerTensor()).to(torch.int16) + fmt.qmin
    shift = 128 if fmt.symmetric else 0
    assert torch.equal(codes.to(torch.int16) - shift, expected)


# ---------------------------------------------------------------------------------------------
# Linear


def exact_output(layer: QLinear, x: torch.Tensor) -> torch.Tensor:
    """The W8A8 result computed exactly: integer codes in int64, scales and bias in float64."""
    spec = layer.activation
    seen = x.reshape(-1, x.shape[-1])
    if layer.input_smooth is not None:
        seen = seen / layer.input_smooth.to(x.dtype)
    if spec.mode == "dynamic":
        qp = choose_qparams(seen, spec.format, PerToken())
        zero, scale = 0, qp.scale.double().reshape(-1, 1)
    else:
        qp = QParams(layer.input_scale, layer.input_zero_point)
        zero, scale = (0 if qp.zero_point is None else int(qp.zero_point)), float(qp.scale)
    q = quantize(seen, spec.format, qp, spec.resolved_granularity).long() + spec.format.qmin - zero
    w = cpu_int8.weight_codes(layer).long()
    y = (q @ w.T).double() * scale * layer.scale.double()
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.reshape(*x.shape[:-1], -1)


LINEAR_CASES = [  # (M shape, K, N)
    ((1,), 4096, 64),
    ((2,), 100, 33),
    ((3,), 37, 7),
    ((5,), 64, 96),
    ((17,), 129, 31),
    ((64,), 200, 65),
    ((300,), 96, 40),
    ((2, 9), 72, 50),
]


@native
@pytest.mark.parametrize("activation", [DYNAMIC, STATIC_SYM, STATIC_ASYM], ids=["dynamic", "static", "static-u8"])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead,K,N", LINEAR_CASES)
def test_native_linear_matches_reference(lead, K, N, bias, smooth, activation):
    x = torch.randn(*lead, K) * 2
    layer = make_layer(
        QLinear,
        torch.randn(N, K) / K**0.5,
        activation,
        torch.randn(N) if bias else None,
        torch.rand(K) + 0.5 if smooth else None,
        calib=torch.randn(64, K) * 2,
    )
    y = run_with("cpu-int8", layer, x)
    exact = exact_output(layer, x)
    assert torch.allclose(y.double(), exact, rtol=2e-6, atol=1e-6 * float(exact.abs().max()))
    assert_close_to_reference(layer, x, y, rel=1e-5)


@native
@pytest.mark.parametrize("activation", [DYNAMIC, STATIC_ASYM], ids=["dynamic", "static-u8"])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_native_linear_bf16(rows, activation):
    K, N = 200, 48
    x = (torch.randn(rows, K) * 2).to(torch.bfloat16)
    layer = make_layer(
        QLinear,
        torch.randn(N, K) / K**0.5,
        activation,
        torch.randn(N),
        torch.rand(K) + 0.5,
        calib=torch.randn(64, K) * 2,
    )
    y = run_with("cpu-int8", layer, x)
    exact = exact_output(layer, x)  # same codes: only the final bf16 rounding differs
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.double(), exact, rtol=2**-8, atol=1e-6)
    assert_close_to_reference(layer, x, y, rel=1e-2)


NEVER = 1 << 40  # a row threshold no input reaches


@native
@pytest.mark.parametrize("rows", [1, 8, 9, 30, 300])
def test_small_gemm_and_onednn_paths_agree(rows):
    K, N = 260, 70
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    packed, sums = torch.ops.lowbit.w8a8_pack(w)
    onednn = torch.ops.onednn.qlinear_prepack(w, None)
    scale, bias, smooth = torch.rand(N) / 100, torch.randn(N), torch.rand(K) + 0.5
    x = torch.randn(rows, K)
    for x_scale, zero in [(None, None), (torch.tensor([0.02]), None), (torch.tensor([0.02]), torch.tensor([100]))]:
        args = (x, packed, sums, scale, bias, smooth, x_scale, zero)
        own = torch.ops.lowbit.w8a8_linear(*args, None, 1, NEVER)
        dnn = torch.ops.lowbit.w8a8_linear(*args, onednn, 1, NEVER)
        assert torch.allclose(own, dnn, rtol=1e-5, atol=1e-5 * float(own.abs().max()))


amx = pytest.mark.skipif(
    not (cpu_int8._load_native() and cpu_int8._amx_available()), reason="needs a CPU with AMX int8"
)


@native
@amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("rows", "K", "N"),
    [(1, 4, 1), (8, 64, 32), (15, 65, 33), (16, 128, 31), (17, 260, 70), (33, 1000, 64), (200, 384, 100), (300, 61, 7)],
)
def test_amx_gemm_equals_vnni_gemm(rows, K, N, dtype):
    """Both sum the same integer products exactly and share the epilogue: outputs bit-equal, for
    shapes that leave partial tiles in every dimension (rows vs 16, K vs 64, N vs 32)."""
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w[0] = 127  # extreme sums
    packed, sums = torch.ops.lowbit.w8a8_pack(w)
    scale, bias, smooth = torch.rand(N) / 100, torch.randn(N), torch.rand(K) + 0.5
    x = (torch.randn(rows, K) * 3).to(dtype)
    x[0] = 1e3  # all codes at +-127
    for x_scale, zero in [(None, None), (torch.tensor([0.02]), None), (torch.tensor([0.02]), torch.tensor([100]))]:
        args = (x, packed, sums, scale, bias, smooth, x_scale, zero, None, NEVER)
        tiles = torch.ops.lowbit.w8a8_linear(*args, 1)
        vnni = torch.ops.lowbit.w8a8_linear(*args, NEVER)
        assert tiles.dtype == dtype
        assert torch.equal(tiles, vnni)
        # a copy of the packed weight lacks the slack the last K tile may read: still right
        copied = torch.ops.lowbit.w8a8_linear(x, packed.clone(), *args[2:], 1)
        assert torch.equal(copied, vnni)


@native
@amx
def test_amx_gemm_matches_exact_output_and_threads():
    """Many rows (work split over threads by row chunk and panel) against exact integer sums."""
    layer = make_layer(QLinear, torch.randn(1536, 384) / 20, DYNAMIC, torch.randn(1536), None, calib=None)
    x = torch.randn(2, 333, 384)
    y = run_with("cpu-int8", layer, x)
    exact = exact_output(layer, x)
    assert torch.allclose(y.double(), exact, rtol=2e-6, atol=1e-6 * float(exact.abs().max()))


@native
@pytest.mark.parametrize("rows", [1, 5, 8, 31, 64, 65, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amx_min_rows", [1, NEVER])
def test_grouped_layers_equal_separate_calls(rows, dtype, amx_min_rows):
    """w8a8_linear_pair / _triple (layers reading one input, quantized once per distinct divisor,
    scale and zero point) give each layer's w8a8_linear output bit for bit: dynamic, static and
    static-uint8 activations, with and without bias, without divisors, with one shared and with
    one per layer, static scales shared or per layer, on the VNNI GEMM and (where the CPU has it) AMX."""
    K = 131
    weights = []
    for n in (33, 131, 7):
        packed, sums = torch.ops.lowbit.w8a8_pack(torch.randint(-127, 128, (n, K), dtype=torch.int8))
        weights.append((packed, sums, torch.rand(n) / 50, torch.randn(n)))
    x = (torch.randn(2, rows, K) * 2).to(dtype)
    s1, s2 = torch.tensor([0.03]), torch.tensor([0.05])
    z1, z2 = torch.tensor([90]), torch.tensor([120])
    statics = [[None] * 3, [s1] * 3, [s1, s2, s1]]
    for x_scales, x_zeros in [(s, [None] * 3) for s in statics] + [([s1] * 3, [z1] * 3), ([s1, s1, s2], [z1, z2, z1])]:
        shared = torch.rand(K) + 0.5
        for smooths in ([None] * 3, [shared] * 3, [shared, torch.rand(K) + 0.5, shared]):
            for biased in (True, False):
                for op, count in ((torch.ops.lowbit.w8a8_linear_pair, 2), (torch.ops.lowbit.w8a8_linear_triple, 3)):
                    ws = weights[:count]
                    lists = [
                        [] if values[0] is None else values[:count]
                        for values in ([w[3] for w in ws] if biased else [None], smooths, x_scales, x_zeros)
                    ]
                    got = op(x, [w[0] for w in ws], [w[1] for w in ws], [w[2] for w in ws], *lists, amx_min_rows)
                    for i, (y, (packed, sums, scale, b)) in enumerate(zip(got, ws)):
                        args = (b if biased else None, smooths[i], x_scales[i], x_zeros[i], None, NEVER, amx_min_rows)
                        want = torch.ops.lowbit.w8a8_linear(x, packed, sums, scale, *args)
                        assert y.dtype == dtype and torch.equal(y, want)


@native
def test_grouped_layers_reject_mismatched_lists():
    packed, sums = torch.ops.lowbit.w8a8_pack(torch.ones(4, 8, dtype=torch.int8))
    x, scale = torch.randn(3, 8), torch.ones(4)
    three = ([packed] * 3, [sums] * 3, [scale] * 3)
    two = ([packed] * 2, [sums] * 2, [scale] * 2)
    with pytest.raises(RuntimeError, match="takes two layers"):
        torch.ops.lowbit.w8a8_linear_pair(x, *three, [], [], [], [], 8)
    with pytest.raises(RuntimeError, match="or one per layer"):
        torch.ops.lowbit.w8a8_linear_pair(x, *two, [scale], [], [], [], 8)
    with pytest.raises(RuntimeError, match="zero points need scales"):
        torch.ops.lowbit.w8a8_linear_pair(x, *two, [], [], [], [torch.tensor([3])] * 2, 8)
    with pytest.raises(RuntimeError, match="smooth must be a contiguous float32"):
        torch.ops.lowbit.w8a8_linear_pair(x, *two, [], [scale] * 2, [], [], 8)
    with pytest.raises(RuntimeError, match="repack the weight"):
        torch.ops.lowbit.w8a8_linear_pair(torch.randn(3, 9), *two, [], [], [], [], 8)


@native
def test_pack_layout_and_row_sums():
    w = torch.randint(-127, 128, (33, 10), dtype=torch.int8)
    packed, sums = torch.ops.lowbit.w8a8_pack(w)
    assert packed.numel() == 64 * 12 and sums.shape == (64,)
    assert torch.equal(sums[:33], w.sum(1, dtype=torch.int32)) and not sums[33:].any()
    panels = packed.view(2, 3, 32, 4)  # [N/32][K/4][32][4]
    assert torch.equal(panels[0, 1, 5], w[5, 4:8]) and torch.equal(panels[1, 2, 0, :2], w[32, 8:10])


# ---------------------------------------------------------------------------------------------
# Conv2d


@native
@pytest.mark.parametrize("activation", [DYNAMIC, STATIC_ASYM], ids=["dynamic", "static-u8"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_native_pointwise_conv(activation, stride, channels_last):
    x = torch.randn(2, 24, 7, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layer = make_layer(
        QConv2d,
        torch.randn(40, 24, 1, 1) / 5,
        activation,
        torch.randn(40),
        torch.rand(24) + 0.5,
        calib=torch.randn(4, 24, 7, 9),
        stride=(stride, stride),
    )
    y = run_with("cpu-int8", layer, x)
    ref = run_with("reference", layer, x)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@native
@pytest.mark.parametrize("groups,stride,padding", [(1, 1, 1), (1, 2, 0), (16, 1, 1), (16, 2, 1)])
@pytest.mark.parametrize("activation", [STATIC_SYM, STATIC_ASYM], ids=["static", "static-u8"])
def test_native_kxk_conv_static(groups, stride, padding, activation):
    x = torch.randn(2, 16, 11, 10)
    layer = make_layer(
        QConv2d,
        torch.randn(32, 16 // groups, 3, 3) / 4,
        activation,
        torch.randn(32),
        torch.rand(16) + 0.5,
        calib=torch.randn(4, 16, 11, 10),
        stride=(stride, stride),
        padding=(padding, padding),
        groups=groups,
    )
    y = run_with("cpu-int8", layer, x)
    ref = run_with("reference", layer, x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@native
def test_kxk_conv_with_dynamic_activations_falls_back_to_reference():
    layer = make_layer(QConv2d, torch.randn(8, 4, 3, 3), DYNAMIC, padding=(1, 1))
    assert kernels.select("conv2d", layer, torch.randn(1, 4, 5, 5)).name == "reference"


# ---------------------------------------------------------------------------------------------
# Registry: what falls through, forcing, the portable kernel


@native
def test_selection_and_fall_through():
    x = torch.randn(3, 16)
    assert kernels.select("linear", make_layer(QLinear, torch.randn(8, 16), DYNAMIC), x).name == "cpu-int8"
    unsupported = [
        ActivationSpec("dynamic", Int(8), PerTensor()),  # per-tensor dynamic
        ActivationSpec("dynamic", Int(4)),
        ActivationSpec("dynamic", Int(8), range=Percentile(99.0)),
    ]
    for spec in unsupported:  # not integer GEMMs: the reference, or the AVX2 kernel on the reference's codes
        layer = make_layer(QLinear, torch.randn(8, 16), spec)
        assert kernels.select("linear", layer, x).name in ("reference", "cpu-avx2-w8a8")
        torch.testing.assert_close(layer(x), run_with("reference", layer, x), rtol=1e-5, atol=1e-5)
    weight_only = kernels.select("linear", make_layer(QLinear, torch.randn(8, 16), ActivationSpec()), x).name
    assert weight_only not in ("cpu-int8", "cpu-int8-portable")  # a weight-only kernel, never W8A8
    layer = make_layer(QLinear, torch.randn(8, 16), DYNAMIC)
    assert kernels.select("linear", layer, x.double()).name == "reference"
    assert run_with("reference", layer, x).shape == (3, 8)


@pytest.mark.parametrize("activation", [DYNAMIC, STATIC_SYM, STATIC_ASYM], ids=["dynamic", "static", "static-u8"])
@pytest.mark.parametrize("lead,K,N", [((1,), 40, 9), ((3, 5), 33, 20), ((64,), 128, 17)])
def test_portable_linear_matches_reference(lead, K, N, activation):
    x = torch.randn(*lead, K)
    layer = make_layer(
        QLinear, torch.randn(N, K) / K**0.5, activation, torch.randn(N), torch.rand(K) + 0.5, calib=torch.randn(64, K)
    )
    y = run_with("cpu-int8-portable", layer, x)
    exact = exact_output(layer, x)
    assert torch.allclose(y.double(), exact, rtol=2e-6, atol=1e-6 * float(exact.abs().max()))
    assert_close_to_reference(layer, x, y, rel=1e-5)


def test_portable_kernel_is_chosen_without_native_code():
    script = (
        "import torch; from lowbit import kernels; from lowbit.formats import Int; from lowbit.nn import QLinear;"
        "from lowbit.granularity import PerChannel; from lowbit.recipe import ActivationSpec;"
        "from lowbit.spec import QuantSpec; from lowbit.tensor import QTensor;"
        "q = QLinear(QTensor.quantize(torch.randn(8, 16), QuantSpec(Int(8), PerChannel())),"
        " ActivationSpec('dynamic', Int(8)));"
        "x = torch.randn(2, 16); k = kernels.select('linear', q, x);"
        "assert not kernels.native_available() and k.name == 'cpu-int8-portable', k.name;"
        "print(q(x).shape)"
    )
    env = {**os.environ, "LOWBIT_NATIVE": "0"}
    env.pop("LOWBIT_KERNEL", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([2, 8])" in out.stdout


# ---------------------------------------------------------------------------------------------
# torch.compile and a real model


@native
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16))
    for i in (0, 2):
        layer = model[i]
        smooth = torch.rand(layer.in_features) + 0.5
        model[i] = make_layer(QLinear, layer.weight.detach(), DYNAMIC, layer.bias.detach(), smooth)
    compiled = torch.compile(model, fullgraph=True)
    for rows in (1, 3, 40):  # the small-M GEMM and oneDNN
        x = torch.randn(rows, 32)
        assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-6)


@native
@pytest.mark.slow
def test_minilm_native_matches_reference():
    """Whole MiniLM under int8-dynamic (SmoothQuant), native kernels against the reference.

    Layer by layer, on the activations the reference run saw: identical codes and outputs within
    1e-5 of sum |x_dq| |w_dq| + |b|. End to end, a code can flip where a float-rounding difference
    meets a rounding boundary, and flips compound over six layers (the reference itself drifts as
    much when its layer inputs move by one ulp), so sentence embeddings are held to cosine > 0.999."""
    import lowbit

    loaded = lowbit.load_model("builtin:minilm")
    lowbit.quantize(loaded, "int8-dynamic")
    texts = ["int8 kernels must agree with the reference", "a second sentence, longer, with more words in it"]
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    layers = {name: m for name, m in loaded.model.named_modules() if isinstance(m, QLinear)}
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = (args[0], output)

        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in layers.items()]
    with torch.inference_mode():
        os.environ["LOWBIT_KERNEL"] = "reference"
        try:
            ref_out = loaded.model(**batch).last_hidden_state
        finally:
            del os.environ["LOWBIT_KERNEL"]
        for hook in hooks:
            hook.remove()
        for name, (x, ref_y) in seen.items():
            layer = layers[name]
            assert kernels.select("linear", layer, x).name == "cpu-int8"
            smoothed = x / layer.input_smooth
            qp = choose_qparams(smoothed, Int(8), PerToken())
            codes, _ = torch.ops.lowbit.w8a8_quantize(x, layer.input_smooth, None, None)
            expected = quantize(smoothed, Int(8), qp, PerToken()).to(torch.int16) - 127
            assert torch.equal(codes.to(torch.int16) - 128, expected), name
            assert bool(((layer(x) - ref_y).abs() <= 1e-5 * reference_bound(layer, x)).all()), name
        native_out = loaded.model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = [torch.nn.functional.normalize((h * mask).sum(1), dim=-1) for h in (native_out, ref_out)]
    cos = (pooled[0] * pooled[1]).sum(-1)
    assert bool((cos > 0.999).all()), cos
