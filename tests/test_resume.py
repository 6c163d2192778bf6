"""Resuming a block-by-block quantization: every finished block is journaled; a run that died
continues after the saved blocks and gives the checkpoint an uninterrupted run gives, to the byte."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError

BLOCKS = 4


def _llama(path: Path, layers: int = BLOCKS, hidden: int = 128) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(
        path
    )
    return path


def _calib(seed: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (1, 40), generator=g)} for _ in range(4)]


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


class _Crash(Exception):
    pass


def _crash_at(block: int):
    """A progress callback that kills the run when block ``block`` (0-based) starts."""

    def progress(message: str, index: int, total: int) -> None:
        if message.startswith("block") and index == block:
            raise _Crash(message)

    return progress


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return _llama(tmp_path_factory.mktemp("src") / "llama")


@pytest.mark.parametrize("recipe", ["w4-g128-gptq", "w4-g128-awq", "w8a8-static"])
def test_resumed_run_equals_uninterrupted_run(source, tmp_path, recipe):
    reference = lowbit.load_model(str(source))
    lowbit.quantize(reference, recipe, calib=_calib())
    expected = _digests(lowbit.save(reference, tmp_path / "ref"))

    journal = tmp_path / "journal"
    crashed = lowbit.load_model(str(source))
    with pytest.raises(_Crash):
        lowbit.quantize(crashed, recipe, calib=_calib(), progress=_crash_at(2), journal=journal)
    state = json.loads((journal / "journal.json").read_text())
    assert state["done"] == 2
    assert sorted(p.name for p in journal.iterdir()) == [
        "block-0.safetensors", "block-1.safetensors", "hidden-2.safetensors", "journal.json",
    ]  # fmt: skip

    started: list[int] = []
    resumed = lowbit.load_model(str(source))
    lowbit.quantize(
        resumed,
        recipe,
        calib=_calib(),
        journal=journal,
        resume=True,
        progress=lambda message, index, total: started.append(index) if message.startswith("block") else None,
    )
    assert resumed.model.lowbit.resumed_blocks == 2
    assert started == [2, 3]  # blocks 0 and 1 came from the journal
    assert _digests(lowbit.save(resumed, tmp_path / "out")) == expected
    assert not journal.exists()  # removed once the checkpoint is saved


def test_without_resume_a_stale_journal_is_discarded(source, tmp_path):
    journal = tmp_path / "journal"
    with pytest.raises(_Crash):
        lowbit.quantize(
            lowbit.load_model(str(source)), "w4-g128-gptq", _calib(), progress=_crash_at(1), journal=journal
        )
    fresh = lowbit.load_model(str(source))
    lowbit.quantize(fresh, "w4-g128-gptq", _calib(), journal=journal)
    assert fresh.model.lowbit.resumed_blocks == 0
    assert json.loads((journal / "journal.json").read_text())["done"] == BLOCKS


@pytest.mark.parametrize(
    ("change", "recipe"),
    [("calibration", "w4-g128-gptq"), ("recipe", "w4-g128-awq")],
)
def test_resume_with_other_inputs_is_refused(source, tmp_path, change, recipe):
    journal = tmp_path / "journal"
    with pytest.raises(_Crash):
        lowbit.quantize(
            lowbit.load_model(str(source)), "w4-g128-gptq", _calib(), progress=_crash_at(2), journal=journal
        )
    calib = _calib(seed=4) if change == "calibration" else _calib()
    with pytest.raises(LowbitError, match="run without --resume to start over"):
        lowbit.quantize(lowbit.load_model(str(source)), recipe, calib, journal=journal, resume=True)


def test_corrupt_journal_is_a_clear_error(source, tmp_path):
    journal = tmp_path / "journal"
    with pytest.raises(_Crash):
        lowbit.quantize(
            lowbit.load_model(str(source)), "w4-g128-gptq", _calib(), progress=_crash_at(2), journal=journal
        )
    (journal / "journal.json").write_text("{not json")
    with pytest.raises(LowbitError, match="journal is corrupt"):
        lowbit.quantize(lowbit.load_model(str(source)), "w4-g128-gptq", _calib(), journal=journal, resume=True)


def test_journal_next_to_foreign_files_is_refused(source, tmp_path):
    journal = tmp_path / "journal"
    journal.mkdir()
    (journal / "notes.txt").write_text("mine")
    with pytest.raises(LowbitError, match="holds other files"):
        lowbit.quantize(lowbit.load_model(str(source)), "w4-g128-gptq", _calib(), journal=journal)
    assert (journal / "notes.txt").read_text() == "mine"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit", "quantize", *args]


@pytest.mark.slow
def test_cli_resume_after_sigkill(tmp_path):
    """Kill `lowbit quantize` (SIGKILL) once two blocks are journaled; `--resume` finishes the run
    from there and writes the checkpoint an uninterrupted run writes."""
    source = _llama(tmp_path / "src", layers=10, hidden=256)
    text = tmp_path / "calib.txt"
    words = [f"w{(i * 7) % 61}" for i in range(4000)]
    text.write_text("\n".join(" ".join(words[i : i + 50]) for i in range(0, len(words), 50)))
    common = ["-r", "w4-g128-gptq", "--calib", str(text), "--samples", "32", "--seq-len", "64", "--json"]
    subprocess.run(_cli(str(source), "-o", str(tmp_path / "ref"), *common), check=True, capture_output=True)

    out = tmp_path / "q"
    journal = tmp_path / ".q.journal" / "journal.json"
    proc = subprocess.Popen(_cli(str(source), "-o", str(out), *common), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and json.loads(journal.read_text())["done"] >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed midway"
    assert not out.exists()
    done = json.loads(journal.read_text())["done"]

    result = subprocess.run(_cli(str(source), "-o", str(out), *common, "--resume"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["resumed_blocks"] == done >= 2
    assert _digests(out) == _digests(tmp_path / "ref")
    assert not journal.parent.exists()


def test_resume_under_torchrun_is_refused_and_no_journal_is_written(source, tmp_path, monkeypatch):
    """Each torchrun process holds only its share of the calibration batches, so a journal of one
    process cannot resume the run: --resume is refused there, and a plain run writes no journal."""
    from lowbit import distributed

    monkeypatch.setattr(distributed, "world", lambda: 2)
    with pytest.raises(LowbitError, match="single-process run"):
        lowbit.quantize(lowbit.load_model(str(source)), "w4-g128-gptq", _calib(), journal=tmp_path / "j", resume=True)
    assert not (tmp_path / "j").exists()


def test_asymmetric_gptq_refuses_to_resume(source, tmp_path):
    """Asymmetric GPTQ carries the float model's hidden states, which the journal does not keep."""
    from lowbit.recipe import Recipe

    rule = {"weight": {"format": "int4-asym", "granularity": "group:32"}, "algorithm": "gptq"}
    recipe = Recipe.from_dict({"name": "gptaq", "rules": [{**rule, "options": {"asymmetric": True}}]})
    journal = tmp_path / "journal"
    with pytest.raises(_Crash):
        lowbit.quantize(lowbit.load_model(str(source)), recipe, _calib(), progress=_crash_at(2), journal=journal)
    with pytest.raises(LowbitError, match="cannot resume"):
        lowbit.quantize(lowbit.load_model(str(source)), recipe, _calib(), journal=journal, resume=True)
