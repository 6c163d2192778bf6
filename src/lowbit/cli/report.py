"""`lowbit report`: an HTML report (tables, Pareto and sensitivity charts, weight histograms with
the grid, SQNR by depth, environment) from saved --json results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import JsonFlag, app, emit, stderr


@app.command("report")
def report_cmd(
    results: Annotated[list[Path], typer.Argument(help="JSON saved from eval/bench/sensitivity/plan/demo --json.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("lowbit-report.html"),
    model: Annotated[
        Path | None,
        typer.Option("--model", help="A lowbit checkpoint: adds weight histograms with the grid and SQNR by depth."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Write one self-contained HTML report (no network) from saved results.

    Example: lowbit report eval.json sensitivity.json plan.json --model minilm-int8 -o report.html
    """
    from .. import distributed
    from ..report import write_report

    if not distributed.is_main():
        return
    result = write_report(results, out, model)
    if not as_json:
        stderr.print(f"wrote {out} ({result['bytes'] / 1e3:.0f} kB, {result['plots']} plots)")
    emit(result, as_json, None)
