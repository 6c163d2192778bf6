"""QAT: straight-through gradients, learned scales, BN folding, prepare/convert round trip,
determinism, and a real (small) training run on scikit-learn digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import SpecError
from lowbit.nn import QConv2d, QLinear
from lowbit.nn.fake import FakeQuantConv2d, FakeQuantLinear
from lowbit.qat import convert, fit, fold_batchnorm, prepare_qat
from lowbit.recipe import Recipe


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def recipe(weight: str, act: str | None = "static") -> Recipe:
    rule = {"weight": weight}
    if act:
        rule["activation"] = {"mode": act, "format": "int8-asym" if act == "static" else "int8"}
    return Recipe.from_dict({"include_head": True, "rules": [rule]})


def test_batchnorm_folding_keeps_the_eval_output():
    model = cnn()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        model.train()
        model(x)  # non-trivial running statistics
        model.eval()
        ref = model(x)
    folded = fold_batchnorm(model, x)
    assert folded == ["1", "4"]
    assert isinstance(model[1], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)


@pytest.mark.parametrize("weight", ["int4", "int2-asym", "nf4", "ternary", "binary", "log2-4"])
@pytest.mark.parametrize("act", ["static", "dynamic", None])
def test_prepare_convert_round_trip_equals_the_fake_quant_forward(weight, act, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNEL", "reference")  # exact math; fast kernels are checked in tests/kernels
    model = cnn()
    x = torch.randn(8, 1, 8, 8)
    prepare_qat(model, recipe(weight, act), warmup=2, example=x)
    assert isinstance(model[0], FakeQuantConv2d) and isinstance(model[7], FakeQuantLinear)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(4):  # past warm-up: learned scales move
        loss = model(torch.randn(8, 1, 8, 8)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        fake = model(x)
    convert(model)
    assert isinstance(model[0], QConv2d) and isinstance(model[7], QLinear)
    with torch.no_grad():
        real = model(x)
    # The same codes and scales: equal up to float summation order (tolerance 1e-5 relative).
    assert torch.allclose(real, fake, rtol=1e-5, atol=1e-5 * float(fake.abs().max()))


def test_learned_scales_receive_gradients_and_binary_uses_identity_ste():
    lin = nn.Linear(16, 4)
    model = nn.Sequential(lin)
    prepare_qat(model, recipe("int4", None), warmup=0)
    out = model(torch.randn(5, 16)).sum()
    out.backward()
    assert model[0].weight_fq.scale.grad is not None and torch.isfinite(model[0].weight_fq.scale.grad).all()
    model = nn.Sequential(nn.Linear(16, 4))
    prepare_qat(model, recipe("binary", None))
    model(torch.randn(5, 16)).sum().backward()
    assert torch.all(model[0].weight.grad != 0)  # identity straight-through: every weight learns


def test_codebook_weights_are_refused():
    with pytest.raises(SpecError, match="codebook"):
        prepare_qat(nn.Sequential(nn.Linear(8, 8)), recipe("vq16x2", None))


def _digits():
    from lowbit.data import images

    digits = images("digits")
    x, y = digits.images.float(), digits.labels
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _train_float(x, y):
    model = cnn(0)
    batches = [x[i : i + 64] for i in range(0, len(x), 64)]
    labels = {id(b): y[i : i + 64] for b, i in zip(batches, range(0, len(x), 64))}
    fit(model, batches, targets=lambda b: labels[id(b)], epochs=6, lr=3e-3, seed=0)
    return model, batches, labels


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


@pytest.mark.slow
def test_qat_recovers_binary_on_digits_and_is_reproducible():
    x, y, xt, yt = _digits()
    float_model, batches, labels = _train_float(x, y)
    float_acc = _accuracy(float_model, xt, yt)
    assert float_acc > 0.9
    binary = Recipe.from_dict(
        {
            "include_head": True,
            "rules": [  # every layer binary: PTQ collapses
                {"weight": "binary", "activation": {"mode": "static", "format": "int8-asym"}}
            ],
        }
    )
    import copy

    ptq = copy.deepcopy(float_model)
    lowbit.quantize(ptq, binary, calib=batches[:4])
    ptq_acc = _accuracy(ptq, xt, yt)
    runs = []
    for _ in range(2):
        qat = copy.deepcopy(float_model)
        prepare_qat(qat, binary, warmup=10, example=batches[0])
        fit(qat, batches, targets=lambda b: labels[id(b)], epochs=3, lr=1e-3, seed=1)
        convert(qat)
        runs.append(_accuracy(qat, xt, yt))
    assert runs[0] == runs[1]  # same seed, same accuracy to the last digit
    assert runs[0] > ptq_acc + 0.1, (float_acc, ptq_acc, runs[0])  # measured: 0.725 PTQ, 0.902 QAT
