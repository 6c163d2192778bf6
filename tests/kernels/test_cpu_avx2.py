"""The AVX2 + FMA weight-only kernel (``cpu-avx2``) against the reference kernel.

The kernel computes in fp32 from the same codes, scales and zero points as the reference; only
the summation order differs, so fp32 outputs must reach an SQNR of 100 dB (measured: about
120 dB) on the GEMV path and on the fp32 dequantize + at::mm path; bf16 inputs and outputs are
bf16-rounded (45 dB). One token with 1-4 bit codes, and fewer than DEQUANT_FROM tokens with 5-8 bit
codes, run on int16 activations (rounded per segment of the group to |q| <= 32639): their floor is
70 dB (measured: 87-96 dB on Gaussian inputs, 76.8 dB with a 50x outlier in a segment of 192).
W8A8 layers with few tokens sum activation codes x weight codes exactly in int32 (within 1e-6 of the
float64 sum; measured 4e-8 to 9e-8). Skipped on CPUs without AVX2/FMA/F16C or where the library
cannot be built.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_cpu_weightonly import _module  # the same random layers as the AVX-512 kernel tests

from lowbit import kernels
from lowbit.algorithms.hqq import hqq_quantize
from lowbit.evaluation.weights import sqnr_db
from lowbit.formats import Binary, Int, Log2, NormalFloat, Ternary
from lowbit.granularity import PerChannel, PerGroup, PerTensor
from lowbit.kernels import cpu_avx2, native_available, reference
from lowbit.nn import QLinear
from lowbit.recipe import ActivationSpec
from lowbit.spec import QuantSpec
from lowbit.tensor import QTensor

avx2 = pytest.mark.skipif(not cpu_avx2._ready(), reason="AVX2 kernels unavailable on this machine")

FP32_FLOOR = 100.0
INT16_FLOOR = 70.0  # the int16 activation paths (a 50x outlier input: 76.8 dB)
BF16_FLOOR = 45.0
M_VALUES = (1, 2, 3, 4, 5, 8, 9, cpu_avx2.DEQUANT_FROM - 1, cpu_avx2.DEQUANT_FROM, 300)
SHAPES = ((33, 300), (48, 256))  # (N, K): odd N and a K that is no multiple of 32 or of the group; aligned
CASES = [
    ("w4-asym-g128-fp16", Int(4, symmetric=False), PerGroup(128), "float16"),
    ("w4-sym-g64", Int(4), PerGroup(64), "float32"),
    ("w4-full-g32", Int(4, full_range=True), PerGroup(32), "float16"),
    ("w4-asym-channel", Int(4, symmetric=False), PerChannel(), "float32"),
    ("w3-asym-g128", Int(3, symmetric=False), PerGroup(128), "float16"),
    ("w2-asym-g64", Int(2, symmetric=False), PerGroup(64), "float16"),
    ("w1-asym-g32", Int(1, symmetric=False), PerGroup(32), "float32"),
    ("w8-channel", Int(8), PerChannel(), "float32"),
    ("w8-asym-channel-fp16", Int(8, symmetric=False), PerChannel(), "float16"),
    ("w8-g256", Int(8), PerGroup(256), "float16"),
    ("w8-tensor", Int(8), PerTensor(), "float32"),
    ("w6-channel", Int(6), PerChannel(), "float32"),
    ("w5-asym-g32", Int(5, symmetric=False), PerGroup(32), "float16"),
    ("nf4-g64", NormalFloat(4), PerGroup(64), "float16"),
    ("nf3-g128", NormalFloat(3), PerGroup(128), "float32"),
    ("nf2-channel", NormalFloat(2), PerChannel(), "float32"),
    ("log2-4-g32", Log2(4), PerGroup(32), "float16"),
    ("binary-g64", Binary(), PerGroup(64), "float32"),
    ("ternary-channel", Ternary(), PerChannel(), "float32"),
]


def _check(module: QLinear, label: str, three_d: bool) -> None:
    n, k = module.weight_shape
    for m in M_VALUES:
        bits = module.weight_format.bits
        int16 = m == 1 if bits <= 4 else m < cpu_avx2.DEQUANT_FROM
        fp32_floor = INT16_FLOOR if int16 else FP32_FLOOR
        for dtype, floor in ((torch.float32, fp32_floor), (torch.bfloat16, BF16_FLOOR)):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            if three_d and m % 3 == 0:
                x = x.view(3, m // 3, k)
            x = x.to(dtype)
            assert cpu_avx2._available(module, x)
            y = cpu_avx2.avx2_linear(module, x)
            assert y.dtype == dtype and y.shape == (*x.shape[:-1], n)
            got = sqnr_db(reference.linear(module, x.float()), y.float())
            assert got >= floor, f"{label} M={m} {dtype}: SQNR {got:.1f} dB < {floor} dB"


@avx2
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(("name", "fmt", "gran", "scale_dtype"), CASES, ids=[c[0] for c in CASES])
def test_avx2_matches_reference(name, fmt, gran, scale_dtype, shape):
    n, k = shape
    odd = shape == SHAPES[0]  # the odd shape also carries bias, input_smooth and 3-D inputs
    _check(_module(fmt, gran, scale_dtype, n, k, bias=odd, smooth=odd), f"{name} {shape}", three_d=odd)


@avx2
def test_avx2_runs_fractional_zero_points():
    """HQQ's fp16 fractional zero points are used as they are (value = scale * (code - zero))."""
    gen = torch.Generator().manual_seed(3)
    for fmt, gran in ((Int(4, symmetric=False), PerGroup(64)), (Int(3, symmetric=False), PerGroup(128))):
        qt = hqq_quantize(
            torch.randn(33, 300, generator=gen), QuantSpec(fmt, gran, scale_dtype="float16"), zero="float"
        )
        assert not torch.equal(qt.zero_point.float(), torch.round(qt.zero_point.float()))
        module = QLinear(qt, ActivationSpec(), torch.randn(33, generator=gen))
        _check(module, f"hqq {fmt.name}", three_d=True)


