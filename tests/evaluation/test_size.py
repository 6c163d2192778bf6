"""Model size: bytes with shared memory counted once, bits per weight over float and quantized layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.errors import ModelError
from lowbit.evaluation.size import directory_bytes, model_size
from lowbit.formats import Int
from lowbit.granularity import PerGroup
from lowbit.spec import QuantSpec
from lowbit.tensor import QTensor


class FakeQLinear(nn.Module):
    """What a quantized layer looks like to model_size: QTensor parts as buffers, ``qweight`` property."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec) -> None:
        super().__init__()
        qt = QTensor.quantize(linear.weight.detach(), spec)
        self.fmt, self.granularity, self.shape = qt.fmt, qt.granularity, qt.shape
        self.register_buffer("packed", qt.data)
        self.register_buffer("scale", qt.scale)
        self.register_buffer("zero_point", qt.zero_point)
        self.bias = linear.bias

    @property
    def qweight(self) -> QTensor:
        return QTensor(
            self.packed,
            self.fmt,
            self.granularity,
            self.shape,
            torch.float32,
            scale=self.scale,
            zero_point=self.zero_point,
        )


def test_float_linear():
    got = model_size(nn.Linear(4, 3))
    assert got == {
        "bytes": (12 + 3) * 4,
        "params": 15,
        "bits_per_weight": 32.0,
        "quantized_bits_per_weight": None,
        "quantized_layers": 0,
        "weight_layers": 1,
    }


def test_tied_weights_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    got = model_size(Tied())
    assert got["bytes"] == 40 * 4 and got["params"] == 40
    assert got["bits_per_weight"] == 32.0 and got["weight_layers"] == 2


def test_same_memory_under_two_parameters_counted_once():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = nn.Parameter(model[0].weight.data)  # a new Parameter over the same storage
    assert model_size(model)["bytes"] == 16 * 4


def test_buffers_and_dtypes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2).half())
    got = model_size(model)
    conv, bn_params, bn_buffers, head = (8 * 27 + 8) * 4, 16 * 4, 16 * 4 + 8, (16 + 2) * 2
    assert got["bytes"] == conv + bn_params + bn_buffers + head
    assert got["params"] == 8 * 27 + 8 + 16 + 18
    assert got["bits_per_weight"] == pytest.approx((8 * 27 * 32 + 16 * 16) / (8 * 27 + 16))
    assert got["weight_layers"] == 2  # conv and linear; batch norm is not a weight layer


def test_quantized_layer():
    torch.manual_seed(0)
    spec = QuantSpec(Int(4, symmetric=False), PerGroup(16))
    float_layer = nn.Linear(64, 32)
    model = nn.Sequential(FakeQLinear(nn.Linear(64, 32), spec), float_layer)
    qt = model[0].qweight
    got = model_size(model)
    assert got["quantized_layers"] == 1 and got["weight_layers"] == 2
    assert got["quantized_bits_per_weight"] == pytest.approx(qt.bits_per_weight)
    assert 4.0 < got["quantized_bits_per_weight"] < 8.0
    assert got["bits_per_weight"] == pytest.approx((qt.nbytes * 8 + 64 * 32 * 32) / (2 * 64 * 32))
    biases = 2 * 32 * 4
    assert got["bytes"] == qt.nbytes + 64 * 32 * 4 + biases  # the buffers are the QTensor: counted once
    assert got["params"] == 2 * 64 * 32 + 2 * 32  # logical weights, not packed bytes


def test_errors_and_directory_bytes(tmp_path):
    with pytest.raises(ModelError, match=r"expected an nn\.Module"):
        model_size({"weight": torch.zeros(2)})
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 23)
    assert directory_bytes(tmp_path) == 123
    assert directory_bytes(tmp_path / "a.bin") == 100
    with pytest.raises(ModelError, match="does not exist"):
        directory_bytes(tmp_path / "missing")
