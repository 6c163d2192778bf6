"""quantize(model, recipe, calib): the one place that walks a model and swaps its layers.

Layers that need calibration statistics are quantized block by block when the model is
built from repeated blocks (each block sees the outputs of the already-quantized blocks
before it, and only one block's statistics are held at a time); other layers use one
calibration pass over the whole model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, sparse
from .algorithms import Algorithm, as_result, get_algorithm
from .algorithms.awq import awq_target, search_rows, search_scales
from .calibration import collect_statistics
from .errors import DataError, SpecError
from .models import Loaded
from .nn import WEIGHT_BUFFERS, QModule, same_weight, set_submodule, to_quantized
from .nn.transposed import conv1d_as_linear, is_conv1d
from .primitives import check_finite, qparams_from_range
from .ranges import MinMax, MovingMinMax
from .recipe import LayerScheme, Recipe, resolve_recipe
from .sequential import find_blocks, fold_into_norm, is_norm, run_sequential


@dataclass
class QuantizationRecord:
    """What was done to a model: kept on it as ``model.lowbit`` for saving and reports."""

    recipe: Recipe
    schemes: dict[str, LayerScheme] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # {"model": spec, "sha256": digest}
    kind: str = "encoder"
    architecture: dict[str, Any] = field(default_factory=dict)
    folded: dict[str, list[str]] = field(default_factory=dict)  # norm -> layers whose scales it absorbed
    journal: Any = None  # the BlockJournal of this run, removed once the checkpoint is saved
    resumed_blocks: int = 0  # blocks taken from the journal instead of quantized again


def stats_needed(algorithm: Algorithm, scheme: LayerScheme) -> set[str]:
    """Calibration statistics a layer's scheme uses."""
    needs = set(algorithm.stats_for(scheme.options))
    if scheme.activation.mode == "static":
        needs |= {"range", "channels"}
        if not isinstance(scheme.activation.range, (MinMax, MovingMinMax)):
            needs.add("samples")  # an input smoothed by the algorithm has its range estimated from sampled rows
    if scheme.bias_correction:
        needs.add("mean")
    return needs


def bias_shift(weight: torch.Tensor, effective: torch.Tensor, mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Expected output error (W - W_q) E[x] per output channel (bias correction)."""
    from .algorithms.smoothquant import input_channel_view

    diff = (weight.float() - effective.float()).reshape(weight.shape[0], weight.shape[1], -1).sum(dim=2)
    return (diff * mean.float()[input_channel_view(weight, groups)]).sum(dim=1)


def build_layer(layer: nn.Module, result, scheme: LayerScheme, stats, name: str) -> QModule:
    """The quantized replacement of ``layer`` from an algorithm's result."""
    new = to_quantized(layer, result.qweight, scheme.activation, name)
    if result.smooth is not None:
        new.set_input_smooth(result.smooth)
    if result.outlier_index is not None:
        new.set_outliers(result.outlier_index, result.outlier_weight)
    bias = result.bias
    if scheme.bias_correction:
        groups = getattr(layer, "groups", 1)
        effective = result.qweight.dequantize(torch.float32)
        if result.smooth is not None:
            from .algorithms.smoothquant import scale_input_channels

            effective = scale_input_channels(effective, 1.0 / result.smooth, groups)
        shift = bias_shift(layer.weight.detach(), effective, stats.channel_mean, groups)
        base = layer.bias.detach().float() if layer.bias is not None else torch.zeros(shift.shape)
        bias = base + shift
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone().to(layer.weight.dtype), requires_grad=False)
    if scheme.activation.mode == "static":
        lo, hi = stats.input_range(scheme.activation, result.smooth)
        qp = qparams_from_range(scheme.activation.format, lo, hi)
        new.set_input_qparams(qp.scale, qp.zero_point)
    new.train(layer.training)
    return new


def global_magnitude_threshold(module: nn.Module, plan: dict[str, LayerScheme]) -> float | None:
    """The |w| below which weights are pruned across all layers with global sparsity."""
    chosen = [n for n, s in plan.items() if s.sparsity is not None and s.sparsity.scope == "global"]
    if not chosen:
        return None
    ratios = {plan[n].sparsity.ratio for n in chosen}
    if len(ratios) > 1:
        raise SpecError(f"global sparsity needs one ratio for all its layers, got {sorted(ratios)}")
    values = torch.cat([module.get_submodule(n).weight.detach().abs().reshape(-1) for n in chosen])
    k = round(ratios.pop() * values.numel())
    return float(values.kthvalue(k).values) if k else -1.0