@avx2
def test_avx2_dequantize_is_exact():
    """The fp32 weight the kernel's prefill path multiplies equals the reference dequantization bit for bit."""
    for fmt, gran, sd in [
        (Int(4, symmetric=False), PerGroup(128), "float16"),
        (Int(8), PerChannel(), "float32"),
        (Int(3, symmetric=False), PerGroup(32), "float16"),
        (Int(8, symmetric=False), PerTensor(), "float32"),
        (NormalFloat(4), PerGroup(64), "float16"),
        (Log2(3), PerChannel(), "float32"),
    ]:
        module = _module(fmt, gran, sd, 33, 300, bias=False, smooth=False)
        w = cpu_avx2.build_weight(module)
        got = torch.ops.lowbit_avx2.wo_dequantize(w.codes, w.scale, w.zero, w.bits, w.group, w.n, 300, w.table)
        assert torch.equal(got, module.qweight.dequantize(torch.float32)), fmt.name


def test_nibble_layout():
    """Byte j of each 32-input block holds input j (low nibble) and input j + 16 (high nibble)."""
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    packed = cpu_avx2.nibble_blocks(codes)
    assert packed.shape == (1, 32)
    assert int(packed[0, 0]) == codes[0, 0] | (codes[0, 16] << 4)
    assert int(packed[0, 17]) == codes[0, 33] | (codes[0, 49] << 4)


@avx2
def test_avx2_gemv_and_dequantize_paths_agree():
    module = _module(Int(4, symmetric=False), PerGroup(128), "float16", 64, 512, bias=True, smooth=False)
    x = torch.randn(12, 512)
    gemv = cpu_avx2.avx2_linear(module, x, dequant_from=10**9)
    slabs = cpu_avx2.avx2_linear(module, x, dequant_from=1)
    assert sqnr_db(gemv, slabs) > FP32_FLOOR


