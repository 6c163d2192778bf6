"""`lowbit bench`: per-shape latency JSON for encoders, causal LMs and checkpoints; bad shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowbit.errors import DataError
from lowbit.evaluation.speed import parse_shapes


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True, timeout=600)


def test_parse_shapes():
    assert parse_shapes("1x32, 16X128") == [(1, 32), (16, 128)]
    for bad in ("1x", "0x4", "a,b", "3"):
        with pytest.raises(DataError, match=r"BATCHxLENGTH|>= 1"):
            parse_shapes(bad)


@pytest.mark.slow
def test_bench_encoder_and_causal_lm_json():
    enc = run("bench", "builtin:minilm", "--shapes", "1x8,2x16", "--seconds", "0.05", "--json")
    assert enc.returncode == 0, enc.stderr
    data = json.loads(enc.stdout)
    assert data["kind"] == "encoder" and [(r["batch"], r["length"]) for r in data["rows"]] == [(1, 8), (2, 16)]
    assert all(r["median_ms"] > 0 and r["unit"] == "tokens/s" for r in data["rows"])
    lm = run("bench", "builtin:smollm2-135m", "--shapes", "1x8", "--seconds", "0.05", "--decode-tokens", "3", "--json")
    assert lm.returncode == 0, lm.stderr
    data = json.loads(lm.stdout)
    assert data["decode"]["decode_tokens_per_s"] > 0 and data["decode"]["new_tokens"] == 3


def test_bench_bad_input_exits_2():
    bad = run("bench", "builtin:minilm", "--shapes", "1by8")
    assert bad.returncode == 2 and "BATCHxLENGTH" in bad.stderr
    missing = run("bench", "/nonexistent/model")
    assert missing.returncode == 2
