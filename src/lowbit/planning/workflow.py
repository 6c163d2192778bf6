"""The planning workflow behind `lowbit sensitivity` and `lowbit plan`: default data per model
kind, the plan under a budget with its Pareto front, and verification of a plan by really
quantizing and evaluating it on held-out data."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .. import data
from ..errors import SpecError
from ..evaluation.size import model_size
from ..models import Loaded, load_model
from ..quantize import quantize
from .allocate import Knapsack, Plan, allocate, float_latency_ms, plan_latency_ms, plan_recipe, uniform_plans
from .sensitivity import measure


def planning_data(loaded: Loaded, samples: int = 16, seq_len: int = 256) -> tuple[list[Any], list[Any]]:
    """(calibration, evaluation) batches from the calibration split, disjoint by seed."""
    if loaded.kind == "causal-lm":
        calib = data.lm_calibration(loaded.tokenizer, samples=samples, seq_len=seq_len, seed=0)
        evaluation = data.lm_calibration(loaded.tokenizer, samples=max(2, samples // 4), seq_len=seq_len, seed=1)
        return [{"input_ids": w} for w in calib], [{"input_ids": w} for w in evaluation]
    if loaded.kind == "encoder":
        texts = data.sentences(data.wikitext("valid"), count=16 * samples + 64, seed=0)
        batches = data.encoder_batches(loaded.tokenizer, texts, batch_size=16, max_length=128)
        return batches[:-4], batches[-4:]
    crops = loaded.preprocess(data.photo_crops(count=64, seed=0).images)
    return [crops[:32]], [crops[32:]]


def sensitivity(
    loaded: Loaded,
    candidates: list[str] | None = None,
    target: str | None = None,
    samples: int = 16,
    progress: Callable[[str, int, int], None] | None = None,
    base: str | None = None,
    method: str = "measured",
) -> dict[str, Any]:
    """The sensitivity table on the model's planning data (around the float model, or at the
    operating point where every other layer uses ``base``; measured, or estimated by ``method``
    "fisher")."""
    calib, evaluation = planning_data(loaded, samples)
    return measure(loaded, calib, evaluation, candidates, target, progress, base=base, method=method)


def _fixed_bytes(loaded: Loaded, table: dict[str, Any]) -> int:
    """Bytes of everything the plan does not choose (embeddings, norms, head, float layers' rest)."""
    total = model_size(loaded.model)["bytes"]
    layers = 0
    for name in table["layers"]:
        layer = loaded.model.get_submodule(name)
        layers += sum(p.numel() * p.element_size() for p in (layer.weight, layer.bias) if p is not None)
    return total - layers


def make_plan(
    loaded: Loaded,
    table: dict[str, Any],
    *,
    budget_mb: float | None = None,
    avg_bits: float | None = None,
    max_drop: float | None = None,
) -> dict[str, Any]:
    """The plan for one budget, its recipe, and the Pareto front next to the uniform presets."""
    fixed = _fixed_bytes(loaded, table)
    layer_budget = None if budget_mb is None else int(budget_mb * 1e6) - fixed
    if layer_budget is not None and layer_budget <= 0:
        raise SpecError(f"--budget-mb {budget_mb}: the parts that stay float already take {fixed / 1e6:.1f} MB")
    plan = allocate(table, layer_budget_bytes=layer_budget, avg_bits=avg_bits, max_damage=max_drop)
    params = sum(table["layers"][n]["params"] for n in table["layers"])

    def point(p: Plan, label: str) -> dict[str, Any]:
        out = {
            "label": label,
            "size_mb": (fixed + p.layer_bytes) / 1e6,
            "bits_per_weight": 8.0 * p.layer_bytes / params,
            "predicted_damage": p.damage,
        }
        latency = plan_latency_ms(table, p)
        return out if latency is None else {**out, "latency_ms": latency}

    front = [point(p, "plan") for p in Knapsack(table).front()]
    presets = [point(p, next(iter(p.choices.values()))) for p in uniform_plans(table)]
    timed = float_latency_ms(table)
    latency = {}
    if timed is not None:  # the front of estimated latency vs damage, next to the layers in float
        latency = {
            "latency_front": [point(p, "plan") for p in Knapsack(table, cost="latency").front()],
            "float_latency_ms": timed,
            "latency_input": table.get("latency_input"),
        }
    counts: dict[str, int] = {}
    for cand in plan.choices.values():
        counts[cand] = counts.get(cand, 0) + 1
    return {
        "plan": {**point(plan, "plan"), **plan.to_dict(), "counts": counts},
        "recipe": plan_recipe(plan, description=f"lowbit plan: {counts}").to_dict(),
        "front": front,
        "presets": presets,
        **latency,
        "metric": table["metric"],
        "fixed_mb": fixed / 1e6,
    }


def verify(
    source: str, recipe: dict[str, Any], kind: str, predicted_damage: float, max_tokens: int = 8192
) -> dict[str, Any]:
    """Quantize the plan for real and measure on held-out data (WikiText-2 test / test
    sentences / other photo crops), next to the prediction."""
    from ..evaluation.embedding import nearest_neighbours, sentence_embeddings
    from ..evaluation.perplexity import perplexity
    from ..recipe import Recipe

    reference = load_model(source)
    planned = load_model(source)
    quantize(planned, Recipe.from_dict(recipe))
    size = model_size(planned.model)
    out: dict[str, Any] = {
        "size_mb": size["bytes"] / 1e6,
        "bits_per_weight": size["quantized_bits_per_weight"],
        "predicted_damage": predicted_damage,
    }
    if kind == "causal-lm":
        base = perplexity(reference.model, reference.tokenizer, max_tokens=max_tokens)["perplexity"]
        got = perplexity(planned.model, planned.tokenizer, max_tokens=max_tokens)["perplexity"]
        out.update(
            float_perplexity=base,
            perplexity=got,
            predicted_perplexity=base * math.exp(predicted_damage),
            achieved_damage=math.log(got / base),
        )
    elif kind == "encoder":
        texts = data.sentences(count=300)
        ref = sentence_embeddings(reference.model, reference.tokenizer, texts)
        emb = sentence_embeddings(planned.model, planned.tokenizer, texts)
        cosine = float((emb * ref).sum(-1).mean())
        out.update(
            mean_cosine=cosine,
            predicted_cosine=1 - predicted_damage,
            achieved_damage=1 - cosine,
            top1_agreement=float((nearest_neighbours(emb) == nearest_neighbours(ref)).float().mean()),
        )
    else:
        crops = reference.preprocess(data.photo_crops(count=64, seed=5).images)
        with torch.inference_mode():
            a, b = reference.model(crops), planned.model(crops)
        kl = float(
            torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
        )
        out.update(achieved_damage=kl, top1_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()))
    return out
