"""Per-layer sensitivity: for every quantizable layer and candidate scheme, the damage done by
quantizing that layer alone.

Two measurements per (layer, candidate): the layer's relative output error on sampled
calibration inputs, and the end-to-end change of the model's metric with only that layer
quantized (KL divergence to the float model per token for causal LMs, 1 - mean
sentence-embedding cosine for encoders, KL divergence of predictions for classifiers: smoother
than accuracy on small sets; with labels, the drop of the expected accuracy, the mean
probability of the true class). The table is cached on disk, keyed by model digest, candidates
and data. The blocks before a layer's block are replayed from their recorded float outputs
(``replay``), not recomputed. Method "fisher" estimates the end-to-end damages instead, from one
backward pass per batch (fisher.py, fisher_table.py): on an LLM, minutes for a fine grid where
measuring takes an hour for four.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..algorithms import as_result, get_algorithm
from ..calibration import collect_statistics, forward_batch
from ..errors import SpecError
from ..evaluation.embedding import encoder_hidden
from ..io import write_json
from ..journal import hash_value
from ..models import Loaded, cache_dir
from ..nn import set_submodule
from ..presets import get_preset
from ..quantize import build_layer, stats_needed
from ..recipe import LayerScheme, Recipe, Rule
from ..sequential import find_blocks
from ..sparse import magnitude_mask, n_m_mask
from .latency import latency_batch, layer_latencies
from .replay import BlockReplay
from .targets import get_target

DEFAULT_CANDIDATES = ("fp16", "w8-weight", "w4-g128", "w3-g128", "w2-g64", "nf4-g64", "w4-g128-2of4")
# The Fisher estimate prices a candidate for the cost of quantizing the layer, so it gets a fine
# grid: a plan can then move a layer by a fraction of a bit instead of 4 -> 3 or 4 -> 8. The
# grid is one family (uniform integer grids by bits and group size), where the estimate was
# checked; measured on SmolLM2, adding nf4-g64 and 2:4 made the plan at w4-g128 size worse
# (nf4 layers were chosen 57 times and under-priced: predicted 0.205, achieved 0.245).
FISHER_CANDIDATES = (
    "fp16",
    "w8-weight",
    *(f"w{bits}-g{group}" for bits in (6, 5, 4, 3, 2) for group in (32, 64, 128)),
)
METHODS = ("measured", "fisher")
METRICS = {"causal-lm": "KL divergence per token", "encoder": "1 - cosine", "image-classifier": "KL divergence"}
EXPECTED_ACCURACY = "expected accuracy drop"


def candidate_scheme(name: str) -> LayerScheme:
    """The per-layer scheme of preset ``name`` (its first rule)."""
    return get_preset(name).rules[0].scheme


class Metric:
    """End-to-end damage of a model relative to its float reference, on fixed batches."""

    def __init__(
        self, kind: str, model: nn.Module, batches: list[Any], labels: list[torch.Tensor] | None = None
    ) -> None:
        self.kind, self.batches, self.labels = kind, batches, labels
        if labels is not None and (kind in ("causal-lm", "encoder") or len(labels) != len(batches)):
            raise SpecError(
                f"labels are for classifiers, one tensor per evaluation batch (got {len(labels)} for "
                f"{len(batches)} batches of a {kind} model)"
            )
        self.reference = [self._reference_form(self.outputs(model, b)) for b in batches]  # KL: log-probs once

    def outputs(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with torch.inference_mode():
            return metric_outputs(self.kind, model, batch)

    def _reference_form(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs in the form the reference is stored in (log-probabilities where the damage is a KL)."""
        return (
            F.log_softmax(out, -1)
            if self.kind == "causal-lm" or (self.kind != "encoder" and self.labels is None)
            else out
        )

    def replay_matches(self, model: nn.Module, replay: BlockReplay) -> bool:
        """Whether the model run with its first blocks replayed gives the outputs of a full forward
        pass on the first batch (it does for a stack of blocks run in sequence; not for, e.g., parallel branches)."""
        full = self._reference_form(self.outputs(model, self.batches[0]))
        replay.current = 0
        with replay.active():
            out = self._reference_form(self.outputs(model, self.batches[0]))
        return out.shape == full.shape and torch.allclose(out, full, rtol=1e-5, atol=1e-5)

    def damage(self, model: nn.Module, replay: BlockReplay | None = None) -> float:
        """KL to the float predictions per token (LM: the expected loss increase if the text followed the
        float model, with far less noise than the loss change on the batch's own tokens, which
        can even be negative and misleads the planner), 1 - cosine (encoder), KL per image
        (classifier), or the drop of expected accuracy (classifier with labels)."""
        total = 0.0
        for index, (batch, ref) in enumerate(zip(self.batches, self.reference, strict=True)):
            if replay is None:
                out = self.outputs(model, batch)
            else:
                replay.current = index
                with replay.active():
                    out = self.outputs(model, batch)
            if self.kind == "causal-lm":  # the expected loss increase when tokens follow the float model
                total += _kl(out.flatten(0, -2), ref.flatten(0, -2))
            elif self.kind == "encoder":
                total += float(1.0 - (out * ref).sum(-1).mean())
            elif self.labels is not None:  # drop of the expected accuracy (mean probability of the true class)
                y = self.labels[index].reshape(-1, 1)
                total += float(ref.softmax(-1).gather(1, y).mean() - out.softmax(-1).gather(1, y).mean())
            else:
                total += _kl(out, ref)
        return total / len(self.batches)


