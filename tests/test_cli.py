"""The `lowbit` command: JSON on stdout, exit codes, messages."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from lowbit.io import write_safetensors


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True, timeout=600)


def test_formats_json_on_a_small_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    gen = torch.Generator().manual_seed(0)
    write_safetensors(path, {"fc.weight": torch.randn(32, 64, generator=gen), "ln.weight": torch.ones(64)})
    out = run("formats", str(path), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["weights"] == 1 and data["parameters"] == 32 * 64
    rows = {(r["format"], r["granularity"]): r for r in data["rows"]}
    assert rows[("int8", "channel")]["sqnr_db"] > 38
    assert rows[("fp16", "tensor")]["bits_per_weight"] == 16.0


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    missing = run("formats", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert missing.stdout == ""
    (tmp_path / "empty").mkdir()
    empty = run("formats", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "no .safetensors" in empty.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    corrupt = run("formats", str(bad))
    assert corrupt.returncode == 2 and "truncated" in corrupt.stderr
    unknown = run("formats", "builtin:minilmm")
    assert unknown.returncode == 2 and "did you mean builtin:minilm" in unknown.stderr
    for result in (missing, empty, corrupt, unknown):
        assert len(result.stderr.strip().splitlines()) == 1


def test_version_and_help():
    assert run("--version").stdout.startswith("lowbit ")
    help_text = run("--help").stdout
    assert "demo" in help_text and "formats" in help_text


def test_every_command_help_has_an_example_and_keeps_its_default_text():
    import os

    env = {**os.environ, "COLUMNS": "200"}
    commands = ["formats", "demo", "recipes", "quantize", "eval", "export", "sensitivity", "plan"]
    for command in commands:
        out = subprocess.run(
            [sys.executable, "-m", "lowbit", command, "--help"], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode == 0 and "Example" in out.stdout, command
    export_help = subprocess.run(
        [sys.executable, "-m", "lowbit", "export", "--help"], capture_output=True, text=True, env=env, timeout=120
    ).stdout
    assert "(default: beside SOURCE)" in export_help  # rich markup must not swallow it
    typo = run("quantise")
    assert typo.returncode == 2 and "Did you mean 'quantize'" in typo.stderr
