"""Weight-only CPU kernels (native and torch fallbacks) against the reference kernel.

Tolerances are signal-to-noise ratios (dB) against the reference computed in fp32 from the
same (fp32-cast) input. The native GEMV quantizes activations to int16 per token (~90 dB for
integer codes); level tables are int16 levels * 2^11 (~65 dB for NF); bf16 outputs and the
bf16 prefill path (M >= PREFILL_FROM) are bf16-rounded (~50 dB).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lowbit import kernels
from lowbit.algorithms.hqq import hqq_quantize
from lowbit.evaluation.weights import sqnr_db
from lowbit.formats import Binary, Codebook, Int, Log2, NormalFloat, Ternary
from lowbit.granularity import PerChannel, PerGroup, PerTensor
from lowbit.kernels import cpu_weightonly, native_available, reference, torch_weightonly
from lowbit.nn import QLinear
from lowbit.recipe import ActivationSpec
from lowbit.spec import QuantSpec
from lowbit.tensor import QTensor

native = pytest.mark.skipif(not native_available(), reason="lowbit native kernels unavailable on this machine")

M_VALUES = (1, 2, 3, 5, 8, 9, 64, 300)
SHAPES = ((33, 300), (48, 256))  # (N, K): odd N and a K that leaves a remainder group; aligned

# (name, format, granularity, scale dtype, kernel, SQNR floor in dB for the fp32 GEMV)
CASES = [
    ("w4-asym-g128", Int(4, symmetric=False), PerGroup(128), "float16", "cpu-w4", 75),
    ("w4-sym-g64-fp32", Int(4), PerGroup(64), "float32", "cpu-w4", 75),
    ("w4-full-g32", Int(4, full_range=True), PerGroup(32), "float16", "cpu-w4", 75),
    ("w4-asym-g256", Int(4, symmetric=False), PerGroup(256), "float16", "cpu-w4", 75),
    ("w4-asym-channel", Int(4, symmetric=False), PerChannel(), "float32", "cpu-w4", 75),
    ("w3-asym-g128", Int(3, symmetric=False), PerGroup(128), "float16", "cpu-w3", 75),
    ("w3-sym-g32", Int(3), PerGroup(32), "float32", "cpu-w3", 75),
    ("w8-channel", Int(8), PerChannel(), "float32", "cpu-w8", 75),
    ("w8-channel-fp16", Int(8), PerChannel(), "float16", "cpu-w8", 75),
    ("w8-asym-channel", Int(8, symmetric=False), PerChannel(), "float32", "cpu-w8", 75),
    ("w8-g128", Int(8), PerGroup(128), "float16", "cpu-w8", 75),
    ("w8-tensor", Int(8), PerTensor(), "float32", "cpu-w8", 75),
    ("w6-channel", Int(6), PerChannel(), "float32", "cpu-w8", 75),
    ("w2-asym-g64", Int(2, symmetric=False), PerGroup(64), "float16", "cpu-w2", 75),
    ("w1-asym-g64", Int(1, symmetric=False), PerGroup(64), "float16", "cpu-w2", 75),
    ("ternary", Ternary(), PerChannel(), "float16", "cpu-w2", 75),
    ("nf4-g64", NormalFloat(4), PerGroup(64), "float16", "cpu-lut", 60),
    ("nf3-g64", NormalFloat(3), PerGroup(64), "float32", "cpu-lut", 60),
    ("nf2-g32", NormalFloat(2), PerGroup(32), "float16", "cpu-lut", 60),
    ("log2-4", Log2(4), PerChannel(), "float16", "cpu-lut", 75),
    ("log2-3-g64", Log2(3), PerGroup(64), "float16", "cpu-lut", 75),
    ("log2-2", Log2(2), PerChannel(), "float16", "cpu-lut", 75),
    ("binary", Binary(), PerChannel(), "float16", "cpu-lut", 75),
    ("binary-g64", Binary(), PerGroup(64), "float32", "cpu-lut", 75),
    ("vq256x4", Codebook(256, 4, iters=3), PerTensor(), "float32", "cpu-vq", 100),
    ("vq16x4-g64", Codebook(16, 4, iters=3), PerGroup(64), "float32", "cpu-vq", 100),
]
BF16_FLOOR = 45.0  # bf16 output rounding (2^-9) and bf16 prefill matmul


def _module(fmt, gran, scale_dtype: str, n: int, k: int, bias: bool, smooth: bool, seed: int = 0) -> QLinear:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    qt = QTensor.quantize(w, QuantSpec(fmt, gran, scale_dtype=scale_dtype))
    module = QLinear(qt, ActivationSpec(), torch.randn(n, generator=gen) if bias else None)
    if smooth:
        module.set_input_smooth(torch.rand(k, generator=gen) + 0.5)
    return module


def _input(m: int, k: int, three_d: bool, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    if three_d and m % 3 == 0:
        x = x.view(3, m // 3, k)
    return x.to(dtype)


@native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(("name", "fmt", "gran", "scale_dtype", "kernel", "floor"), CASES, ids=[c[0] for c in CASES])
def test_native_matches_reference(name, fmt, gran, scale_dtype, kernel, floor, shape):
    n, k = shape
    odd = shape == SHAPES[0]  # the odd shape also carries bias, input_smooth and 3-D inputs
    module = _module(fmt, gran, scale_dtype, n, k, bias=odd, smooth=odd)
    _check_against_reference(module, kernel, floor, three_d=odd, label=f"{name} {shape}")


def _check_against_reference(module: QLinear, kernel: str, floor: float, three_d: bool, label: str) -> None:
    """For every M and fp32/bf16 input: ``kernel`` is chosen, and its output has the input's
    dtype and shape and an SQNR to the reference of at least ``floor`` (fp32 GEMV) or BF16_FLOOR."""
    n, k = module.weight_shape
    for m in M_VALUES:
        for dtype in (torch.float32, torch.bfloat16):
            x = _input(m, k, three_d=three_d, dtype=dtype)
            chosen = kernels.select("linear", module, x)
            assert chosen.name == kernel
            y = chosen.fn(module, x)
            assert y.dtype == dtype and y.shape == (*x.shape[:-1], n)
            ref = reference.linear(module, x.float())
            prefill_from = cpu_weightonly.CODEBOOK_PREFILL_FROM if kernel == "cpu-vq" else cpu_weightonly.PREFILL_FROM
            gemv_fp32 = dtype == torch.float32 and m < prefill_from
            want = floor if gemv_fp32 else BF16_FLOOR
            got = sqnr_db(ref, y.float())
            assert got >= want, f"{label} M={m} {dtype}: SQNR {got:.1f} dB < {want} dB"


@native
@pytest.mark.parametrize(
    ("fmt", "gran", "kernel"),
    [
        (Int(4, symmetric=False), PerGroup(128), "cpu-w4"),
        (Int(3, symmetric=False), PerGroup(64), "cpu-w3"),
        (Int(2, symmetric=False), PerGroup(64), "cpu-w2"),
        (Int(8, symmetric=False), PerChannel(), "cpu-w8"),
    ],
    ids=["w4-g128", "w3-g64", "w2-g64", "w8-channel"],
)
def test_native_runs_fractional_zero_points(fmt, gran, kernel):
    """HQQ's float zero points run natively (integer part in the kernel, fraction corrected after)
    and match the reference within the integer-code floors, GEMV and prefill, fp32 and bf16."""
    gen = torch.Generator().manual_seed(3)
    n, k = 33, 300
    qt = hqq_quantize(torch.randn(n, k, generator=gen), QuantSpec(fmt, gran, scale_dtype="float16"), zero="float")
    assert qt.zero_point.is_floating_point() and not torch.equal(qt.zero_point, torch.round(qt.zero_point))
    module = QLinear(qt, ActivationSpec(), torch.randn(n, generator=gen))
    module.set_input_smooth(torch.rand(k, generator=gen) + 0.5)
    _check_against_reference(module, kernel, 75, three_d=True, label=f"hqq {fmt.name}")


@native
def test_dequantize_is_exact_for_integer_codes():
    """The prefill path's unpack reproduces the reference dequantization bit for bit (fp32 out)."""
    for fmt, gran, sd in [
        (Int(4, symmetric=False), PerGroup(128), "float16"),
        (Int(8), PerChannel(), "float32"),
        (Int(2, symmetric=False), PerGroup(64), "float16"),
        (Int(3, symmetric=False), PerGroup(32), "float16"),
        (Ternary(), PerChannel(), "float32"),
        (Log2(4), PerChannel(), "float16"),
    ]:
        module = _module(fmt, gran, sd, 33, 300, bias=False, smooth=False)
        p = cpu_weightonly._build_blocks(module)
        wt = torch.ops.lowbit.wo_dequantize(
            p.codes, p.scales, p.zeros, p.table, p.bits, p.n, 300, p.group, p.zero_const, p.segment, p.out_mul,
            torch.float32,
        )  # fmt: skip
        assert torch.equal(wt.t(), module.qweight.dequantize(torch.float32)), fmt.name


