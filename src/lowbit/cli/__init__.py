"""The `lowbit` command: parses arguments, calls the API, prints. Exit 0 ok, 2 bad input, 1 internal."""

from __future__ import annotations

import sys

from ..errors import LowbitError
from . import bench, commands, export, planning, report  # noqa: F401  (register the commands)
from .app import app


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps LowbitError to exit code 2 with a one-line message on stderr.

    Usage errors (unknown option, missing argument) exit with 2 through typer itself."""
    try:
        app(args=argv, prog_name="lowbit")
    except LowbitError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the exception text holds
        sys.stderr.write(f"lowbit: error: {message}\n")
        sys.exit(2)
