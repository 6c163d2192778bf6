"""Quantized modules against the numeric reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import UnsupportedError
from lowbit.formats import Int, Log2, NormalFloat
from lowbit.granularity import PerChannel, PerGroup, PerToken
from lowbit.nn import QConv2d, QEmbedding, QLinear, to_quantized
from lowbit.primitives import choose_qparams, dequantize, quantize
from lowbit.recipe import ActivationSpec
from lowbit.spec import QuantSpec
from lowbit.tensor import QTensor


def _fq_tokens(x):
    qp = choose_qparams(x, Int(8), PerToken())
    return dequantize(quantize(x, Int(8), qp, PerToken()), Int(8), qp, PerToken(), x.shape)


def test_qlinear_weight_only_and_dynamic_match_reference(monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")  # exact math; fast kernels are checked in tests/kernels
    lin = nn.Linear(48, 20)
    x = torch.randn(3, 5, 48)
    qt = QTensor.quantize(lin.weight, QuantSpec(Int(4), PerGroup(16)))
    q = QLinear.from_float(lin, qt, ActivationSpec())
    assert torch.equal(q(x), F.linear(x, qt.dequantize(), lin.bias))
    qd = QLinear.from_float(lin, qt, ActivationSpec("dynamic", Int(8)))
    assert torch.equal(qd(x), F.linear(_fq_tokens(x), qt.dequantize(), lin.bias))
    assert q.in_features == 48 and q.out_features == 20 and q.weight.shape == (20, 48)


def test_qlinear_static_uses_calibrated_parameters():
    lin = nn.Linear(8, 4)
    qt = QTensor.quantize(lin.weight, QuantSpec(Int(8)))
    q = QLinear.from_float(lin, qt, ActivationSpec("static", Int(8, symmetric=False)))
    q.set_input_qparams(torch.tensor([0.02]), torch.tensor([128], dtype=torch.uint8))
    x = torch.randn(6, 8)
    codes = torch.clamp(torch.round(x / 0.02) + 128, 0, 255)
    expected = F.linear((codes - 128) * 0.02, qt.dequantize(), lin.bias)
    assert torch.allclose(q(x), expected, atol=1e-6)


class SamePadConv(nn.Conv2d):
    """Like EfficientNet's Conv2dStaticSamePadding: a fixed pad applied in forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((1, 2, 1, 2))

    def forward(self, x):
        return F.conv2d(
            self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


@pytest.mark.parametrize("groups", [1, 4])
def test_qconv2d_matches_conv_with_dequantized_weight(groups):
    conv = SamePadConv(8, 8, 4, stride=2, groups=groups)
    x = torch.randn(2, 8, 11, 13)
    qt = QTensor.quantize(conv.weight, QuantSpec(Int(8), PerChannel()))
    q = QConv2d.from_float(conv, qt, ActivationSpec())
    expected = F.conv2d(conv.static_padding(x), qt.dequantize(), conv.bias, conv.stride, 0, 1, groups)
    assert torch.equal(q(x), expected)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(Int(8), PerChannel()),
        QuantSpec(Int(4, False), PerGroup(16)),
        QuantSpec(NormalFloat(4), PerGroup(32)),
        QuantSpec(Int(3), PerChannel()),
        QuantSpec(Log2(4), PerChannel(1)),
    ],
    ids=lambda s: s.name,
)
def test_qembedding_rows_match_full_dequantize(spec):
    emb = nn.Embedding(50, 33 if spec.format.bits == 3 else 32, padding_idx=0)
    qt = QTensor.quantize(emb.weight, spec)
    q = QEmbedding.from_float(emb, qt, ActivationSpec())
    ids = torch.randint(0, 50, (4, 7))
    assert torch.equal(q(ids), F.embedding(ids, qt.dequantize()))


def test_layers_that_cannot_be_swapped_are_refused():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    lin = Scaled(4, 4)
    qt = QTensor.quantize(lin.weight, QuantSpec(Int(8)))
    with pytest.raises(UnsupportedError, match=r"overrides Linear\.forward"):
        to_quantized(lin, qt, ActivationSpec(), "scaled")
    with pytest.raises(UnsupportedError, match="LSTM"):
        to_quantized(nn.LSTM(4, 4), qt, ActivationSpec(), "lstm")


def test_forced_reference_kernel(monkeypatch):
    lin = nn.Linear(16, 8)
    q = QLinear.from_float(lin, QTensor.quantize(lin.weight, QuantSpec(Int(8))), ActivationSpec())
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")
    from lowbit import kernels

    assert kernels.select("linear", q, torch.randn(2, 16)).name == "reference"
    monkeypatch.setenv("LOWBIT_KERNEL", "no-such-kernel")
    with pytest.raises(UnsupportedError, match="no-such-kernel"):
        q(torch.randn(2, 16))


class _MatmulLinear(nn.Linear):
    """Like Falcon's FalconLinear: its own forward, the same arithmetic."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class _ScaledLinear(nn.Linear):
    """A forward that is not a plain linear (an extra factor, as a LoRA term would add)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_linear_subclasses_are_quantized_only_when_they_compute_a_linear(tmp_path):
    import lowbit
    from lowbit.errors import UnsupportedError

    def build():
        torch.manual_seed(0)
        return nn.Sequential(_MatmulLinear(16, 8), nn.ReLU(), nn.Linear(8, 4))

    model = build()
    x = torch.randn(5, 16)
    reference = model(x)
    lowbit.quantize(model, "w8-weight")
    assert isinstance(model[0], QLinear)
    torch.testing.assert_close(model(x), reference, rtol=0.05, atol=0.02)
    skeleton = build()
    nn.init.constant_(skeleton[0].weight, float("nan"))  # whatever the skeleton holds, it loads
    back = lowbit.load(lowbit.save(model, tmp_path / "q"), module=skeleton).model
    torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)
    with pytest.raises(UnsupportedError, match=r"overrides Linear\.forward"):
        lowbit.quantize(nn.Sequential(_ScaledLinear(16, 8)), "w8-weight")