def metric_outputs(kind: str, model: nn.Module, batch: Any) -> torch.Tensor:
    """What the metric compares: logits (causal LM, classifier) or the normalised mean-pooled
    sentence embedding (encoder). Runs with autograd if the caller enables it."""
    out = forward_batch(model, batch)
    if kind == "causal-lm":
        return out.logits.float()
    if kind == "encoder":
        hidden = encoder_hidden(model, batch, out)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
    return getattr(out, "logits", out).float()


@contextlib.contextmanager
def operating_point(
    model: nn.Module, layers: list[str], scheme: LayerScheme | None, stats: dict
) -> Iterator[dict[str, nn.Module]]:
    """Yields the float layers by name; while inside, each is replaced by its ``scheme``
    quantization (when a scheme is given). The float layers are back in place afterwards."""
    floats = {n: model.get_submodule(n) for n in layers}
    try:
        if scheme is not None:
            for name in layers:
                set_submodule(model, name, quantize_one(floats[name], name, scheme, stats.get(name)))
        yield floats
    finally:
        for name in layers:
            set_submodule(model, name, floats[name])


def _measure_pairs(
    model: nn.Module,
    floats: dict[str, nn.Module],
    pairs: list[tuple[str, str]],
    schemes: dict[str, LayerScheme],
    stats: dict,
    metric: Metric,
    base: str | None,
    base_damage: float | None,
    progress: Callable[[str, int, int], None] | None,
) -> list[dict[str, Any]]:
    """Per (layer, candidate): bytes, bits/weight, layer error and the damage with that layer
    quantized by the candidate and every other layer as it is in ``model`` now."""
    replay = BlockReplay(model, metric.batches) if find_blocks(model) is not None else None
    checked: dict[int, bool] = {}  # per block: replaying the blocks before it gives the full forward's outputs
    local: dict[int, dict[str, Any]] = {}
    for index in distributed.mine(len(pairs)):  # every pair, or this rank's share under torchrun
        name, cand = pairs[index]
        if progress is not None:
            progress(f"{name} {cand}", index, len(pairs))
        original = floats[name]
        quantized = quantize_one(original, name, schemes[cand], stats.get(name))
        if cand == base:
            damage = base_damage  # the operating point itself
        else:
            block = None if replay is None else replay.block_of(name)
            if block is not None:
                replay.advance(block)
                if block not in checked:
                    checked[block] = metric.replay_matches(model, replay)
            present = model.get_submodule(name)
            set_submodule(model, name, quantized)
            try:
                damage = metric.damage(model, replay if block is not None and checked[block] else None)
            finally:
                set_submodule(model, name, present)
        local[index] = table_option(original, quantized, stats.get(name), damage)
    return distributed.gather(local, len(pairs))


