"""`lowbit export`: write a lowbit checkpoint in an engine's format (ONNX QDQ, GGUF, Hugging Face)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import SpecError
from .app import JsonFlag, app, emit

# format name -> (module, default output suffix). Each module has
# `export(source: Path, out: Path, **options) -> dict` that writes `out` atomically.
EXPORTERS: dict[str, tuple[str, str]] = {
    "onnx": ("lowbit.export.onnx", ".onnx"),
    "gguf": ("lowbit.export.gguf", ".gguf"),
    "hf": ("lowbit.export.hf", "-hf"),
}


def exporter(fmt: str):
    """The export function for a format name, or a SpecError listing the known formats."""
    if fmt not in EXPORTERS:
        known = ", ".join(sorted(EXPORTERS))
        raise SpecError(f"unknown export format {fmt!r}; choose one of: {known}")
    name = EXPORTERS[fmt][0]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise SpecError(
            f"export to {fmt} needs {err.name}, which is not installed; "
            "install lowbit with its export extras (see README)"
        ) from err
    return module.export


@app.command("export")
def export_cmd(
    source: Annotated[Path, typer.Argument(help="A lowbit checkpoint directory (from `lowbit quantize`).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx | gguf | hf.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file (onnx, gguf) or directory (hf) (default: beside SOURCE)."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", help="Exporter option KEY=VALUE, repeatable (e.g. gguf: fallback=q8_0)."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Export a quantized checkpoint so an engine can run it.

    Example: lowbit export minilm-int8 --format onnx --out minilm-int8.onnx
    """
    export = exporter(fmt)
    if not source.is_dir() or not (source / "lowbit.json").is_file():
        raise SpecError(
            f"{source} is not a lowbit checkpoint directory (no lowbit.json); make one with `lowbit quantize`"
        )
    out = out or source.with_name(source.name + EXPORTERS[fmt][1])
    try:
        out.resolve().relative_to(source.resolve())
    except ValueError:
        pass
    else:
        raise SpecError(f"--out {out} lies inside the checkpoint {source}; choose a path outside it")
    options = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--option {item!r}: write it as KEY=VALUE, e.g. fallback=q8_0")
        options[key.strip()] = value.strip()
    result = {"source": str(source), "format": fmt, "out": str(out), **export(source, out, **options)}
    table = Table(title=f"{source} -> {out}")
    for key in result:
        table.add_column(key)
    table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in result.values()])
    emit(result, as_json, table)
