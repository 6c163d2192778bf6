"""Mixed precision from measurement: plans vs uniform presets at the same size, verified on
held-out data. Prints one JSON object.

1. SmolLM2-135M: per-layer sensitivity (KL to the float model per token on WikiText-2 valid windows), then plans
   at the size of uniform w4-g128 and of uniform w3-g128, each quantized and evaluated on
   WikiText-2 test perplexity next to the uniform preset (same layers, same evaluation). Each
   budget is planned twice: from the sensitivity around the float model (one layer quantized at
   a time) and from one measured at the preset itself (every other layer quantized with it);
   --no-float-table plans from the latter only. --method fisher (with --no-operating-point)
   estimates the table instead (Fisher diagonal, each candidate scaled to one measurement on
   every layer) over the fine default grid (w2..w6 at groups 32/64/128, w8-weight, fp16).
2. MiniLM: the smallest plan whose predicted 1 - cosine stays within --max-drop, verified on
   WikiText-2 test sentences, next to uniform int8 (w8-weight). The same for a small CNN
   trained on Fashion-MNIST, with the budget on test accuracy.
3. SmolLM2 2:4 sparsity + w4 (w4-g128-2of4) next to dense w4-g128: perplexity and size.

    nice .venv/bin/python bench/planning.py > bench/results/planning.json
    cd bench && ../.venv/bin/python planning.py --method fisher --no-operating-point --skip minilm fashion
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

import lowbit
from lowbit.planning.allocate import plan_recipe, uniform_plans
from lowbit.planning.workflow import make_plan, sensitivity, verify
from sparsity import sparsity_rows  # bench/sparsity.py (scripts run from bench/ put it on sys.path)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _uniform(table: dict[str, Any], candidate: str) -> dict[str, Any]:
    """The uniform plan of ``candidate`` over the table's layers, as a recipe dict."""
    plan = next(p for p in uniform_plans(table) if next(iter(p.choices.values())) == candidate)
    return plan_recipe(plan, name=f"uniform-{candidate}").to_dict(), plan


def _row(label: str, verified: dict[str, Any], counts: dict[str, int] | None = None) -> dict[str, Any]:
    keep = ("size_mb", "bits_per_weight", "perplexity", "mean_cosine", "top1_agreement", "predicted_damage")
    row = {"label": label, **{k: verified[k] for k in keep if k in verified}}
    if "achieved_damage" in verified:
        row["achieved_damage"] = verified["achieved_damage"]
    if counts is not None:
        row["counts"] = counts
    return row


def smollm2(args) -> dict[str, Any]:
    source = "builtin:smollm2-135m"
    loaded = lowbit.load_model(source)
    if not (args.float_table or args.operating_point):
        raise SystemExit("planning.py: --no-float-table needs --operating-point")
    if args.method == "fisher" and args.operating_point:
        raise SystemExit("planning.py: --method fisher estimates around the float model; add --no-operating-point")
    candidates = args.lm_candidates or (
        None if args.method == "fisher" else ["w8-weight", "w4-g128", "w3-g128", "w2-g64"]
    )
    seconds: dict[str, float] = {}
    table = None
    if args.float_table:
        start = time.perf_counter()
        table = sensitivity(loaded, candidates, None, args.samples, method=args.method)
        seconds["around float"] = time.perf_counter() - start
        log(f"smollm2 sensitivity: {len(table['layers'])} layers x {len(table['candidates'])} candidates, "
            f"{seconds['around float']:.0f} s")  # fmt: skip
    rows, comparisons, first_table = [], [], table
    for preset in args.presets:
        tables = {} if table is None else {"around float": table}
        if args.operating_point:
            start = time.perf_counter()
            tables[f"at uniform {preset}"] = sensitivity(loaded, candidates, None, args.samples, base=preset)
            seconds[f"at uniform {preset}"] = time.perf_counter() - start
            log(f"smollm2 sensitivity at uniform {preset}: {seconds[f'at uniform {preset}']:.0f} s")
        first_table = first_table or next(iter(tables.values()))
        recipe, uniform = _uniform(next(iter(tables.values())), preset)
        base = verify(source, recipe, "causal-lm", uniform.damage, args.max_tokens)
        rows.append(_row(f"uniform {preset}", base))
        for measured, source_table in tables.items():
            planned = make_plan(loaded, source_table, budget_mb=base["size_mb"])
            predicted = planned["plan"]["predicted_damage"]
            got = verify(source, planned["recipe"], "causal-lm", predicted, args.max_tokens)
            rows.append(_row(f"plan at {preset} size (measured {measured})", got, planned["plan"]["counts"]))
            comparisons.append(
                {
                    "budget": f"size of uniform {preset}",
                    "sensitivity": measured,
                    "uniform_perplexity": base["perplexity"],
                    "plan_perplexity": got["perplexity"],
                    "uniform_size_mb": base["size_mb"],
                    "plan_size_mb": got["size_mb"],
                    "plan_beats_uniform": got["perplexity"] < base["perplexity"] and got["size_mb"] <= base["size_mb"],
                }
            )
            log(f"  {preset}: uniform {base['perplexity']:.3f} ({base['size_mb']:.1f} MB), plan measured "
                f"{measured} {got['perplexity']:.3f} ({got['size_mb']:.1f} MB)")  # fmt: skip
    for bits in args.avg_bits:  # a plan at exactly this many bits per weight (scales included)
        planned = make_plan(loaded, first_table, avg_bits=bits)
        got = verify(source, planned["recipe"], "causal-lm", planned["plan"]["predicted_damage"], args.max_tokens)
        rows.append(_row(f"plan at --avg-bits {bits}", got, planned["plan"]["counts"]))
        log(f"  --avg-bits {bits}: plan {got['perplexity']:.3f} ({got['size_mb']:.1f} MB)")
    float_ppl = base["float_perplexity"]
    sparse_rows = sparsity_rows(source, ("w4-g128", "w4-g128-2of4"), args.max_tokens, None, log)
    return {
        "model": source,
        "metric": first_table["metric"],
        "method": first_table.get("method", "measured"),
        "float_perplexity": float_ppl,
        "sensitivity_seconds": seconds,
        "candidates": first_table["candidates"],
        "rows": rows,
        "comparisons": comparisons,
        "sparsity": sparse_rows,
    }