def test_nibble_layout():
    """4-bit integer codes: byte j of row r's 32-bit lane in k-block b holds input 8b+j (low nibble)
    and 8b+4+j (high nibble); rows and inputs past the shape are zero (what the vpdpbusd loop reads)."""
    from lowbit.kernels.weightonly_pack import pack_nibbles

    n, k = 19, 21
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(codes)
    assert packed.shape == (2, 3, 64)
    padded = torch.zeros(32, 24, dtype=torch.uint8)
    padded[:n, :k] = codes
    for row in range(32):
        for b in range(3):
            for j in range(4):
                byte = int(packed[row // 16, b, 4 * (row % 16) + j])
                assert byte & 15 == padded[row, 8 * b + j] and byte >> 4 == padded[row, 8 * b + 4 + j]


@native
def test_prefill_threshold_and_gemv_agree():
    """Both paths of one op give the same answer (within bf16) at the same M."""
    module = _module(Int(4, symmetric=False), PerGroup(128), "float16", 64, 512, bias=True, smooth=False)
    x = torch.randn(12, 512)
    gemv = cpu_weightonly.blocks_linear(module, x, prefill_from=10**9)
    prefill = cpu_weightonly.blocks_linear(module, x, prefill_from=1)
    assert sqnr_db(gemv, prefill) > BF16_FLOOR


@native
def test_edge_inputs():
    module = _module(Int(4, symmetric=False), PerGroup(64), "float16", 20, 128, bias=True, smooth=False)
    assert cpu_weightonly.blocks_linear(module, torch.zeros(0, 128)).shape == (0, 20)
    y = cpu_weightonly.blocks_linear(module, torch.zeros(2, 128))
    assert torch.allclose(y, module.bias.expand(2, -1))  # all-zero tokens give exactly the bias
    x = torch.randn(2, 128)
    x[1, 5] = float("nan")
    y = cpu_weightonly.blocks_linear(module, x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()  # NaN stays in its token, as in F.linear
    strided = torch.randn(128, 4).t()  # non-contiguous input
    assert sqnr_db(reference.linear(module, strided), cpu_weightonly.blocks_linear(module, strided)) > 75


@native
def test_torch_compile_traces_the_native_ops():
    torch.manual_seed(0)
    model = nn.Sequential(
        _module(Int(4, symmetric=False), PerGroup(32), "float16", 64, 96, bias=True, smooth=True),
        nn.ReLU(),  # exact in both (inductor's GELU may differ from eager's by an ulp, flipping a rounding)
        _module(NormalFloat(4), PerGroup(32), "float16", 40, 64, bias=False, smooth=False),
        nn.ReLU(),
        _module(Codebook(16, 4, iters=2), PerTensor(), "float32", 8, 40, bias=True, smooth=False),
    )
    x = torch.randn(3, 96)
    eager = model(x)  # builds the prepacked layouts
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), eager)
    x5 = torch.randn(5, 96)
    assert torch.equal(compiled(x5), model(x5))
    # HQQ's fractional zero points: the per-group correction traces too (same values up to fp32 rounding)
    qt = hqq_quantize(
        torch.randn(24, 96), QuantSpec(Int(4, symmetric=False), PerGroup(32), scale_dtype="float16"), zero="float"
    )
    hqq_layer = QLinear(qt, ActivationSpec(), None)
    eager = hqq_layer(x)
    compiled = torch.compile(hqq_layer, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)


# ---- portable fallbacks (no native code) --------------------------------------------------
FALLBACKS = [
    ("torch-int8pack", torch_weightonly.int8pack_linear, Int(8), PerChannel(), "float32"),
    ("torch-int4pack", torch_weightonly.int4pack_linear, Int(4, symmetric=False), PerGroup(64), "float16"),
    ("torch-int4pack", torch_weightonly.int4pack_linear, Int(4), PerGroup(128), "float32"),
]


@pytest.mark.parametrize(("name", "fn", "fmt", "gran", "scale_dtype"), FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_torch_fallbacks_match_reference(name, fn, fmt, gran, scale_dtype):
    module = _module(fmt, gran, scale_dtype, 48, 256, bias=True, smooth=True)
    for m in (1, 3, torch_weightonly.MAX_ROWS):
        for dtype, floor in ((torch.float32, 80.0), (torch.bfloat16, 40.0)):
            x = _input(m, 256, three_d=True, dtype=dtype)
            assert torch_weightonly._int8_ok(module, x) or torch_weightonly._int4_ok(module, x)
            y = fn(module, x)
            assert y.dtype == dtype
            got = sqnr_db(reference.linear(module, x.float()), y.float())
            assert got >= floor, f"{name} M={m} {dtype}: SQNR {got:.1f} dB < {floor}"


def test_torch_fallbacks_refuse_shapes_torch_cannot_run():
    x = torch.randn(1, 264)
    assert not torch_weightonly._int8_ok(_module(Int(8), PerChannel(), "float32", 32, 264, False, False), x)
    x = torch.randn(1, 256)
    assert not torch_weightonly._int4_ok(_module(Int(4), PerGroup(64), "float16", 33, 256, False, False), x)
    x = torch.randn(1, 300)
    assert not torch_weightonly._int4_ok(_module(Int(4), PerGroup(128), "float16", 32, 300, False, False), x)
    many = torch.randn(torch_weightonly.MAX_ROWS + 1, 256)  # GEMV kernels: many rows go to dequantize + matmul
    assert not torch_weightonly._int8_ok(_module(Int(8), PerChannel(), "float32", 32, 256, False, False), many)
    assert not torch_weightonly._int4_ok(_module(Int(4), PerGroup(64), "float16", 32, 256, False, False), many)


def test_native_off_selects_torch_fallbacks():
    """With LOWBIT_NATIVE=0 the registry picks torch's int8/int4 ops, and the reference elsewhere."""
    code = (
        "import torch\n"
        "from lowbit import kernels\n"
        "from lowbit.formats import Int, NormalFloat\n"
        "from lowbit.granularity import PerChannel, PerGroup\n"
        "from lowbit.nn import QLinear\n"
        "from lowbit.recipe import ActivationSpec\n"
        "from lowbit.spec import QuantSpec\n"
        "from lowbit.tensor import QTensor\n"
        "x = torch.randn(2, 256)\n"
        "for fmt, gran in [(Int(8), PerChannel()), (Int(4, symmetric=False), PerGroup(128)),\n"
        "                  (NormalFloat(4), PerGroup(64))]:\n"
        "    m = QLinear(QTensor.quantize(torch.randn(32, 256), QuantSpec(fmt, gran)), ActivationSpec())\n"
        "    print(kernels.select('linear', m, x).name)\n"
    )
    env = {**os.environ, "LOWBIT_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["torch-int8pack", "torch-int4pack", "reference"]


# ---- a real model -------------------------------------------------------------------------
@native
@pytest.mark.slow
def test_smollm2_w4_logits_match_reference(monkeypatch):
    """SmolLM2-135M quantized with w4-g128: native logits vs the reference kernel's. The GEMV path
    (8 tokens) stays within 1e-3; the bf16 prefill path within 5e-2 (a bf16 copy of the float
    model is 2.2e-2 from fp32 on this input)."""
    import lowbit

    loaded = lowbit.load_model("builtin:smollm2-135m")
    model = lowbit.quantize(loaded, "w4-g128")
    text = "The quick brown fox jumps over the lazy dog because it was tired of running around the farm all day."
    ids = loaded.tokenizer(" ".join([text] * 6), return_tensors="pt")["input_ids"]  # past PREFILL_FROM (16 or 96)
    with torch.no_grad():
        native_logits = [model(ids[:, :8]).logits, model(ids).logits]  # GEMV (8 tokens) and prefill paths
        monkeypatch.setenv("LOWBIT_KERNEL", "reference")
        ref_logits = [model(ids[:, :8]).logits, model(ids).logits]
    assert ids.shape[1] >= cpu_weightonly.PREFILL_FROM
    for got, ref, max_rel in zip(native_logits, ref_logits, (1e-3, 5e-2)):
        rel = float((got - ref).norm() / ref.norm())
        assert rel < max_rel, f"relative logit error {rel:.2e} >= {max_rel}"
        agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        assert agree >= 0.9, f"argmax agrees on {agree:.0%} of positions"


def test_prefill_threshold_follows_the_cpu(monkeypatch):
    """The GEMV runs up to 96 tokens on CPUs with AMX (measured on a Xeon), 16 elsewhere (Zen 4)."""
    monkeypatch.setattr(cpu_weightonly, "cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert cpu_weightonly._prefill_from() == 96
    monkeypatch.setattr(cpu_weightonly, "cpu_flags", lambda: {"avx512f", "avx512_vnni"})
    assert cpu_weightonly._prefill_from() == 16
    monkeypatch.setattr(cpu_weightonly, "cpu_flags", set)
    assert cpu_weightonly._prefill_from() == 16
