"""GPU kernels (kernels/cuda.py). Their arithmetic runs here on the CPU where torch has the same
op (``_int_mm``, ``_scaled_mm``) and is compared with the reference kernel; the packing helpers
of tinygemm are checked by decoding them back; the self-check that drops a disagreeing kernel is
tested with a wrong kernel. The tests at the end need a GPU and skip without one."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.formats import Float, Int
from lowbit.granularity import PerChannel, PerGroup
from lowbit.kernels import cuda, reference
from lowbit.nn import QLinear
from lowbit.presets import get_preset
from lowbit.primitives import qparams_from_range
from lowbit.recipe import ActivationSpec
from lowbit.spec import QuantSpec
from lowbit.tensor import QTensor

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def int8_layer(n: int, k: int, activation: ActivationSpec, calib: torch.Tensor | None = None) -> QLinear:
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=gen) / k**0.5
    layer = QLinear(QTensor.quantize(w, QuantSpec(Int(8), PerChannel())), activation, torch.randn(n, generator=gen))
    if activation.mode == "static":
        qp = qparams_from_range(activation.format, calib.min().reshape(1), calib.max().reshape(1))
        layer.set_input_qparams(qp.scale, qp.zero_point)
    return layer


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_rows_pad_for_cublas_and_match_the_reference(rows, mode):
    x = torch.randn(rows, 64)
    act = ActivationSpec(mode, Int(8) if mode == "dynamic" else Int(8, symmetric=False))
    layer = int8_layer(24, 64, act, calib=torch.randn(128, 64))
    y = cuda.int8_rows(layer, x)
    assert y.shape == (rows, 24)
    assert rel_error(y, reference.linear(layer, x)) < 1e-5


@pytest.mark.parametrize("shape", [(1, 32), (3, 7, 32), (20, 32)])
def test_fp8_rows_match_the_reference(shape):
    torch.manual_seed(0)
    fp8 = Float("fp8_e4m3")
    w = torch.randn(48, 32)
    layer = QLinear(QTensor.quantize(w, QuantSpec(fp8, PerChannel(), scale_dtype="float32")),
                    ActivationSpec("dynamic", fp8), torch.randn(48))  # fmt: skip
    x = torch.randn(*shape)
    y = cuda.fp8_rows(layer, x)
    assert y.shape == (*shape[:-1], 48) and y.dtype == x.dtype
    assert rel_error(y, reference.linear(layer, x)) < 1e-2  # bf16 output of _scaled_mm


def test_tinygemm_packing_and_parameters_decode_to_the_weight():
    torch.manual_seed(0)
    for fmt in (Int(4, symmetric=False), Int(4)):
        w = torch.randn(16, 256)
        layer = QLinear(QTensor.quantize(w, QuantSpec(fmt, PerGroup(64))), ActivationSpec())
        codes = layer.qweight.codes().reshape(16, 256)
        packed = cuda.tinygemm_pack(codes)
        assert packed.shape == (16, 128) and packed.dtype == torch.uint8
        unpacked = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(16, 256)
        assert torch.equal(unpacked, codes.to(torch.uint8))
        params = cuda.tinygemm_params(layer).float()  # [groups, N, 2]
        assert params.shape == (4, 16, 2)
        scale = params[..., 0].t().repeat_interleave(64, dim=1)
        zf = params[..., 1].t().repeat_interleave(64, dim=1)
        decoded = (codes.float() - 8) * scale + zf
        assert rel_error(decoded, layer.qweight.dequantize(torch.float32)) < 1e-2  # bf16 parameters
    assert [cuda.inner_k_tiles(k) for k in (576, 1536, 64, 32, 48)] == [4, 8, 4, 2, None]


def test_a_kernel_that_disagrees_with_the_reference_is_dropped_for_that_layer():
    layer = int8_layer(8, 32, ActivationSpec("dynamic", Int(8)))
    x = torch.randn(4, 32)
    wrong = cuda.self_checked("test-wrong", lambda m, t: reference.linear(m, t) * 2)
    with pytest.warns(RuntimeWarning, match="test-wrong: relative error"):
        y = wrong(layer, x)
    assert torch.equal(y, reference.linear(layer, x))
    assert cuda._verdict(layer, "test-wrong") is False
    right = cuda.self_checked("test-right", cuda.int8_rows)
    right(layer, x)
    assert cuda._verdict(layer, "test-right") is True


def test_gpu_kernels_are_registered_for_cuda_only():
    names = {k.name: k for k in kernels.kernels_for("linear")}
    for name in ("cuda-int8", "cuda-fp8", "cuda-int4", "cuda-2of4"):
        assert names[name].devices == frozenset({"cuda"})
    layer = int8_layer(8, 32, ActivationSpec("dynamic", Int(8)))
    assert not kernels.select("linear", layer, torch.randn(2, 32)).name.startswith("cuda")


@gpu
@pytest.mark.parametrize(
    "preset,kernel,dtype",
    [
        ("int8-dynamic-rtn", "cuda-int8", torch.float32),
        ("fp8", "cuda-fp8", torch.bfloat16),
        ("w4-g128", "cuda-int4", torch.bfloat16),
        ("w4-g128-2of4", "cuda-2of4", torch.float16),
    ],
)
def test_gpu_kernels_run_a_model_like_the_reference(preset, kernel, dtype):
    if kernel == "cuda-fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 matmuls need compute capability 8.9+")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256),
                                torch.nn.Linear(256, 64))  # fmt: skip
    lowbit.quantize(model, get_preset(preset))
    model = model.to("cuda", dtype)
    for rows in (1, 33):
        x = torch.randn(rows, 256, device="cuda").to(dtype)
        assert kernels.select("linear", model[0], x).name == kernel
        y = model(x)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOWBIT_KERNEL", "reference")
            ref = model(x)
        assert rel_error(y.float(), ref.float()) < cuda.SELF_CHECK_TOL
        assert cuda._verdict(model[0], kernel) is True