class _Quantizer:
    """Quantizes named layers of one model and records what it did."""

    def __init__(self, module: nn.Module, plan: dict[str, LayerScheme], record: QuantizationRecord) -> None:
        self.module, self.plan, self.record = module, plan, record
        self.algorithms = {name: get_algorithm(s.algorithm, name) for name, s in plan.items()}
        self.global_threshold = global_magnitude_threshold(module, plan)

    def keep_mask(self, name: str, weight: torch.Tensor) -> torch.Tensor | None:
        """The magnitude-pruning mask of a layer (SparseGPT chooses its own inside GPTQ)."""
        sparsity = self.plan[name].sparsity
        if sparsity is None or sparsity.method != "magnitude":
            return None
        if sparsity.pattern == "2:4":
            return sparse.n_m_mask(weight, 2, 4)
        if sparsity.scope == "global":
            return weight.abs() > self.global_threshold
        return sparse.magnitude_mask(weight, sparsity.ratio)

    def layer(self, name: str, stats, root: nn.Module | None = None, prefix: str = "", **extra) -> None:
        root = root or self.module
        scheme = self.plan[name]
        start = time.perf_counter()
        layer = root.get_submodule(name[len(prefix) :])
        weight = layer.weight.detach()
        if scheme.sparsity is not None:
            extra = {**extra, "sparsity": scheme.sparsity, "keep": self.keep_mask(name, weight)}
        with torch.no_grad():
            result = as_result(
                self.algorithms[name].fn(
                    weight,
                    scheme.weight,
                    stats,
                    name=name,
                    activation=scheme.activation,
                    groups=getattr(layer, "groups", 1),
                    **scheme.options,
                    **extra,
                )
            )
        set_submodule(root, name[len(prefix) :], build_layer(layer, result, scheme, stats, name))
        self.record.schemes[name] = scheme
        self.record.seconds[name] = time.perf_counter() - start

    def block(
        self, block: nn.Module, prefix: str, names: list[str], stats: dict, inputs: dict, norm_outputs: dict, probe
    ) -> None:
        """Quantize the named layers of one block; AWQ layers reading the same input share their
        scales, which are then folded into the producing norm where that leaves the block unchanged."""
        groups: dict[int, list[str]] = {}
        for name in names:
            if self.plan[name].algorithm == "awq" and name in inputs:
                groups.setdefault(id(inputs[name]), []).append(name)
        shared: dict[str, torch.Tensor] = {}
        for members in groups.values():
            specs = {self.plan[m].weight for m in members}
            if len(members) > 1 and len(specs) == 1:
                options = self.plan[members[0]].options
                asymmetric = options.get("asymmetric") is True
                weights = [
                    awq_target(block.get_submodule(m[len(prefix) :]).weight.detach().float(), stats[m], asymmetric)
                    for m in members
                ]
                duo = bool(options.get("duo", False))
                rows = search_rows(stats[members[0]], asymmetric)
                scale = search_scales(weights, rows, specs.pop(), options.get("grid", 20), duo)
                shared.update({m: scale for m in members})
        for name in names:
            extra = {"shared_scale": shared[name]} if name in shared else {}
            self.layer(name, stats.get(name), block, prefix, **extra)
        for members in groups.values():
            producer = next((n for n, out in norm_outputs.items() if out is inputs[members[0]]), None)
            foldable = producer is not None and len(members) > 1 and all(m in shared for m in members)
            if foldable and fold_into_norm(block, prefix, producer, members, probe):
                self.record.folded[producer] = members


