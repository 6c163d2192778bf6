"""Shared pieces of the `lowbit` command: the typer app, output helpers, exit codes."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .. import __version__

app = typer.Typer(
    name="lowbit",
    help="Quantize PyTorch models and measure what it costs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
QuietFlag = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars (also off when stderr is not a terminal).")
]


def emit(data: dict, as_json: bool, table: Table | None) -> None:
    """One JSON object on stdout with --json, else the rich table."""
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