def minilm(args) -> dict[str, Any]:
    source = "builtin:minilm"
    loaded = lowbit.load_model(source)
    candidates = args.encoder_candidates or (
        None if args.method == "fisher" else ["fp16", "w8-weight", "w4-g128", "nf4-g64"]
    )
    table = sensitivity(loaded, candidates, None, args.samples, method=args.method)
    planned = make_plan(loaded, table, max_drop=args.max_drop)
    got = verify(source, planned["recipe"], "encoder", planned["plan"]["predicted_damage"])
    recipe, uniform = _uniform(table, "w8-weight")
    int8 = verify(source, recipe, "encoder", uniform.damage)
    log(f"minilm: plan 1-cos {got['achieved_damage']:.4f} ({got['size_mb']:.1f} MB), "
        f"int8 {int8['achieved_damage']:.4f} ({int8['size_mb']:.1f} MB)")  # fmt: skip
    return {
        "model": source,
        "metric": table["metric"],
        "method": table["method"],
        "candidates": table["candidates"],
        "max_drop": args.max_drop,
        "rows": [_row(f"plan --max-drop {args.max_drop}", got, planned["plan"]["counts"]), _row("uniform int8", int8)],
        "within_budget": got["achieved_damage"] <= args.max_drop,
        "smaller_than_int8": got["size_mb"] < int8["size_mb"],
    }