@avx2
def test_avx2_edge_inputs():
    module = _module(Int(4, symmetric=False), PerGroup(64), "float16", 20, 128, bias=True, smooth=False)
    assert cpu_avx2.avx2_linear(module, torch.zeros(0, 128)).shape == (0, 20)
    assert torch.equal(cpu_avx2.avx2_linear(module, torch.zeros(2, 128)), module.bias.expand(2, -1))
    x = torch.randn(2, 128)
    x[1, 5] = float("nan")
    y = cpu_avx2.avx2_linear(module, x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()  # NaN stays in its token, as in F.linear
    strided = torch.randn(128, 4).t()
    assert sqnr_db(reference.linear(module, strided), cpu_avx2.avx2_linear(module, strided)) > FP32_FLOOR


def _check_int16_path(module: QLinear, x: torch.Tensor, label: str) -> None:
    """The int16 activation path above INT16_FLOOR and the fp32 decoding above FP32_FLOOR, against the reference."""
    fast = cpu_avx2.avx2_linear(module, x)
    slow = cpu_avx2.avx2_linear(module, x, int16_act=False)
    ref = reference.linear(module, x)
    assert sqnr_db(ref, slow) > FP32_FLOOR
    assert sqnr_db(ref, fast) > INT16_FLOOR, f"{label}: {sqnr_db(ref, fast):.1f} dB"


@avx2
@pytest.mark.parametrize("k", [4096, 300, 96, 80, 32])  # 128 blocks; 10; 3 and 3 (an odd last block); 1
@pytest.mark.parametrize(
    ("fmt", "gran"),
    [
        (Int(4, symmetric=False), PerGroup(128)),
        (Int(4), PerGroup(32)),
        (Int(4), PerGroup(64)),
        (Int(3, symmetric=False), PerGroup(192)),
        (Int(2, symmetric=False), PerGroup(256)),
        (Int(4, full_range=True), PerGroup(96)),  # an odd multiple of 32: the fp32 path
        (Int(4, symmetric=False), PerChannel()),
        (Int(4), PerTensor()),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_avx2_int16_token_path(fmt, gran, k):
    """One token: int16 activations x nibble codes against the reference and the fp32 decoding path."""
    module = _module(fmt, gran, "float16", 37, k, bias=True, smooth=False, seed=k)
    for seed in range(3):
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(seed)) * 10.0**seed
        x[0, seed * 7 % k] *= 50.0  # an outlier input, as in LLM activations
        _check_int16_path(module, x, f"{fmt.name} {gran.name} k={k}")
    assert torch.equal(cpu_avx2.avx2_linear(module, torch.zeros(1, k)), module.bias.float().view(1, -1))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(1, k)
        x[0, k // 2] = bad
        assert torch.isnan(cpu_avx2.avx2_linear(module, x)).all()  # as an fp32 matmul would (Inf x 0 terms)


def test_avx2_refuses_what_it_cannot_run():
    x = torch.randn(1, 256)
    assert not cpu_avx2.weight_supported(_module(Int(4), PerGroup(48), "float32", 8, 256, False, False))
    assert not cpu_avx2.weight_supported(_module(NormalFloat(4), PerGroup(48), "float32", 8, 256, False, False))
    assert not cpu_avx2._available(_module(Int(4), PerGroup(64), "float32", 8, 256, False, False), x.double())


@avx2
def test_registry_prefers_avx512_then_avx2():
    """Where the AVX-512 kernels load they win; elsewhere w4/w8 weight-only layers run on cpu-avx2."""
    x = torch.randn(2, 256)
    for fmt, gran, native in ((Int(4, symmetric=False), PerGroup(128), "cpu-w4"), (Int(8), PerChannel(), "cpu-w8")):
        module = _module(fmt, gran, "float16", 32, 256, False, False)
        assert kernels.select("linear", module, x).name == (native if native_available() else "cpu-avx2")


@avx2
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_avx2_w8a8_matches_reference(mode):
    """W8A8 layers (per-token dynamic or calibrated static activations, SmoothQuant divisor, bias):
    the reference's activation codes times the AVX2-decoded int8 weight, GEMV and slab paths."""
    gen = torch.Generator().manual_seed(5)
    act = ActivationSpec(mode, Int(8) if mode == "dynamic" else Int(8, symmetric=False))
    qt = QTensor.quantize(torch.randn(33, 300, generator=gen), QuantSpec(Int(8), PerChannel()))
    module = QLinear(qt, act, torch.randn(33, generator=gen))
    module.set_input_smooth(torch.rand(300, generator=gen) + 0.5)
    if mode == "static":
        module.set_input_qparams(torch.tensor([0.02]), torch.tensor([128]))
    for m in (1, 5, cpu_avx2.DEQUANT_FROM, 300):
        x = torch.randn(m, 300, generator=gen)
        y = cpu_avx2.avx2_w8a8_linear(module, x)
        got = sqnr_db(reference.linear(module, x), y)
        assert got >= FP32_FLOOR, f"{mode} M={m}: SQNR {got:.1f} dB"
    x = torch.randn(2, 300)
    chosen = kernels.select("linear", module, x).name
    assert chosen == ("cpu-int8" if native_available() else "cpu-avx2-w8a8")


def _w8a8_module(act: ActivationSpec, k: int, seed: int, smooth: bool) -> QLinear:
    gen = torch.Generator().manual_seed(seed)
    qt = QTensor.quantize(torch.randn(9, k, generator=gen), QuantSpec(Int(8), PerChannel()))
    module = QLinear(qt, act, torch.randn(9, generator=gen))
    if smooth:
        module.set_input_smooth(torch.rand(k, generator=gen) + 0.5)
    return module


@avx2
@pytest.mark.parametrize("k", [1, 7, 8, 33, 384])  # below, at and past one vector of 8; a tail; MiniLM's width
@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize(
    ("act", "static"),
    [
        (ActivationSpec("dynamic", Int(8)), None),
        (ActivationSpec("dynamic", Int(4)), None),
        (ActivationSpec("static", Int(8, symmetric=False)), (0.037, 131)),
        (ActivationSpec("static", Int(8)), (0.02, None)),
    ],
    ids=["dyn-int8", "dyn-int4", "static-uint8", "static-int8"],
)
def test_w8a8_activations_equal_the_reference_bit_for_bit(act, static, smooth, k):
    """The native one-pass fake quantizer gives reference.quantize_input's values exactly: per-token
    scales from min/max, constant and all-zero rows, tiny and huge rows, clipping, round half to even."""
    module = _w8a8_module(act, k, k, smooth)
    if static is not None:
        scale, zero = static
        module.set_input_qparams(torch.tensor([scale]), None if zero is None else torch.tensor([zero]))
    assert cpu_avx2.native_activation(module)
    gen = torch.Generator().manual_seed(k)
    rows = [
        torch.randn(37, k, generator=gen) * 5,
        torch.zeros(2, k),
        torch.full((2, k), -0.7),
        torch.randn(2, k, generator=gen) * 1e-30,
        torch.randn(3, k, generator=gen) * 1e4,
        torch.arange(k, dtype=torch.float32).view(1, k) * 0.5 - k / 4,  # many exact halves of a code
    ]
    for x in rows:
        assert torch.equal(cpu_avx2.quantized_input(module, x), reference.quantize_input(x, module))


@avx2
def test_w8a8_activations_outside_the_native_path():
    """Non-finite rows go to the reference (which names the problem for dynamic activations), bf16 rows
    and other activation specs are left to it too."""
    from lowbit.errors import NonFiniteError

    dynamic = _w8a8_module(ActivationSpec("dynamic", Int(8)), 40, 1, smooth=True)
    x = torch.randn(3, 40)
    x[1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        cpu_avx2.quantized_input(dynamic, x)
    static = _w8a8_module(ActivationSpec("static", Int(8, symmetric=False)), 40, 2, smooth=False)
    static.set_input_qparams(torch.tensor([0.05]), torch.tensor([120]))
    x[1, 3] = float("inf")
    assert torch.equal(cpu_avx2.quantized_input(static, x), reference.quantize_input(x, static))
    xb = torch.randn(4, 40).bfloat16()
    assert torch.equal(cpu_avx2.quantized_input(dynamic, xb), reference.quantize_input(xb, dynamic))
    full_range = _w8a8_module(ActivationSpec("dynamic", Int(8, full_range=True)), 40, 3, smooth=False)
    assert not cpu_avx2.native_activation(full_range)


def _float64_w8a8(module: QLinear, x: torch.Tensor) -> torch.Tensor:
    """The reference's activation codes times the dequantized weight, summed in float64 (the exact sum)."""
    xq = reference.quantize_input(x, module).double()
    y = xq @ module.qweight.dequantize(torch.float32).double().t()
    return y + module.bias.double() if module.bias is not None else y


@avx2
@pytest.mark.parametrize("k", [1, 33, 300, 20000])  # a tail; several blocks; several int32 segments (16384 inputs)
@pytest.mark.parametrize(
    ("act", "static"),
    [
        (ActivationSpec("dynamic", Int(8)), None),
        (ActivationSpec("dynamic", Int(4)), None),
        (ActivationSpec("static", Int(8, symmetric=False)), (0.037, 131)),
        (ActivationSpec("static", Int(8, symmetric=False)), (0.01, 0)),  # codes up to 255 from their zero point
    ],
    ids=["dyn-int8", "dyn-int4", "static-uint8", "static-uint8-zero0"],
)
def test_w8a8_few_tokens_integer_path(act, static, k):
    """Fewer than DEQUANT_FROM tokens: activation codes x weight codes summed in int32 (vpmaddwd),
    against the float64 sum of the same products: within 1e-6 relative (fp32 rescale only)."""
    for smooth in (False, True):
        module = _w8a8_module(act, k, k + int(smooth), smooth)
        if static is not None:
            module.set_input_qparams(torch.tensor([static[0]]), torch.tensor([static[1]]))
        gen = torch.Generator().manual_seed(k)
        for m in (1, 2, 3, 4, 5, 9, cpu_avx2.DEQUANT_FROM - 1):
            x = torch.randn(m, k, generator=gen) * 3
            y = cpu_avx2.avx2_w8a8_linear(module, x)
            exact = _float64_w8a8(module, x)
            err = float((y.double() - exact).norm() / exact.norm())
            assert err < 1e-6, f"M={m} smooth={smooth}: relative error {err:.2e}"
        zeros = cpu_avx2.avx2_w8a8_linear(module, torch.zeros(1, k))
        torch.testing.assert_close(zeros.double(), _float64_w8a8(module, torch.zeros(1, k)), rtol=1e-6, atol=1e-6)


@avx2
def test_w8a8_few_tokens_non_finite_and_compiled():
    """A NaN row goes to the reference, which names it; the op traces under torch.compile."""
    from lowbit.errors import NonFiniteError

    module = _w8a8_module(ActivationSpec("dynamic", Int(8)), 64, 7, smooth=True)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        cpu_avx2.avx2_w8a8_linear(module, x)
    compiled = torch.compile(lambda t: cpu_avx2.avx2_w8a8_linear(module, t), fullgraph=True, dynamic=False)
    x = torch.randn(2, 64)
    torch.testing.assert_close(compiled(x), cpu_avx2.avx2_w8a8_linear(module, x), rtol=1e-5, atol=1e-5)


@avx2
@pytest.mark.parametrize(
    ("fmt", "gran", "scale_dtype"),
    [
        (Int(8), PerChannel(), "float32"),
        (Int(8, symmetric=False), PerGroup(32), "float16"),
        (Int(8), PerGroup(96), "float16"),  # segments of 96
        (Int(6, symmetric=False), PerGroup(512), "float16"),  # segments of 256 within a group
        (Int(8, full_range=True), PerTensor(), "float32"),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_avx2_int8_codes_token_path(fmt, gran, scale_dtype):
    """Fewer than DEQUANT_FROM tokens with 5-8 bit codes: int16 activations x codes on vpmaddwd,
    against the reference and the fp32 decoding path (outlier inputs, NaN/Inf, zeros)."""
    k = 1100
    module = _module(fmt, gran, scale_dtype, 37, k, bias=True, smooth=False, seed=3)
    for m in (1, 2, 4, 7, cpu_avx2.DEQUANT_FROM - 1):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 10.0 ** (m % 3)
        x[:, (7 * m) % k] *= 50.0  # an outlier input, as in LLM activations
        _check_int16_path(module, x, f"{fmt.name} {gran.name} M={m}")
    assert torch.equal(cpu_avx2.avx2_linear(module, torch.zeros(3, k)), module.bias.float().expand(3, -1))
    x = torch.randn(3, k)
    x[1, k // 2] = float("inf")
    y = cpu_avx2.avx2_linear(module, x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()


@avx2
def test_avx2_whole_weight_and_slab_products_agree():
    """Many tokens: a weight up to 2^22 values is dequantized whole for one at::mm, a larger one in slabs."""
    for n, k in ((64, 512), (1100, 4000)):
        module = _module(Int(4, symmetric=False), PerGroup(128), "float16", n, k, bias=True, smooth=False)
        x = torch.randn(cpu_avx2.DEQUANT_FROM, k)
        got = sqnr_db(reference.linear(module, x), cpu_avx2.avx2_linear(module, x))
        assert got > FP32_FLOOR, f"{n}x{k}: {got:.1f} dB"
    # an input that requires grad (a model called outside no_grad) runs too; the op itself has no gradient
    assert cpu_avx2.avx2_linear(module, x.clone().requires_grad_()).shape == (cpu_avx2.DEQUANT_FROM, n)


@avx2
def test_torch_compile_traces_the_avx2_op():
    first = _module(Int(4, symmetric=False), PerGroup(32), "float16", 64, 96, bias=True, smooth=True)
    second = _module(Int(8), PerChannel(), "float32", 40, 64, bias=False, smooth=False)
    third = _w8a8_module(ActivationSpec("dynamic", Int(8)), 40, 4, smooth=True)  # the native fake quantizer

    def forward(t: torch.Tensor) -> torch.Tensor:
        hidden = cpu_avx2.avx2_linear(second, torch.nn.functional.gelu(cpu_avx2.avx2_linear(first, t)))
        return cpu_avx2.avx2_w8a8_linear(third, hidden)

    x = torch.randn(3, 96)
    eager = forward(x)  # builds the kernel layouts
    compiled = torch.compile(forward, fullgraph=True, dynamic=False)  # Inductor fuses gelu and the divisor
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    x5 = torch.randn(5, 96)
    torch.testing.assert_close(compiled(x5), forward(x5), rtol=1e-5, atol=1e-5)


@avx2
@pytest.mark.slow
def test_minilm_w4_embeddings_match_reference(monkeypatch):
    """all-MiniLM-L6-v2 with w4-g128 (int8 tables and pooler): every weight-only linear layer on
    cpu-avx2 against the reference kernel, sentence embeddings within 1e-5 relative."""
    import lowbit
    from lowbit.evaluation.embedding import sentence_embeddings

    loaded = lowbit.load_model("builtin:minilm")
    lowbit.quantize(loaded, "w4-g128")
    sentences = ["The quick brown fox jumps over the lazy dog.", "Quantized models should be fast and accurate."]
    monkeypatch.setattr(kernels, "select", _forcing("cpu-avx2", kernels.select))
    fast = sentence_embeddings(loaded.model, loaded.tokenizer, sentences)
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    ref = sentence_embeddings(loaded.model, loaded.tokenizer, sentences)
    assert float((fast - ref).norm() / ref.norm()) < 1e-5


def _forcing(name: str, select):
    """A ``select`` that returns kernel ``name`` wherever it applies (also beside AVX-512 kernels)."""
    avx2_kernel = next(k for k in kernels.kernels_for("linear") if k.name == name)

    def pick(op, module, x):
        forced_reference = os.environ.get("LOWBIT_KERNEL") == "reference"
        if op == "linear" and not forced_reference and avx2_kernel.applies(module.layout, "none", "cpu", module, x):
            return avx2_kernel
        return select(op, module, x)

    return pick
