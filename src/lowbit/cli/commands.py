"""Core commands: formats, demo, recipes, quantize, eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import distributed
from ..errors import SpecError
from ..io import check_replaceable
from .app import JsonFlag, QuietFlag, app, emit, stderr
from .progress import bars


def _format_table(result: dict) -> Table:
    table = Table(title=f"{result['model']}: {result['weights']} Linear weights, {result['parameters']:,} parameters")
    for col in ("format", "granularity", "range"):
        table.add_column(col)
    for col in ("bits/weight", "SQNR dB", "worst layer dB", "rel. error"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        table.add_row(
            row["format"],
            row["granularity"],
            row["range"],
            f"{row['bits_per_weight']:.3f}",
            f"{row['sqnr_db']:.2f}",
            f"{row['worst_layer_sqnr_db']:.2f}",
            f"{row['relative_error']:.4f}",
        )
    return table


@app.command()
def formats(
    model: Annotated[str, typer.Argument(help="builtin:NAME, a model directory or a .safetensors file.")],
    as_json: JsonFlag = False,
) -> None:
    """Quantize a model's Linear weights in every number format; print bits/weight, SQNR, error.

    Example: lowbit formats builtin:minilm --json
    """
    from ..demo import format_study_of

    result = format_study_of(model)
    emit(result, as_json, _format_table(result))


@app.command()
def demo(
    sentences: Annotated[int, typer.Option(help="MiniLM: sentences for cosine / top-1.")] = 500,
    max_tokens: Annotated[int, typer.Option(help="SmolLM2: WikiText-2 test tokens for perplexity.")] = 4096,
    report: Annotated[
        Path | None, typer.Option(help="Also write the HTML report here (default: lowbit-demo-report.html).")
    ] = Path("lowbit-demo-report.html"),
    as_json: JsonFlag = False,
) -> None:
    """Quantize the bundled MiniLM and SmolLM2-135M with several recipes; show size, quality, speed.

    Example: lowbit demo --json
    """
    from ..demo import run_demo

    result = run_demo(sentences, max_tokens, log=lambda msg: stderr.print(f"[dim]{msg}[/dim]"))
    table = Table(title="lowbit demo (quality: MiniLM cosine / top-1 agreement, SmolLM2 perplexity)")
    for col in ("model", "recipe"):
        table.add_column(col)
    for col in ("size MB", "bits/weight", "quality", "float", "latency ms"):
        table.add_column(col, justify="right")
    floats = {row["model"]: row for row in result["rows"] if row["recipe"] == "float32"}
    for row in result["rows"]:
        base = floats[row["model"]]
        if "perplexity" in row:
            quality, ref = f"ppl {row['perplexity']:.2f}", f"{base['perplexity']:.2f}"
        else:
            quality, ref = f"{row['cosine']:.4f} / {100 * row['top1']:.1f}%", "1 / 100%"
        table.add_row(
            row["model"].removeprefix("builtin:"),
            row["recipe"],
            f"{row['size_mb']:.1f}",
            f"{row['bits_per_weight']:.2f}",
            quality,
            ref,
            f"{row['latency_ms']:.1f}",
        )
    table.caption = (
        f"MiniLM: {result['sentences']} WikiText-2 sentences, latency 16x128; SmolLM2: "
        f"{result['perplexity_tokens']} WikiText-2 test tokens, latency 1x128; kernels: "
        f"{result['kernels']}; {result['seconds']:.0f} s"
    )
    if report is not None and distributed.is_main():
        from ..io import atomic_path
        from ..report import build

        with atomic_path(report) as tmp:
            tmp.write_text(build([("demo", "lowbit demo", result)], title="lowbit demo report"), encoding="utf-8")
        result["report"] = str(report)
        stderr.print(f"[dim]report: {report}[/dim]")
    emit(result, as_json, table)


@app.command()
def recipes(as_json: JsonFlag = False) -> None:
    """List the preset recipes, one line each.

    Example: lowbit recipes
    """
    from ..presets import describe_presets

    presets = describe_presets()
    table = Table(title="lowbit presets")
    table.add_column("recipe")
    table.add_column("what it does")
    for name, desc in presets.items():
        table.add_row(name, desc)
    grids = "w<bits>-g<group> (e.g. w5-g64): any weight-only grid, 2-8 bits, asymmetric, round-to-nearest"
    table.caption = f"Also: {grids}"
    emit({"recipes": presets, "grids": grids}, as_json, table)


def _check_out_dir(model: str, out: Path) -> None:
    """Refuse an output directory that is, or lies inside, the input model directory, or that
    holds something other than an earlier lowbit checkpoint."""
    check_replaceable(out, "lowbit.json", "lowbit checkpoint")
    src = Path(model)
    if not model.startswith("builtin:") and src.is_file() and out.resolve() == src.resolve():
        raise SpecError(f"--out {out} is the input file itself; choose another output directory")
    if not model.startswith("builtin:") and src.is_dir():
        src_dir = src
        try:
            out.resolve().relative_to(src_dir.resolve())
        except ValueError:
            return
        raise SpecError(f"--out {out} lies inside the input {src_dir}; choose a directory outside the model")


@app.command("quantize")
def quantize_cmd(
    model: Annotated[str, typer.Argument(help="builtin:NAME, a model directory or a .safetensors file.")],
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Preset name (see `lowbit recipes`) or a JSON/YAML recipe file.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory (default: ./lowbit-out/<model>-<recipe>).")
    ] = None,
    calib: Annotated[
        str | None,
        typer.Option(
            "--calib", help="Calibration text file or image folder (default: WikiText-2 valid / sample photos)."
        ),
    ] = None,
    samples: Annotated[int, typer.Option(help="Calibration samples.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Calibration sequence length (tokens).")] = 512,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="HF causal-LM directory bigger than memory: read, quantize and write one layer at a time "
            "(calibration-free recipes only; sharded output).",
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue a block-by-block run (GPTQ, AWQ, static activations) that was killed: blocks saved in "
            "the journal next to --out (.<out>.journal) are reused; the result equals an uninterrupted run.",
        ),
    ] = False,
    target: Annotated[
        str | None,
        typer.Option(
            help="x86 | arm | cuda | edge: report the layers whose scheme falls back on that target's kernels."
        ),
    ] = None,
    quiet: QuietFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Quantize MODEL with a recipe and save a lowbit checkpoint directory.

    Example: lowbit quantize builtin:minilm --recipe int8-dynamic --out minilm-int8
    """
    import time

    from .. import load_model, quantize, save
    from ..calibration import calibration_data
    from ..evaluation.size import directory_bytes, model_size
    from ..recipe import resolve_recipe

    resolved = resolve_recipe(recipe)
    if target is not None:
        from ..planning.targets import get_target

        get_target(target)  # an unknown name fails before any work
    name = model.removeprefix("builtin:").rstrip("/").split("/")[-1].removesuffix(".safetensors")
    out = out or Path("lowbit-out") / f"{name}-{resolved.name}"
    _check_out_dir(model, out)
    start = time.perf_counter()
    if stream and resume:
        raise SpecError("--resume continues block-by-block runs; --stream runs are calibration-free, drop --resume")
    if stream:
        _quantize_streaming(model, resolved, out, quiet, as_json, start, target)
        return
    loaded = load_model(model)
    batches = calibration_data(loaded, calib, samples, seq_len) if resolved.needs_calibration else None
    journal = out.parent / f".{out.name}.journal"
    with bars(quiet) as bar:
        quantize(loaded, resolved, batches, progress=bar("quantize"), journal=journal, resume=resume)
    if distributed.is_main():  # under torchrun every rank quantizes the same way; one writes
        save(loaded, out)
    distributed.barrier()
    size = model_size(loaded.model)
    result = {
        "model": model,
        "recipe": resolved.name,
        "out": str(out),
        "layers": len(loaded.model.lowbit.schemes),
        "resumed_blocks": loaded.model.lowbit.resumed_blocks,
        "size_bytes": directory_bytes(out),
        "bits_per_weight": size["bits_per_weight"],  # all weight layers, as `lowbit eval` reports it
        "quantized_bits_per_weight": size["quantized_bits_per_weight"],
        "seconds": time.perf_counter() - start,
    }
    if target is not None:
        result.update(_fallbacks(target, loaded.model.lowbit.schemes, quiet))
    table = Table(title=f"{model} -> {out}")
    for key in result:
        if key != "fallbacks":
            table.add_column(key)
    table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in result.items() if k != "fallbacks"])
    emit(result, as_json, table)


