"""The `lowbit` command: parses arguments, calls the API, prints. Exit 0 ok, 2 bad input, 1 internal."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import LowbitError

app = typer.Typer(
    name="lowbit",
    help="Quantize PyTorch models and measure what it costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _emit(data: dict, as_json: bool, table: Table | None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=float) + "\n")
    elif table is not None:
        Console().print(table)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lowbit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Quantize PyTorch models and measure what it costs."""


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
    from .demo import format_study_of

    result = format_study_of(model)
    _emit(result, as_json, _format_table(result))


@app.command()
def demo(as_json: JsonFlag = False) -> None:
    """Quantize the bundled all-MiniLM-L6-v2 weights in every format and show the cost.

    Example: lowbit demo --json
    """
    from .demo import format_study_of

    result = format_study_of("builtin:minilm")
    _emit(result, as_json, _format_table(result))


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps LowbitError to exit code 2 with a one-line message on stderr.

    Usage errors (unknown option, missing argument) exit with 2 through typer itself."""
    try:
        app(args=argv, prog_name="lowbit")
    except LowbitError as exc:
        sys.stderr.write(f"lowbit: error: {exc}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
