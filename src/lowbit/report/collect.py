"""Read saved lowbit results (the JSON that `--json` prints) and tell which command made each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError

KINDS = ("demo", "accuracy", "eval", "bench", "sensitivity", "plan")


def kind_of(data: Any) -> str | None:
    """Which lowbit output ``data`` is, from its keys; None if it is none of them."""
    if not isinstance(data, dict):
        return None
    rows = data.get("rows")
    first = rows[0] if isinstance(rows, list) and rows and isinstance(rows[0], dict) else {}
    if "recipe" in first and "size_mb" in first:
        return "demo"
    if "scheme" in first and "perplexity" in first:
        return "accuracy"  # bench/llm_accuracy.py
    if "median_ms" in first and "kind" in data:
        return "bench"
    if isinstance(data.get("metrics"), dict) and "task" in data:
        return "eval"
    if isinstance(data.get("layers"), dict) and "candidates" in data:
        return "sensitivity"
    if isinstance(data.get("plan"), dict) and "front" in data:
        return "plan"
    return None


def load_results(paths: list[Path]) -> list[tuple[str, str, dict]]:
    """(kind, file name, data) per file; a clear error for a missing file or foreign JSON."""
    if not paths:
        raise DataError(
            "no result files given; pass the JSON written by lowbit eval/bench/sensitivity/plan/demo --json"
        )
    results = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file; pass a JSON result saved from a lowbit command")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); save a command's --json output to a file") from exc
        kind = kind_of(data)
        if kind is None:
            raise DataError(
                f"{path}: not a lowbit result (expected the --json output of eval, bench, sensitivity, plan or demo)"
            )
        results.append((kind, path.name, data))
    return results
