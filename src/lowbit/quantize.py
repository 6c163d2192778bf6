"""quantize(model, recipe, calib): the one place that walks a model and swaps its layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .algorithms import as_result, get_algorithm
from .calibration import collect_statistics
from .errors import DataError, SpecError
from .models import Loaded
from .nn import QModule, set_submodule, to_quantized
from .primitives import check_finite, qparams_from_range
from .recipe import LayerScheme, Recipe, resolve_recipe


@dataclass
class QuantizationRecord:
    """What was done to a model: kept on it as ``model.lowbit`` for saving and reports."""

    recipe: Recipe
    schemes: dict[str, LayerScheme] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # {"model": spec, "sha256": digest}
    kind: str = "encoder"
    architecture: dict[str, Any] = field(default_factory=dict)


def quantize(
    model: nn.Module | Loaded,
    recipe: str | Path | Recipe,
    calib: Iterable[Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> nn.Module:
    """Quantize ``model`` in place per ``recipe`` (preset name, file, or Recipe) and return it.

    ``calib`` is an iterable of batches (dicts of tensors, tuples or tensors) needed when a
    scheme uses static activations or a data-driven algorithm."""
    import time

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
        check_finite(module.get_submodule(name).weight, f"{name}.weight")
    algorithms = {name: get_algorithm(scheme.algorithm, name) for name, scheme in plan.items()}
    needs = {
        name: set(algorithms[name].stats) | ({"range", "channels"} if scheme.activation.mode == "static" else set())
        for name, scheme in plan.items()
    }
    stats = {}
    if any(needs.values()):
        if calib is None and isinstance(model, Loaded):
            from .calibration import calibration_data

            calib = calibration_data(model)  # the default data for this kind of model
        if calib is None:
            raise DataError(
                f"recipe {recipe.name!r} needs calibration data (static activations or a data-driven "
                "algorithm); pass calib= (CLI: --calib PATH)"
            )
        stats = collect_statistics(module, plan, list(calib), needs)
    record = QuantizationRecord(recipe)
    if isinstance(model, Loaded):
        record.source = {"model": model.source, "sha256": model.sha256}
        record.kind, record.architecture = model.kind, dict(model.meta)
    for index, (name, scheme) in enumerate(plan.items()):
        if progress is not None:
            progress(name, index, len(plan))
        start = time.perf_counter()
        layer = module.get_submodule(name)
        with torch.no_grad():
            result = as_result(
                algorithms[name].fn(
                    layer.weight.detach(),
                    scheme.weight,
                    stats.get(name),
                    name=name,
                    activation=scheme.activation,
                    groups=getattr(layer, "groups", 1),
                    **scheme.options,
                )
            )
        new = to_quantized(layer, result.qweight, scheme.activation, name)
        if result.smooth is not None:
            new.set_input_smooth(result.smooth)
        if result.bias is not None:
            new.bias = nn.Parameter(result.bias.detach().clone(), requires_grad=False)
        if scheme.activation.mode == "static":
            lo, hi = stats[name].input_range(scheme.activation, result.smooth)
            qp = qparams_from_range(scheme.activation.format, lo, hi)
            new.set_input_qparams(qp.scale, qp.zero_point)
        new.train(layer.training)
        set_submodule(module, name, new)
        record.schemes[name] = scheme
        record.seconds[name] = time.perf_counter() - start
    module.lowbit = record
    return module
