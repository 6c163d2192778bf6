"""Quantization-aware training: ``prepare_qat`` inserts fake quantization as a recipe says,
the model trains in the user's own loop (or ``fit``), and ``convert`` turns it into the same
QLinear/QConv2d modules and checkpoint format as post-training quantization."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import forward_batch
from .errors import DataError, SpecError
from .models import Loaded
from .nn import QConv2d, QLinear, QModule, set_submodule
from .nn.fake import FakeQuantConv2d, FakeQuantLinear, _FakeQuantLayer
from .nn.transposed import conv1d_as_linear, is_conv1d
from .primitives import quantize
from .quantize import QuantizationRecord
from .recipe import Recipe, resolve_recipe
from .tensor import QTensor


def _bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) sibling pairs where the BatchNorm directly follows a Conv2d of matching width."""
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in itertools.pairwise(children):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.num_features == a.out_channels:
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def fold_batchnorm(model: nn.Module, example: Any) -> list[str]:
    """Fold each BatchNorm that directly follows a Conv2d into the conv (running statistics,
    so the BN is frozen) and replace it with Identity; a fold that changes the model's output
    on ``example`` (the BN did not consume that conv's output) is undone. Returns the folded BNs."""
    was_training = model.training
    model.eval()
    folded = []
    with torch.no_grad():
        for conv_name, bn_name in _bn_pairs(model):
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
            before = forward_batch(model, example)
            saved_w = conv.weight.data.clone()
            saved_b = None if conv.bias is None else conv.bias.data.clone()
            factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.data = conv.weight.data * factor.view(-1, 1, 1, 1)
            bias = saved_b if saved_b is not None else torch.zeros_like(bn.running_mean)
            new_bias = (bias - bn.running_mean) * factor + bn.bias
            if conv.bias is None:
                conv.bias = nn.Parameter(new_bias)
            else:
                conv.bias.data = new_bias
            set_submodule(model, bn_name, nn.Identity())
            after = forward_batch(model, example)
            if torch.allclose(after, before, rtol=1e-3, atol=1e-4 * float(before.abs().max())):
                folded.append(bn_name)
                continue
            conv.weight.data = saved_w  # not a conv -> bn chain in the forward: undo
            conv.bias = None if saved_b is None else nn.Parameter(saved_b)
            set_submodule(model, bn_name, bn)
    model.train(was_training)
    return folded


def prepare_qat(
    model: nn.Module | Loaded, recipe: str | Path | Recipe, warmup: int = 100, example: Any = None
) -> nn.Module:
    """Insert fake quantization per ``recipe``; with ``example`` (one input batch), BatchNorms
    after convolutions are folded and frozen first. Trains in any loop over ``model.parameters()``."""
    module = model.model if isinstance(model, Loaded) else model
    recipe = resolve_recipe(recipe)
    if any(isinstance(m, (QModule, _FakeQuantLayer)) for m in module.modules()):
        raise SpecError("the model is already quantized or prepared; start from the float model")
    folded = fold_batchnorm(module, example) if example is not None else []
    plan = recipe.resolve(module)
    if recipe.head is not None:  # QAT trains Linear/Conv2d layers; the recipe's embedding tables stay float
        plan = {n: s for n, s in plan.items() if not isinstance(module.get_submodule(n), nn.Embedding)}
    if not plan:
        raise SpecError(f"recipe {recipe.name!r} matches no Linear/Conv2d layer of this model")
    for name, scheme in plan.items():
        layer = module.get_submodule(name)
        if scheme.weight is None:
            raise SpecError(f"{name}: QAT needs a weight spec in the scheme")
        if is_conv1d(layer):  # GPT-2's Conv1D: trained as the Linear it is
            layer = conv1d_as_linear(layer)
        if isinstance(layer, nn.Linear):
            new = FakeQuantLinear(layer, scheme, warmup)
        elif isinstance(layer, nn.Conv2d):
            new = FakeQuantConv2d(layer, scheme, warmup)
        else:
            raise SpecError(f"{name}: QAT handles Linear and Conv2d layers, not {type(layer).__name__}")
        set_submodule(module, name, new)
    record = QuantizationRecord(recipe, dict(plan))
    if isinstance(model, Loaded):
        record.source = {"model": model.source, "sha256": model.sha256}
        record.kind, record.architecture = model.kind, dict(model.meta)
    module.lowbit_qat = record
    module.lowbit_folded_bn = folded
    return module


