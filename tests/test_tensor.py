"""QTensor: storage accounting, bit-exact safetensors round trips, validation, torch fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import CheckpointError
from lowbit.formats import Binary, Codebook, Float, Int, Log2, NormalFloat, Ternary
from lowbit.granularity import PerChannel, PerGroup, PerTensor
from lowbit.io import read_safetensors, write_safetensors
from lowbit.ranges import MSE
from lowbit.spec import QuantSpec
from lowbit.tensor import QTensor

SPECS = [
    QuantSpec(Int(8), PerChannel()),
    QuantSpec(Int(8), PerTensor(), scale_dtype="float16"),
    QuantSpec(Int(4), PerGroup(32), MSE(grid=10)),
    QuantSpec(Int(4, symmetric=False), PerGroup(48), scale_dtype="float16"),
    QuantSpec(Int(3), PerGroup(16)),
    QuantSpec(Int(2, symmetric=False), PerChannel()),
    QuantSpec(Int(1, symmetric=False), PerGroup(8)),
    QuantSpec(NormalFloat(4), PerGroup(64)),
    QuantSpec(NormalFloat(3), PerChannel()),
    QuantSpec(Log2(4), PerChannel()),
    QuantSpec(Binary(), PerChannel()),
    QuantSpec(Ternary(), PerGroup(32)),
    QuantSpec(Float("fp16"), PerTensor()),
    QuantSpec(Float("bf16"), PerTensor()),
    QuantSpec(Float("fp8_e4m3"), PerChannel()),
    QuantSpec(Float("fp8_e5m2"), PerGroup(32), scale_dtype="float16"),
    QuantSpec(Codebook(16, 2), PerTensor()),
    QuantSpec(Codebook(8, 4), PerGroup(32)),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_safetensors_round_trip_is_bit_exact(spec, tmp_path):
    w = torch.randn(24, 100)  # odd sizes: remainder groups, partial sub-vectors and bytes
    qt = QTensor.quantize(w, spec)
    tensors, meta = qt.to_dict("layer.")
    write_safetensors(tmp_path / "q.safetensors", tensors)
    loaded, _ = read_safetensors(tmp_path / "q.safetensors")
    back = QTensor.from_dict(loaded, meta, "layer.")
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert back.fmt == qt.fmt and back.granularity == qt.granularity and back.shape == qt.shape


def test_nbytes_counts_codes_scales_and_zeros():
    w = torch.randn(64, 256)
    qt = QTensor.quantize(w, QuantSpec(Int(4, symmetric=False), PerGroup(128), scale_dtype="float16"))
    groups = 64 * 2
    assert qt.nbytes == 64 * 256 // 2 + groups * 2 + groups * 1
    assert qt.bits_per_weight == pytest.approx(4 + (16 + 8) / 128)
    qt = QTensor.quantize(w, QuantSpec(Int(3), PerChannel()))
    assert qt.nbytes == 64 * 256 * 3 // 8 + 64 * 4


def test_dequantize_dtype_follows_the_original():
    w = torch.randn(8, 32, dtype=torch.bfloat16)
    qt = QTensor.quantize(w, QuantSpec(Int(8), PerChannel()))
    assert qt.dequantize().dtype == torch.bfloat16
    assert qt.dequantize(torch.float32).dtype == torch.float32


def test_torch_ops_without_a_kernel_fall_back_to_dequantize():
    w = torch.randn(16, 32)
    x = torch.randn(3, 32)
    qt = QTensor.quantize(w, QuantSpec(Int(8), PerChannel()))
    assert torch.equal(F.linear(x, qt), F.linear(x, qt.dequantize()))
    assert torch.equal(torch.matmul(qt, x.T), qt.dequantize() @ x.T)
    assert torch.equal(torch.add(qt, 1.0), qt.dequantize() + 1.0)


def _corrupt(tensors, meta, **changes):
    tensors = dict(tensors)
    meta = dict(meta)
    for key, value in changes.items():
        if key in ("format", "shape", "dtype", "granularity"):
            meta[key] = value
        elif value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    return tensors, meta


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"qdata": torch.zeros(7, dtype=torch.uint8)}, "packed codes"),
        ({"qdata": None}, "missing"),
        ({"scale": torch.ones(3)}, "scale must be"),
        ({"scale": torch.full((16,), float("nan"))}, "finite"),
        ({"scale": torch.zeros(16)}, "> 0"),
        ({"shape": [16, 64]}, "packed codes"),
        ({"format": {"type": "int", "bits": 11}}, "metadata is invalid"),
        ({"dtype": "complex64"}, "metadata is invalid"),
        ({"granularity": {"type": "rows"}}, "metadata is invalid"),
    ],
)
def test_inconsistent_tensors_are_refused(changes, message):
    qt = QTensor.quantize(torch.randn(16, 32), QuantSpec(Int(4), PerChannel()))
    tensors, meta = _corrupt(*qt.to_dict(), **changes)
    with pytest.raises(CheckpointError, match=message):
        QTensor.from_dict(tensors, meta)


def test_codes_past_the_level_table_are_refused():
    qt = QTensor.quantize(torch.randn(4, 8), QuantSpec(Ternary(), PerChannel()))
    tensors, meta = qt.to_dict()
    tensors["qdata"] = torch.full_like(tensors["qdata"], 0xFF)  # code 3: ternary has 3 levels
    with pytest.raises(CheckpointError, match="past the format"):
        QTensor.from_dict(tensors, meta)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(path)
    path.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="too short"):
        read_safetensors(path)
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all....")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_safetensors(path)


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "model.bin"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="pickle"):
        read_safetensors(path)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "out.safetensors"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(RuntimeError):
        write_safetensors(path, {"w": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []
