"""Progress bars: shown on a terminal's stderr with counts and ETA, hidden with --quiet and when
stderr is not a terminal; --json output on stdout stays one clean JSON object either way."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A tiny Hugging Face BERT directory (config, tokenizer, safetensors)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat"]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=7, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, architectures=["BertModel"],
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    return path


def _run_on_terminal(*args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal and stdout on a pipe."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", *args], stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    out, _ = proc.communicate(timeout=300)
    os.close(leader)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def test_terminal_shows_bars_and_json_stays_clean(model_file, tmp_path):
    code, out, err = _run_on_terminal(
        "quantize", str(model_file), "-r", "w8-weight", "-o", str(tmp_path / "q"), "--json"
    )
    assert code == 0, err
    assert json.loads(out)["layers"] >= 1  # stdout is exactly the JSON object
    assert "quantize" in err and "eta" in err and "/" in err  # bar title, ETA, counts


def test_quiet_and_non_terminal_show_no_bars(model_file, tmp_path):
    code, _, err = _run_on_terminal(
        "quantize", str(model_file), "-r", "w8-weight", "-o", str(tmp_path / "q"), "--json", "--quiet"
    )
    assert code == 0 and "eta" not in err
    piped = subprocess.run(
        [sys.executable, "-m", "lowbit", "quantize", str(model_file), "-r", "w8-weight", "-o", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert piped.returncode == 0 and "eta" not in piped.stderr