def _to_quantized(layer: _FakeQuantLayer) -> QModule:
    scheme = layer.scheme
    weight = layer.weight.detach()
    qp = layer.weight_fq.qparams(weight)
    spec = scheme.weight
    codes = quantize(weight, spec.format, qp, spec.granularity)
    qweight = QTensor.from_codes(codes, qp, spec, weight.shape, weight.dtype)
    bias = None if layer.bias is None else layer.bias.detach()
    if isinstance(layer, FakeQuantConv2d):
        new = QConv2d(
            qweight,
            scheme.activation,
            bias,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            pre_pad=layer.pre_pad,
        )
    else:
        new = QLinear(qweight, scheme.activation, bias)
    if scheme.activation.mode == "static":
        act = layer.act_fq.input_qparams()
        new.set_input_qparams(act.scale, act.zero_point)
    return new.eval()


def convert(model: nn.Module | Loaded) -> nn.Module:
    """Replace every fake-quantized layer by its QLinear/QConv2d (same numerics as the trained
    fake-quant forward in eval mode); the result saves with ``lowbit.save``."""
    module = model.model if isinstance(model, Loaded) else model
    record: QuantizationRecord | None = getattr(module, "lowbit_qat", None)
    if record is None:
        raise SpecError("convert() needs a model prepared with prepare_qat()")
    for name in list(record.schemes):
        layer = module.get_submodule(name)
        if isinstance(layer, _FakeQuantLayer):
            set_submodule(module, name, _to_quantized(layer))
    module.lowbit = record
    del module.lowbit_qat
    return module.eval()


def distillation_loss(student_out: Any, teacher_out: Any, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """KL on logits, MSE on embeddings (last hidden state), or cross-entropy with labels."""
    s = getattr(student_out, "logits", None)
    t = getattr(teacher_out, "logits", None)
    if kind == "kl":
        s = s if s is not None else student_out
        t = t if t is not None else teacher_out
        return (
            F.kl_div(
                F.log_softmax(s / temperature, -1),
                F.log_softmax(t / temperature, -1),
                reduction="batchmean",
                log_target=True,
            )
            * temperature**2
        )
    if kind == "mse":
        s = getattr(student_out, "last_hidden_state", student_out)
        t = getattr(teacher_out, "last_hidden_state", teacher_out)
        return F.mse_loss(s, t)
    raise SpecError(f"distillation loss {kind!r} is unknown; use 'kl' (logits) or 'mse' (embeddings)")


def fit(
    model: nn.Module,
    batches: Iterable[Any],
    teacher: nn.Module | None = None,
    loss: str = "kl",
    epochs: int = 1,
    lr: float = 1e-4,
    seed: int = 0,
    targets: Callable[[Any], torch.Tensor] | None = None,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """A small training loop for prepared models: distillation from ``teacher`` (``loss`` "kl"
    on logits or "mse" on embeddings) or, with ``targets(batch) -> labels``, cross-entropy.
    Adam over all parameters (weights, biases, learned scales); seeded and deterministic."""
    torch.manual_seed(seed)
    batches = list(batches)
    if not batches:
        raise DataError("fit() needs at least one batch")
    if teacher is None and targets is None:
        raise SpecError("fit() needs a teacher (distillation) or targets (labels)")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    if teacher is not None:
        teacher.eval()
    history = []
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(batches)).tolist()
        for i in order:
            batch = batches[i]
            out = forward_batch(model, batch)
            if targets is not None:
                value = F.cross_entropy(getattr(out, "logits", out), targets(batch))
            else:
                with torch.no_grad():
                    ref = forward_batch(teacher, batch)
                value = distillation_loss(out, ref, loss)
            if not math.isfinite(float(value.detach() if torch.is_tensor(value) else value)):
                raise DataError(f"training diverged at step {step} (loss {float(value)}); lower the learning rate")
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            history.append(float(value.detach()))
            if log is not None:
                log(step, history[-1])
            step += 1
    model.eval()
    return history
