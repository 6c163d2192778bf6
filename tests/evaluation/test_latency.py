"""Latency: warm-up and timed runs are counted, percentiles are ordered, arguments are checked."""

from __future__ import annotations

import time

import pytest
import torch

from lowbit.errors import DataError
from lowbit.evaluation.latency import latency


def test_runs_and_warmup_are_counted():
    calls = []
    got = latency(lambda: calls.append(torch.is_inference_mode_enabled()), warmup=2, repeat=5, min_seconds=0)
    assert len(calls) == 7 and all(calls)  # every call under inference mode
    assert got["runs"] == 5 and got["warmup"] == 2
    assert set(got) == {"median_ms", "p10_ms", "p90_ms", "min_ms", "mean_ms", "runs", "warmup"}


def test_times_a_sleep():
    got = latency(lambda: time.sleep(0.002), warmup=1, repeat=5, min_seconds=0)
    assert 2.0 <= got["min_ms"] <= got["p10_ms"] <= got["median_ms"] <= got["p90_ms"]
    assert got["median_ms"] < 200


def test_min_seconds_adds_runs_up_to_max_runs():
    got = latency(lambda: time.sleep(0.001), warmup=0, repeat=2, min_seconds=0.05)
    assert got["runs"] > 2
    capped = latency(lambda: None, warmup=0, repeat=3, min_seconds=60, max_runs=20)
    assert capped["runs"] == 20


@pytest.mark.parametrize("kwargs", [{"repeat": 0}, {"warmup": -1}, {"min_seconds": -1}, {"max_runs": 2}])
def test_bad_arguments(kwargs):
    with pytest.raises(DataError, match="latency:"):
        latency(lambda: None, **kwargs)
