"""The README's "Getting started" commands, run exactly as written (from a scratch directory)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lowbit

README = Path(__file__).resolve().parents[1] / "README.md"


def getting_started_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Getting started") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def table_value(output: str, metric: str) -> float:
    """A metric's value from the table `lowbit eval` prints."""
    return float(re.search(rf"{metric}\s*│\s*([0-9.]+)", output).group(1))


def test_getting_started_runs_as_written(tmp_path):
    """Also the MiniLM int8-dynamic end-to-end check: the README quantizes it and evaluates it."""
    commands = getting_started_commands()
    assert len(commands) == 5
    outputs = {}
    for command in commands:
        assert command.startswith(".venv/bin/lowbit ")
        args = command.split()[1:]
        proc = subprocess.run([sys.executable, "-m", "lowbit", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=900)  # fmt: skip
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-2000:]}"
        outputs[" ".join(args[:2])] = proc.stdout
    # Issue 3: int8-dynamic MiniLM keeps cosine >= 0.99 and top-1 agreement >= 95% against the float model.
    evaluation = outputs["eval minilm-int8"]
    assert table_value(evaluation, "mean_cosine") >= 0.99, evaluation
    assert table_value(evaluation, "top1_agreement") >= 0.95, evaluation
    plan = json.loads((tmp_path / "minilm-plan.json").read_text())
    assert lowbit.Recipe.from_dict(plan).rules
    for out in ("minilm-int8", "minilm-mixed"):
        assert (tmp_path / out / "lowbit.json").is_file()
    mixed = lowbit.load(tmp_path / "minilm-mixed")
    assert mixed is not None