def _fallbacks(target: str, schemes: dict, quiet: bool) -> dict:
    """{'target', 'fallbacks': {layer: why}}; the count and first reason on stderr unless quiet."""
    from ..planning.targets import get_target

    fallbacks = get_target(target).check(schemes)
    if fallbacks and not quiet:
        first, why = next(iter(fallbacks.items()))
        typer.echo(
            f"warning: {len(fallbacks)} of {len(schemes)} layers fall back on {target} (not run by its kernels), "
            f"e.g. {first}: {why}",
            err=True,
        )
    return {"target": target, "fallbacks": fallbacks}


def _quantize_streaming(
    model: str, recipe, out: Path, quiet: bool, as_json: bool, start: float, target: str | None = None
) -> None:
    """quantize --stream: layer by layer from a HF directory (see lowbit.streaming)."""
    import json
    import time

    from ..evaluation.size import directory_bytes
    from ..streaming import quantize_streaming

    if model.startswith("builtin:") or not Path(model).is_dir():
        raise SpecError(f"--stream reads a Hugging Face model directory (config.json + safetensors), not {model!r}")
    with bars(quiet) as bar:
        quantize_streaming(Path(model), recipe, out, progress=bar("quantize"))
    manifest = json.loads((out / "lowbit.json").read_text())
    result = {
        "model": model,
        "recipe": recipe.name,
        "out": str(out),
        "layers": len(manifest["layers"]),
        "size_bytes": directory_bytes(out),
        "stream": True,
        "seconds": time.perf_counter() - start,
    }
    if target is not None:
        from ..planning.targets import checkpoint_schemes

        result.update(_fallbacks(target, checkpoint_schemes(manifest), quiet))
    table = Table(title=f"{model} -> {out} (streamed)")
    for key in result:
        if key != "fallbacks":
            table.add_column(key)
    table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in result.items() if k != "fallbacks"])
    emit(result, as_json, table)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="A lowbit checkpoint, model directory or builtin:NAME.")],
    task: Annotated[str, typer.Option(help="perplexity | embedding | classification.")],
    data: Annotated[
        str | None,
        typer.Option(
            help="Text file / image set (default per task: WikiText-2 test, WikiText-2 sentences, sample photos)."
        ),
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="Float model to compare with (default: the checkpoint's source model).")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Perplexity: evaluate only the first N tokens.")] = None,
    seq_len: Annotated[int, typer.Option(help="Perplexity: window length.")] = 512,
    quiet: QuietFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Evaluate a model: perplexity, embedding fidelity, or classification accuracy/agreement.

    Example: lowbit eval minilm-int8 --task embedding --json
    """
    from .. import evaluate, load_model

    loaded = load_model(model)
    ref = reference or (loaded.meta.get("source_model") if loaded.meta.get("quantized") else None)
    options = {"max_tokens": max_tokens, "seq_len": seq_len} if task == "perplexity" else {}
    with bars(quiet) as bar:
        if task == "perplexity":
            options["progress"] = bar("perplexity")
        result = evaluate(loaded, task, data, reference=load_model(ref) if ref else None, **options)
    result["model"] = model
    table = Table(title=f"{model}: {task}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in {
        **result["metrics"],
        "size_bytes": result["size_bytes"],
        "bits_per_weight": result["bits_per_weight"],
    }.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    emit(result, as_json, table)
