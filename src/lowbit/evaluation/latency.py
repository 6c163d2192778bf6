"""Wall-clock latency of a zero-argument callable: warm-up runs, then timed runs, medians not means."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import DataError


def _synchronize() -> None:
    """Wait for queued GPU work so that a timing covers it (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def latency(
    fn: Callable[[], Any], warmup: int = 3, repeat: int = 10, min_seconds: float = 1.0, max_runs: int = 10_000
) -> dict:
    """Time ``fn()`` under ``torch.inference_mode``: ``warmup`` untimed calls, then at least
    ``repeat`` timed calls and until ``min_seconds`` of timed calls have passed (at most
    ``max_runs``). Returns median / p10 / p90 / min / mean in milliseconds and the number of runs."""
    if warmup < 0 or repeat < 1 or max_runs < repeat or min_seconds < 0:
        raise DataError(
            f"latency: warmup={warmup}, repeat={repeat}, max_runs={max_runs}, min_seconds={min_seconds}; "
            "need warmup >= 0, 1 <= repeat <= max_runs and min_seconds >= 0"
        )
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        _synchronize()
        while len(times) < max_runs and (len(times) < repeat or sum(times) < min_seconds):
            start = time.perf_counter()
            fn()
            _synchronize()
            times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "runs": len(times),
        "warmup": warmup,
    }
