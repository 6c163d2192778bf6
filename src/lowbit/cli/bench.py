"""`lowbit bench`: latency and throughput of a model or checkpoint per input shape."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..errors import SpecError
from .app import JsonFlag, app, emit


@app.command("bench")
def bench_cmd(
    model: Annotated[str, typer.Argument(help="A lowbit checkpoint, model directory or builtin:NAME.")],
    shapes: Annotated[
        str, typer.Option(help="BATCHxLENGTH list (tokens; image side for image classifiers).")
    ] = "1x32,16x128",
    seconds: Annotated[float, typer.Option(help="Least timed seconds per shape.")] = 1.0,
    decode_tokens: Annotated[int, typer.Option(help="Causal LMs: tokens to generate for decode speed (0: skip).")] = 32,
    compiled: Annotated[
        bool, typer.Option("--compile", help="Run under lowbit.runtime.compile (torch.compile).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Time a model per input shape: median latency, throughput, and decode tokens/s for LMs.

    Example: lowbit bench builtin:smollm2-135m --shapes 1x512 --json
    """
    from ..evaluation.speed import model_speed, parse_shapes
    from ..models import load_model

    if seconds <= 0 or decode_tokens < 0:
        raise SpecError("--seconds must be > 0 and --decode-tokens >= 0")
    parsed = parse_shapes(shapes)
    loaded = load_model(model)
    if compiled:
        from ..runtime import compile as lowbit_compile

        loaded.model = lowbit_compile(loaded.model)
    result = {**model_speed(loaded, parsed, seconds, decode_tokens), "compiled": compiled}
    table = Table(title=f"{model} ({result['kind']}, {result['threads']} threads)")
    for col in ("shape", "median ms", "p10-p90 ms", "throughput"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        table.add_row(
            f"{row['batch']}x{row['length']}",
            f"{row['median_ms']:.2f}",
            f"{row['p10_ms']:.2f}-{row['p90_ms']:.2f}",
            f"{row['throughput']:.1f} {row['unit']}",
        )
    if "decode" in result:
        table.add_row(
            "decode b1",
            f"{result['decode']['decode_ms_per_token']:.2f}",
            "",
            f"{result['decode']['decode_tokens_per_s']:.1f} tokens/s",
        )
    emit(result, as_json, table)