def quantize(
    model: nn.Module | Loaded,
    recipe: str | Path | Recipe,
    calib: Iterable[Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    sequential: bool = True,
    journal: str | Path | None = None,
    resume: bool = False,
) -> nn.Module:
    """Quantize ``model`` in place per ``recipe`` (preset name, file, or Recipe) and return it.

    ``calib`` is an iterable of batches (dicts of tensors, tuples or tensors), needed when a
    scheme uses static activations or a data-driven algorithm; a ``Loaded`` model gets its
    default calibration data when none is given. ``sequential=False`` collects all statistics
    in one pass over the float model instead of block by block.

    ``journal`` is a directory where a block-by-block run saves every finished block; with
    ``resume=True`` a run with the same model, recipe and data continues after the blocks saved
    there (same result, to the byte). ``lowbit.save`` removes the journal once the checkpoint exists."""
    module = model.model if isinstance(model, Loaded) else model
    recipe = resolve_recipe(recipe)
    already = [name for name, m in module.named_modules() if isinstance(m, QModule)]
    if already:
        raise SpecError(f"the model is already quantized ({already[:3]}...); start from the float model")
    plan = recipe.resolve(module)
    if not plan:
        raise SpecError(f"recipe {recipe.name!r} matches no Linear/Conv2d/Embedding layer of this model")
    for name, scheme in plan.items():
        if scheme.weight is None:
            raise SpecError(f"{name}: the scheme has no weight spec; use fp16/bf16 to keep weights in float")
        weight = module.get_submodule(name).weight
        if weight.numel() == 0:
            raise SpecError(
                f"{name}: the weight has zero elements (shape {list(weight.shape)}); there is nothing to "
                "quantize, remove the layer or exclude it from the recipe"
            )
        check_finite(weight, f"{name}.weight")
    snapshot = _Snapshot(module, plan)
    try:
        for name in plan:  # GPT-2's Conv1D: quantized as the Linear it is (weight transposed)
            if is_conv1d(module.get_submodule(name)):
                set_submodule(module, name, conv1d_as_linear(module.get_submodule(name)))
        return _quantize_planned(model, module, recipe, plan, calib, progress, sequential, journal, resume)
    except BaseException:
        snapshot.restore()  # a failed run leaves the float model as it was, ready for another try
        raise


class _Snapshot:
    """What a quantization run changes in the model: the planned layers (swapped for quantized
    ones) and the norms' parameters (AWQ/SmoothQuant fold their divisors into them)."""

    def __init__(self, module: nn.Module, plan: dict[str, LayerScheme]) -> None:
        self.module = module
        self.layers = {name: module.get_submodule(name) for name in plan}
        self.norms = {
            name: {key: value.detach().clone() for key, value in norm.state_dict().items()}
            for name, norm in module.named_modules()
            if is_norm(norm)
        }

    def restore(self) -> None:
        for name, layer in self.layers.items():
            set_submodule(self.module, name, layer)
        for name, state in self.norms.items():
            self.module.get_submodule(name).load_state_dict(state)
        if hasattr(self.module, "lowbit"):
            del self.module.lowbit


def _quantize_planned(
    model: nn.Module | Loaded,
    module: nn.Module,
    recipe: Recipe,
    plan: dict[str, LayerScheme],
    calib: Iterable[Any] | None,
    progress: Callable[[str, int, int], None] | None,
    sequential: bool,
    journal: str | Path | None,
    resume: bool,
) -> nn.Module:
    """quantize() after its checks: statistics, algorithms and layer swaps."""
    record = QuantizationRecord(recipe)
    if isinstance(model, Loaded):
        record.source = {"model": model.source, "sha256": model.sha256}
        record.kind, record.architecture = model.kind, dict(model.meta)
    tied = tied_layers(module, plan)
    quantizer = _Quantizer(module, plan, record)
    needs = {name: stats_needed(quantizer.algorithms[name], scheme) for name, scheme in plan.items()}
    if not any(needs.values()):
        for index, name in enumerate(plan):
            if progress is not None:
                progress(name, index, len(plan))
            quantizer.layer(name, None)
        share_tied(module, tied)
        module.lowbit = record
        return module
    if calib is None and isinstance(model, Loaded):
        from .calibration import calibration_data

        calib = calibration_data(model)  # the default data for this kind of model
    if calib is None:
        raise DataError(
            f"recipe {recipe.name!r} needs calibration data (static activations or a data-driven "
            "algorithm); pass calib= (CLI: --calib PATH)"
        )
    batches = list(calib)
    if not batches:
        raise DataError("calibration data is empty; give at least one batch")
    blocks = find_blocks(module) if sequential else None
    inside = {n for n in plan if blocks is not None and n.startswith(blocks[0] + ".")}
    if inside and any(needs[n] for n in inside):
        block_journal = None
        if journal is not None and distributed.world() > 1:
            if resume:
                raise SpecError(
                    "--resume continues a single-process run (each torchrun process holds only its share of "
                    "the calibration batches); run the resumed job without torchrun, or drop --resume"
                )
            journal = None  # no crash journal under torchrun
        if journal is not None:
            from .journal import BlockJournal, fingerprint

            block_journal = BlockJournal(journal, fingerprint(module, recipe.to_dict(), batches), resume)
            block_journal.restore(module, blocks[0], record)
            record.journal, record.resumed_blocks = block_journal, block_journal.done
        inner = {n: needs[n] for n in inside}
        run_sequential(module, blocks, plan, inner, batches, quantizer.block, progress, block_journal)
    else:
        inside = set()
    rest = [n for n in plan if n not in inside]
    stats = collect_statistics(module, plan, batches, {n: needs[n] for n in rest}) if rest else {}
    for name in rest:
        quantizer.layer(name, stats.get(name))
    share_tied(module, tied)
    module.lowbit = record
    return module


def tied_layers(module: nn.Module, plan: dict[str, LayerScheme]) -> list[list[str]]:
    """Groups of planned layers that share one weight tensor (a tied embedding and LM head)."""
    groups: dict[int, list[str]] = {}
    for name in plan:
        groups.setdefault(id(module.get_submodule(name).weight), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def share_tied(module: nn.Module, groups: list[list[str]]) -> None:
    """Layers that shared a float weight and came out with the same codes and scales share them
    again (stored once, read from one copy); others keep their own."""
    for names in groups:
        first = module.get_submodule(names[0])
        for name in names[1:]:
            other = module.get_submodule(name)
            if isinstance(first, QModule) and isinstance(other, QModule) and same_weight(first, other):
                for key in WEIGHT_BUFFERS:
                    setattr(other, key, getattr(first, key))