def table_option(original: nn.Module, quantized: nn.Module, stats, damage: float | None) -> dict[str, Any]:
    """One table entry: stored bytes, bits per weight, layer output error, damage."""
    bias = 0 if quantized.bias is None else quantized.bias.numel() * quantized.bias.element_size()
    return {
        "bytes": quantized.qweight.nbytes + bias,
        "bits_per_weight": 8.0 * quantized.qweight.nbytes / original.weight.numel(),
        "layer_error": layer_error(original, quantized, None if stats is None else stats.samples),
        "damage": damage,
    }


def _kl(out: torch.Tensor, ref_logp: torch.Tensor) -> float:
    """Mean over rows of KL(float || quantized), from the quantized logits and the float log-probs;
    never below 0 (a near-lossless layer's fp32 rounding can otherwise give -1e-9)."""
    return max(0.0, float(F.kl_div(F.log_softmax(out, -1), ref_logp, log_target=True, reduction="batchmean")))


def quantize_one(layer: nn.Module, name: str, scheme: LayerScheme, stats) -> nn.Module:
    """The quantized replacement of a single layer (its scheme's algorithm, RTN masks)."""
    weight = layer.weight.detach()
    extra: dict[str, Any] = {}
    if scheme.sparsity is not None:
        keep = None
        if scheme.sparsity.method == "magnitude":
            keep = (
                n_m_mask(weight) if scheme.sparsity.pattern == "2:4" else magnitude_mask(weight, scheme.sparsity.ratio)
            )
        extra = {"sparsity": scheme.sparsity, "keep": keep}
    with torch.no_grad():
        result = as_result(
            get_algorithm(scheme.algorithm).fn(
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
    return build_layer(layer, result, scheme, stats, name)


def layer_error(layer: nn.Module, quantized: nn.Module, samples: torch.Tensor | None) -> float | None:
    """Relative output error ||y - y_q||^2 / ||y||^2 of a Linear on sampled inputs."""
    if samples is None or not isinstance(layer, nn.Linear):
        return None
    with torch.inference_mode():
        ref = layer(samples)
        got = quantized(samples)
    return float((ref - got).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))


def _digest(loaded: Loaded, names: list[str], batches: list[Any], extra: str) -> str:
    """Cache key: the weights (file digest, or the tensors of a model given as a module), the
    layers and candidates, the data and the rest of the question."""
    h = hashlib.sha256()
    for text in (loaded.sha256 or loaded.source, json.dumps(names), extra):
        h.update(text.encode())
    if loaded.sha256 is None:  # an nn.Module: its class name says nothing about its weights
        hash_value(h, dict(loaded.model.state_dict()))
    hash_value(h, batches)
    return h.hexdigest()[:24]


def measure(
    loaded: Loaded,
    calib: list[Any],
    evaluation: list[Any],
    candidates: list[str] | None = None,
    target: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    use_cache: bool = True,
    labels: list[torch.Tensor] | None = None,
    base: str | None = None,
    method: str = "measured",
) -> dict[str, Any]:
    """The sensitivity table: per layer, per candidate: bytes, bits/weight, layer error, damage.

    ``method`` "measured" runs the model once per (layer, candidate); "fisher" estimates every
    damage from one backward pass per batch (calibration and evaluation batches alike; see
    planning/fisher.py), then scales each candidate's estimates to one measurement of that
    candidate on every layer (``calibration`` in the table): minutes instead of hours on an LLM,
    so fine candidate grids pay off.
    With ``labels`` (one tensor of class indices per evaluation batch) a classifier's damage is
    the drop of its expected accuracy (mean probability of the true class) instead of the KL.

    ``base`` (a candidate) measures at an operating point instead of around the float model:
    every other layer is quantized with ``base`` while one layer takes each candidate, so the
    damages include how a layer's error combines with everyone else's. A layer's damage is then
    D(base) / layers + D(that layer changed) - D(base): a plan's sum is D(base) plus the
    marginal changes, and the uniform ``base`` plan sums to D(base) exactly."""
    if method not in METHODS:
        raise SpecError(f"sensitivity method {method!r} is unknown; choose one of {list(METHODS)}")
    names = list(candidates or (FISHER_CANDIDATES if method == "fisher" else DEFAULT_CANDIDATES))
    if target is not None:
        names = [n for n in names if get_target(target).supports(candidate_scheme(n))[0]]
    if not names:
        raise SpecError("no candidate scheme is left (check --candidates and --target)")
    if base is not None and base not in names:
        raise SpecError(f"the base scheme {base!r} must be one of the candidates {names}")
    schemes = {n: candidate_scheme(n) for n in names}
    if method == "fisher":
        from .fisher_table import calibrate_fisher, check_fisher, fisher_options  # (they use this module)

        check_fisher(names, schemes, base, labels)
    model = loaded.model
    layers = list(Recipe(name="all", rules=(Rule(schemes[names[0]], types=("Linear", "Conv2d")),)).resolve(model))
    if not layers:
        raise SpecError("the model has no quantizable Linear/Conv2d layer (the head and embeddings stay float)")
    metric_name = METRICS[loaded.kind] if labels is None else EXPECTED_ACCURACY
    context = f"{target or ''}|{metric_name}" + ("" if base is None else f"|base={base}")
    context += ("" if method == "measured" else f"|{method}|calibrated per candidate") + "|timed"
    key = _digest(loaded, names + layers, calib + evaluation + list(labels or []), context)
    path = cache_dir() / "sensitivity" / f"{key}.json"
    if use_cache and path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    needs = {
        n: {"samples"} | set().union(*(stats_needed(get_algorithm(s.algorithm), s) for s in schemes.values()))
        for n in layers
    }
    plan = {n: schemes[names[0]] for n in layers}
    stats = collect_statistics(model, plan, calib, needs)
    pairs = [(name, cand) for name in layers for cand in names]
    base_damage, calibration = None, None
    if method == "fisher":
        floats = {n: model.get_submodule(n) for n in layers}
        options = fisher_options(loaded, floats, pairs, schemes, stats, calib + evaluation, progress)
        metric = Metric(loaded.kind, model, evaluation)
        calibration = calibrate_fisher(model, layers, names, pairs, options, schemes, stats, metric, progress)
    else:
        metric = Metric(loaded.kind, model, evaluation, labels)
        with operating_point(model, layers, None if base is None else schemes[base], stats) as floats:
            base_damage = None if base is None else metric.damage(model)
            options = _measure_pairs(model, floats, pairs, schemes, stats, metric, base, base_damage, progress)
    table: dict[str, Any] = {}
    for (name, cand), option in zip(pairs, options, strict=True):
        if base is not None:  # the marginal change at the operating point, plus an equal share of D(base)
            option["damage"] = base_damage / len(layers) + option["damage"] - base_damage
        if name not in table:
            original = floats[name]
            table[name] = {
                "type": type(original).__name__,
                "shape": list(original.weight.shape),
                "params": original.weight.numel(),
                "options": {},
            }
        table[name]["options"][cand] = option
    if progress is not None:
        progress("latency of each layer and candidate", len(pairs), len(pairs))
    float_ms, quantized_ms = layer_latencies(
        model,
        layers,
        names,
        lambda n, c: quantize_one(floats[n], n, schemes[c], stats.get(n)),
        latency_batch(loaded.kind, evaluation[0]),
    )
    for name, entry in table.items():
        if name in float_ms:
            entry["float_latency_ms"] = float_ms[name]
        for cand, option in entry["options"].items():
            if (name, cand) in quantized_ms:
                option["latency_ms"] = quantized_ms[(name, cand)]
    result = {
        "model": loaded.source,
        "kind": loaded.kind,
        "metric": metric_name,
        "method": method,
        "candidates": names,
        "target": target,
        "layers": table,
        "calibration_batches": len(calib),
        "evaluation_batches": len(evaluation),
        "base": base,
        "base_damage": base_damage,
        **({} if calibration is None else {"calibration": calibration}),
        "latency_input": "one decoded token" if loaded.kind == "causal-lm" else "the first evaluation batch",
        "seconds": time.perf_counter() - start,
    }
    if use_cache and distributed.is_main():
        write_json(path, result)
    return result
