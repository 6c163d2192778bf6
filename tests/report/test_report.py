"""`lowbit report`: built from real --json outputs of eval, bench, sensitivity and plan on a tiny
BERT, plus its checkpoint; self-contained (no URLs), every plot present; bad input; and a
render in headless Chromium (no console errors, every plot with a size, a real screenshot)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.report.collect import kind_of


def _cli(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as done:
        main([*args, "--json"])
    out = capsys.readouterr().out
    assert done.value.code in (0, None), out
    return json.loads(out)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("bert")
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "ship", "sea", "big", "red", "fox"]
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words) + 5, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=64, architectures=["BertModel"],
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def results(bert_dir, tmp_path_factory):
    """Real outputs of the commands, saved as JSON files, and the checkpoint."""
    tmp = tmp_path_factory.mktemp("results")
    capsys = _Capture()
    ckpt = tmp / "q"
    files = {}
    with capsys:
        _cli(capsys, "quantize", str(bert_dir), "-r", "w4-g128", "-o", str(ckpt), "-q")
        files["eval"] = _cli(capsys, "eval", str(ckpt), "--task", "embedding")
        files["bench"] = _cli(capsys, "bench", str(ckpt), "--shapes", "1x16", "--seconds", "0.05")
        cands = ["--candidates", "w8-weight,w4-g128", "--samples", "2", "-q"]
        files["sensitivity"] = _cli(capsys, "sensitivity", str(bert_dir), *cands)
        files["plan"] = _cli(capsys, "plan", str(bert_dir), "--avg-bits", "6", "--out", str(tmp / "p.json"), *cands)
    paths = []
    for name, data in files.items():
        assert kind_of(data) == name
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(data))
        paths.append(path)
    demo = {
        "rows": [
            {
                "model": "builtin:minilm",
                "recipe": "float32",
                "size_mb": 90.9,
                "bits_per_weight": 32.0,
                "cosine": 1.0,
                "top1": 1.0,
                "latency_ms": 300.0,
            },
            {
                "model": "builtin:minilm",
                "recipe": "int8-dynamic",
                "size_mb": 34.0,
                "bits_per_weight": 8.3,
                "cosine": 0.999,
                "top1": 0.97,
                "latency_ms": 120.0,
            },
        ]
    }  # fmt: skip (shape of `lowbit demo --json`, which takes minutes: tested in test_cli_pipeline)
    (tmp / "demo.json").write_text(json.dumps(demo))
    return [*paths, tmp / "demo.json"], ckpt


class _Capture:
    """capsys for a module-scoped fixture: swaps sys.stdout for a buffer."""

    def __enter__(self):
        import io
        import sys

        self._old, self._buf = sys.stdout, io.StringIO()
        sys.stdout = self._buf
        return self

    def __exit__(self, *exc):
        import sys

        sys.stdout = self._old

    def readouterr(self):
        out = self._buf.getvalue()
        self._buf.seek(0)
        self._buf.truncate()
        return type("R", (), {"out": out})()


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    paths, ckpt = results
    out = tmp_path_factory.mktemp("html") / "report.html"
    with pytest.raises(SystemExit) as done:
        main(["report", *map(str, paths), "--model", str(ckpt), "-o", str(out)])
    assert done.value.code in (0, None)
    return out


def test_report_has_every_section_and_plot(report):
    text = report.read_text()
    for title in ("Recipes", "Mixed-precision plan", "Per-layer sensitivity", "Speed", "Weights", "Hardware targets",
                  "Environment"):  # fmt: skip
        assert f"<h2>{title}" in text, title
    assert text.count("<svg") >= 7  # size/speed Pareto, plan fronts (size, latency), sensitivity, SQNR, histograms
    assert "Plan: latency vs damage" in text
    assert "Not in this report" not in text
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", text)  # self-contained: nothing fetched
    assert "int8-dynamic" in text and "torch" in text


def test_bad_inputs(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    (tmp_path / "y.json").write_text("{nope")
    for path, message in [
        (tmp_path / "missing.json", "no such file"),
        (tmp_path / "x.json", "not a lowbit result"),
        (tmp_path / "y.json", "not valid JSON"),
    ]:
        with pytest.raises(SystemExit) as done:
            main(["report", str(path), "-o", str(tmp_path / "r.html")])
        assert done.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _render(browser: str, page: Path, tmp: Path) -> tuple[str, str, Path]:
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=1"]
    flags += ["--window-size=1280,2400", f"--user-data-dir={tmp / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shot = tmp / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    return dom.stdout, dom.stderr, shot


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and re.search(r"error|uncaught", line, re.I)]


@pytest.mark.slow
def test_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (scripts/setup.sh --dev installs it with apt-get when run as root)")
    dom, log, shot = _render(browser, report, tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    plots = int(re.search(r'data-plots="(\d+)"', body).group(1))
    assert plots >= 6 and 'data-empty-plots="0"' in body  # every plot laid out with a size
    assert not _console_errors(log)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 1000 and height >= 1000 and len(data) > 20_000  # a real picture, not a blank page
    # the console check itself works: a page with an error is caught
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); undefinedFunction();</script></body></html>")
    _, bad_log, _ = _render(browser, bad, tmp_path / "b")
    assert _console_errors(bad_log)
