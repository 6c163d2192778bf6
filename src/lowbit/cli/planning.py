"""Planning commands: sensitivity and plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import distributed
from .app import JsonFlag, QuietFlag, app, emit
from .progress import bars

Candidates = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated preset names to choose from (default: fp16,w8-weight,w4-g128,w3-g128,"
        "w2-g64,nf4-g64,w4-g128-2of4)."
    ),
]
TargetOption = Annotated[str | None, typer.Option(help="x86 | arm | cuda | edge: only schemes it runs fast.")]


BaseOption = Annotated[
    str | None,
    typer.Option(
        help="Measure at an operating point: every other layer quantized with this candidate while one layer "
        "takes each candidate (captures how errors combine; best for budgets near that scheme's size)."
    ),
]


MethodOption = Annotated[
    str,
    typer.Option(
        help="measured: run the model once per layer and candidate; fisher: estimate every damage from one "
        "backward pass per batch (second order around float; weight-only candidates; default grid w2-w6 "
        "at groups 32/64/128 plus fp16 and w8-weight). Fisher is far faster on LLMs."
    ),
]


def _candidates(text: str | None) -> list[str] | None:
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


@app.command()
def sensitivity(
    model: Annotated[str, typer.Argument(help="builtin:NAME or a model directory.")],
    candidates: Candidates = None,
    target: TargetOption = None,
    samples: Annotated[int, typer.Option(help="Calibration samples (windows / sentence batches).")] = 16,
    base: BaseOption = None,
    method: MethodOption = "measured",
    out: Annotated[Path | None, typer.Option(help="Also write the table as JSON here.")] = None,
    quiet: QuietFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Measure, per layer and candidate scheme, the layer error and the end-to-end damage.

    Example: lowbit sensitivity builtin:minilm --candidates w8-weight,w4-g128 --json
    """
    from ..io import write_json
    from ..models import load_model
    from ..planning.workflow import sensitivity as measure

    loaded = load_model(model)
    with bars(quiet) as bar:
        table = measure(loaded, _candidates(candidates), target, samples, bar("sensitivity"), base, method)
    if out is not None and distributed.is_main():
        write_json(out, table)
    how = "estimated (Fisher)" if table.get("method") == "fisher" else "measured"
    view = Table(title=f"{model}: damage ({table['metric']}, {how}) when only this layer is quantized")
    view.add_column("layer")
    for cand in table["candidates"]:
        view.add_column(cand, justify="right")
    for name, entry in table["layers"].items():
        view.add_row(name, *[f"{entry['options'][c]['damage']:.2e}" for c in table["candidates"]])
    emit(table, as_json, view)


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="builtin:NAME or a model directory.")],
    budget_mb: Annotated[float | None, typer.Option(help="Largest model size in MB.")] = None,
    avg_bits: Annotated[float | None, typer.Option(help="Average bits per weight over the chosen layers.")] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            help="Largest predicted metric damage (KL to float per token for LMs, 1 - cosine for encoders, "
            "KL for classifiers)."
        ),
    ] = None,
    candidates: Candidates = None,
    target: TargetOption = None,
    samples: Annotated[int, typer.Option(help="Calibration samples for the sensitivity measurement.")] = 16,
    base: BaseOption = None,
    method: MethodOption = "measured",
    out: Annotated[Path, typer.Option(help="Where to write the plan's recipe (JSON).")] = Path("plan.json"),
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Quantize the plan and evaluate it on held-out data.")
    ] = True,
    quiet: QuietFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Choose a scheme per layer under a budget (exact knapsack over measured options), write a
    recipe, show the Pareto front, and verify the plan on held-out data.

    Example: lowbit plan builtin:minilm --avg-bits 5 --out minilm-plan.json
    """
    from ..errors import SpecError
    from ..io import write_json
    from ..models import load_model
    from ..planning.workflow import make_plan, sensitivity
    from ..planning.workflow import verify as check

    if sum(v is not None for v in (budget_mb, avg_bits, max_drop)) != 1:
        raise SpecError("give exactly one budget: --budget-mb, --avg-bits or --max-drop")
    loaded = load_model(model)
    with bars(quiet) as bar:
        table = sensitivity(loaded, _candidates(candidates), target, samples, bar("sensitivity"), base, method)
    result = make_plan(loaded, table, budget_mb=budget_mb, avg_bits=avg_bits, max_drop=max_drop)
    result["target"] = target
    if target is not None:  # empty by construction: the candidates were filtered by the target
        from ..planning.targets import get_target
        from ..recipe import Recipe

        schemes = Recipe.from_dict(result["recipe"]).resolve(loaded.model)
        result["fallbacks"] = get_target(target).check(schemes)
    if distributed.is_main():
        write_json(out, result["recipe"])
    distributed.barrier()
    result["recipe_file"] = str(out)
    if verify:
        result["verification"] = check(model, result["recipe"], loaded.kind, result["plan"]["predicted_damage"])
    plan_row = result["plan"]
    view = Table(title=f"{model}: plan written to {out} ({result['metric']})")
    for col in ("", "size MB", "bits/weight", "damage", "est. layer ms"):
        view.add_column(col, justify="right")

    def ms(row: dict) -> str:
        return f"{row['latency_ms']:.3f}" if "latency_ms" in row else "-"

    view.add_row(
        "predicted",
        f"{plan_row['size_mb']:.2f}",
        f"{plan_row['bits_per_weight']:.2f}",
        f"{plan_row['predicted_damage']:.4g}",
        ms(plan_row),
    )
    if verify:
        v = result["verification"]
        view.add_row(
            "achieved", f"{v['size_mb']:.2f}", f"{v['bits_per_weight']:.2f}", f"{v['achieved_damage']:.4g}", "-"
        )
    for preset in result["presets"]:
        view.add_row(
            f"uniform {preset['label']}",
            f"{preset['size_mb']:.2f}",
            f"{preset['bits_per_weight']:.2f}",
            f"{preset['predicted_damage']:.4g}",
            ms(preset),
        )
    if result.get("float_latency_ms") is not None:
        view.add_row("float", "", "", "0", f"{result['float_latency_ms']:.3f}")
    view.caption = "layers per scheme: " + json.dumps(plan_row["counts"])
    emit(result, as_json, view)