def fashion(args) -> dict[str, Any]:
    """A small CNN trained on Fashion-MNIST (the first 55,000 training images): sensitivity on the
    last 5,000 (damage = drop of the expected accuracy), the smallest plan within --max-drop,
    verified by test-set accuracy (10,000 images) next to uniform int8."""
    import copy
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from lowbit import data
    from lowbit.evaluation.size import model_size
    from lowbit.planning.sensitivity import measure
    from lowbit.qat import fit
    from lowbit.recipe import Recipe
    from qat import accuracy, small_cnn

    def batches(images: torch.Tensor, labels: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = (images.float() / 255.0 - 0.2860) / 0.3530
        return [(x[i : i + size], labels[i : i + size]) for i in range(0, len(x), size)]

    train_set, test_set = data.fashion_mnist("train"), data.fashion_mnist("test")
    train = batches(train_set.images[:55_000], train_set.labels[:55_000], 128)
    valid = batches(train_set.images[55_000:], train_set.labels[55_000:], 500)
    test = batches(test_set.images, test_set.labels, 500)

    class Split:  # the interface bench/qat.accuracy expects
        def __init__(self, pairs):
            self.batches, self.y = [x for x, _ in pairs], torch.cat([y for _, y in pairs])
            self._labels = {id(x): y for x, y in pairs}

        def target(self, x):
            return self._labels[id(x)]

    torch.manual_seed(0)
    model = small_cnn()
    start = time.perf_counter()
    fit(model, [x for x, _ in train], targets=Split(train).target, epochs=args.cnn_epochs, lr=2e-3, seed=0)
    model.eval()
    float_acc = accuracy(model, Split(test))
    log(f"fashion-mnist CNN float {float_acc:.4f} ({time.perf_counter() - start:.0f} s)")
    loaded = lowbit.load_model(model, kind="image-classifier")
    start = time.perf_counter()
    table = measure(
        loaded, [x for x, _ in train[:8]], [x for x, _ in valid], args.cnn_candidates, labels=[y for _, y in valid]
    )
    seconds = time.perf_counter() - start
    planned = make_plan(loaded, table, max_drop=args.max_drop)
    rows = []
    for label, recipe in (("plan", planned["recipe"]), ("uniform int8", _uniform(table, "w8-weight")[0])):
        q = copy.deepcopy(model)
        lowbit.quantize(q, Recipe.from_dict(recipe))
        size = model_size(q)
        acc = accuracy(q, Split(test))
        rows.append(
            {"label": label, "test_accuracy": acc, "accuracy_drop": float_acc - acc, "size_mb": size["bytes"] / 1e6,
             "bits_per_weight": size["quantized_bits_per_weight"]}
        )  # fmt: skip
        log(f"  {label}: accuracy {acc:.4f} (drop {float_acc - acc:+.4f}), {size['bytes'] / 1e6:.3f} MB")
    rows[0].update(predicted_damage=planned["plan"]["predicted_damage"], counts=planned["plan"]["counts"])
    return {
        "model": "small CNN (4 conv + 2 linear), Fashion-MNIST",
        "train_epochs": args.cnn_epochs,
        "float_test_accuracy": float_acc,
        "metric": table["metric"],
        "sensitivity_seconds": seconds,
        "candidates": table["candidates"],
        "max_drop": args.max_drop,
        "rows": rows,
        "within_budget": rows[0]["accuracy_drop"] <= args.max_drop,
        "smaller_than_int8": rows[0]["size_mb"] < rows[1]["size_mb"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="sensitivity calibration samples")
    parser.add_argument("--max-tokens", type=int, default=8192, help="WikiText-2 test tokens for perplexity")
    parser.add_argument("--max-drop", type=float, default=0.01, help="budget: 1 - cosine (MiniLM), accuracy (CNN)")
    parser.add_argument(
        "--lm-candidates", nargs="+", default=None,
        help="SmolLM2 candidates (default: w8-weight w4-g128 w3-g128 w2-g64, or the Fisher grid with --method fisher)",
    )  # fmt: skip
    parser.add_argument(
        "--method", choices=["measured", "fisher"], default="measured",
        help="sensitivity of SmolLM2 and MiniLM: measured per layer and candidate, or estimated (Fisher diagonal)",
    )  # fmt: skip
    parser.add_argument(
        "--encoder-candidates", nargs="+", default=None,
        help="MiniLM candidates (default: fp16 w8-weight w4-g128 nf4-g64, or the Fisher grid with --method fisher)",
    )  # fmt: skip
    parser.add_argument(
        "--cnn-candidates", nargs="+", default=["fp16", "w8-weight", "w4-g128", "w3-g128", "w2-g64", "nf4-g64"]
    )
    parser.add_argument("--cnn-epochs", type=int, default=3)
    parser.add_argument("--avg-bits", type=float, nargs="*", default=[3.0], help="SmolLM2: also plan at these bits")
    parser.add_argument("--presets", nargs="+", default=["w4-g128", "w3-g128"], help="SmolLM2 uniform presets to match")
    parser.add_argument(
        "--operating-point",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SmolLM2: also plan from a sensitivity measured at each uniform preset (every other layer quantized)",
    )
    parser.add_argument(
        "--float-table",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SmolLM2: plan from the sensitivity around the float model (one layer quantized at a time)",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["smollm2", "minilm", "fashion"])
    args = parser.parse_args()
    torch.manual_seed(0)
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if "minilm" not in args.skip:
        out["minilm"] = minilm(args)
    if "fashion" not in args.skip:
        out["fashion_mnist"] = fashion(args)
    if "smollm2" not in args.skip:
        out["smollm2"] = smollm2(args)
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
