"""Every bad input of docs/bad-inputs.md, run through the CLI in-process: exit code 2, one line
on stderr naming the problem, nothing written, the input left byte-for-byte as it was."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.errors import DataError, LowbitError, NonFiniteError, SpecError, UnsupportedError

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("bert")
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        architectures=["BertModel"],
    )
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint_dir(bert_dir, tmp_path_factory) -> Path:
    loaded = lowbit.load_model(str(bert_dir))
    lowbit.quantize(loaded, "w4-g128")
    return lowbit.save(loaded, tmp_path_factory.mktemp("ck") / "q")


def _edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _first(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _set(tensors: dict, suffix: str, value: float) -> None:
    tensors[_first(tensors, suffix)][0, 0] = value


def _truncate(directory: Path) -> None:
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _bad_header(directory: Path) -> None:
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{garbage" + data[16:])


def _huge_header(directory: Path) -> None:
    path = directory / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + path.read_bytes()[8:])


def _pickle_only(directory: Path) -> None:
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle; never opened


def _shape(tensors: dict) -> None:
    key = _first(tensors, "query.weight")
    tensors[key] = tensors[key][:16].clone()


def _int_weights(tensors: dict) -> None:
    key = _first(tensors, "query.weight")
    tensors[key] = tensors[key].to(torch.int32)


def _manifest(directory: Path, edit) -> None:
    path = directory / "lowbit.json"
    manifest = json.loads(path.read_text())
    layer = manifest["layers"][next(iter(sorted(manifest["layers"])))]
    edit(manifest, layer)
    path.write_text(json.dumps(manifest))


def _scale_dtype(directory: Path) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith(".scale"))
    tensors[key] = tensors[key].double()
    save_file(tensors, path, metadata={"format": "lowbit"})


def _recipe(tmp: Path, text: str) -> str:
    path = tmp / "recipe.json"
    path.write_text(text)
    return str(path)


# id -> (which input it spoils: "model" | "ckpt" | None, how, CLI args after the input, expected text)
MODEL_CASES = {
    "missing-path": (None, None, ["quantize", "{tmp}/no/such/model", "--recipe", "w8-weight"], "no such file"),
    "dir-without-weights": ("model", lambda d: (d / "model.safetensors").unlink(), ["quantize"], "no .safetensors"),
    "dir-without-config": ("model", lambda d: (d / "config.json").unlink(), ["quantize"], "not a model directory"),
    "corrupt-config-json": ("model", lambda d: (d / "config.json").write_text("{oops"), ["quantize"], "not valid JSON"),
    "truncated-safetensors": ("model", _truncate, ["quantize"], "truncated"),
    "corrupt-safetensors-header": ("model", _bad_header, ["quantize"], "header is not valid JSON"),
    "huge-safetensors-header": ("model", _huge_header, ["quantize"], "claims"),
    "pickle-only-directory": ("model", _pickle_only, ["quantize"], "pickle files are refused"),
    "pickle-file": (
        "model",
        _pickle_only,
        ["quantize", "{input}/pytorch_model.bin", "--recipe", "w8-weight"],
        "pickle-based checkpoints are refused",
    ),
    "nan-weights": (
        "model",
        lambda d: _edit_tensors(d, lambda t: _set(t, "query.weight", float("nan"))),
        ["quantize"],
        "NaN or Inf",
    ),
    "inf-weights": (
        "model",
        lambda d: _edit_tensors(d, lambda t: _set(t, "key.weight", float("inf"))),
        ["quantize"],
        "NaN or Inf",
    ),
    "weights-disagree-with-config": ("model", lambda d: _edit_tensors(d, _shape), ["quantize"], "disagree"),
    "integer-weights": ("model", lambda d: _edit_tensors(d, _int_weights), ["quantize"], "must be a float type"),
    "unknown-preset": ("model", None, ["quantize", "{input}", "--recipe", "w4-g12"], "did you mean 'w4-g128'"),
    "impossible-bits": (
        "model",
        None,
        ["quantize", "{input}", "--recipe", '{recipe:{"rules": [{"weight": {"format": "int9"}}]}}'],
        "bits=9 is impossible",
    ),
    "zero-group-size": (
        "model",
        None,
        [
            "quantize",
            "{input}",
            "--recipe",
            '{recipe:{"rules": [{"weight": {"format": "int4", "granularity": "group:0"}}]}}',
        ],
        "size=0",
    ),
    "misspelt-recipe-key": (
        "model",
        None,
        ["quantize", "{input}", "--recipe", '{recipe:{"rules": [{"wieght": "int8"}]}}'],
        "unknown key 'wieght'",
    ),
    "unsupported-layer-type": (
        "model",
        None,
        ["quantize", "{input}", "--recipe", '{recipe:{"rules": [{"types": ["LSTM"], "weight": {"format": "int8"}}]}}'],
        "not a supported layer",
    ),
    "recipe-not-json": ("model", None, ["quantize", "{input}", "--recipe", "{recipe:{rules: oops}"], "cannot parse"),
    "missing-calibration-file": (
        "model",
        None,
        ["quantize", "{input}", "--recipe", "w4-g128-gptq", "--calib", "{tmp}/none.txt"],
        "does not exist",
    ),
    "output-inside-input": (
        "model",
        None,
        ["quantize", "{input}", "--recipe", "w8-weight", "--out", "{input}/q"],
        "inside the input",
    ),
    "output-is-a-file": (
        "model",
        None,
        ["quantize", "{input}", "--recipe", "w8-weight", "--out", "{input}/vocab.txt"],
        "is a file",
    ),
    "output-is-a-foreign-directory": (
        "model",
        None,
        ["quantize", "{input}", "--recipe", "w8-weight", "--out", "{tmp}/photos"],
        "not a lowbit checkpoint",
    ),
    "gguf-as-model": (None, None, ["eval", "{tmp}/x.gguf", "--task", "embedding"], "unsupported file type"),
    "unknown-task": ("model", None, ["eval", "{input}", "--task", "perplexitty"], "task"),
    "checkpoint-manifest-not-json": (
        "ckpt",
        lambda d: (d / "lowbit.json").write_text("{not json"),
        ["eval", "{input}", "--task", "embedding"],
        "not valid JSON",
    ),
    "checkpoint-shape-disagrees": (
        "ckpt",
        lambda d: _manifest(d, lambda m, layer: layer["weight"].__setitem__("shape", [8, 8])),
        ["eval", "{input}", "--task", "embedding"],
        "",
    ),
    "checkpoint-bits-disagree": (
        "ckpt",
        lambda d: _manifest(d, lambda m, layer: layer["weight"]["format"].__setitem__("bits", 3)),
        ["eval", "{input}", "--task", "embedding"],
        "packed codes",
    ),
    "checkpoint-dtype-disagrees": ("ckpt", _scale_dtype, ["eval", "{input}", "--task", "embedding"], ""),
    "checkpoint-newer-format": (
        "ckpt",
        lambda d: _manifest(d, lambda m, layer: m.__setitem__("format_version", 99)),
        ["eval", "{input}", "--task", "embedding"],
        "newer",
    ),
    "checkpoint-truncated": ("ckpt", _truncate, ["eval", "{input}", "--task", "embedding"], "truncated"),
    "export-unknown-format": (
        "ckpt",
        None,
        ["export", "{input}", "--format", "tflite", "--out", "{tmp}/x"],
        "unknown export format",
    ),
    "export-not-a-checkpoint": ("model", None, ["export", "{input}", "--format", "gguf", "--out", "{tmp}/x.gguf"], ""),
    "export-hf-over-a-foreign-directory": (
        "ckpt",
        None,
        ["export", "{input}", "--format", "hf", "--out", "{tmp}/photos"],
        "not a Hugging Face export",
    ),
    "export-hf-over-its-source": (
        "ckpt",
        None,
        ["export", "{input}", "--format", "hf", "--out", "{input}"],
        "lies inside the checkpoint",
    ),
    "export-onnx-to-a-directory": (
        "ckpt",
        None,
        ["export", "{input}", "--format", "onnx", "--out", "{tmp}/photos"],
        "is a directory",
    ),
    "output-under-a-file": (
        "model",
        None,
        ["quantize", "{input}", "--recipe", "w8-weight", "--out", "{tmp}/x.gguf/q"],
        "is a file, not a directory",
    ),
    "stream-with-resume": (
        "model",
        None,
        ["quantize", "{input}", "-r", "w8-weight", "--stream", "--resume"],
        "--resume",
    ),
    "stream-calibrated-recipe": (
        "model",
        None,
        ["quantize", "{input}", "-r", "w4-g128-gptq", "--stream"],
        "calibration",
    ),
}


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.rglob("*")
        if p.is_file()
    }


def _fill(arg: str, tmp: Path, source: Path) -> str:
    match = re.fullmatch(r"\{recipe:(.*)\}", arg)
    if match:
        return _recipe(tmp, match.group(1))
    return arg.replace("{tmp}", str(tmp)).replace("{input}", str(source))


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, bert_dir, checkpoint_dir, tmp_path, capsys):
    kind, spoil, args, expected = MODEL_CASES[case]
    source = tmp_path / "input"
    if kind is not None:
        shutil.copytree(bert_dir if kind == "model" else checkpoint_dir, source)
        if spoil is not None:
            spoil(source)
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"not really a photo")
    if len(args) == 1:
        args = [args[0], "{input}", "--recipe", "w8-weight"]
    argv = [_fill(a, tmp_path, source) for a in args]
    out = tmp_path / "out"
    if argv[0] == "quantize" and "--out" not in argv:
        argv += ["--out", str(out)]
    before = {p.name: _digest(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2, err
    assert err.startswith("lowbit: error: ") and len(err.splitlines()) == 1, err
    assert expected in err
    after = {p.name: _digest(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # nothing written, nothing changed, no temporary leftovers


# API-level bad inputs (no CLI form): each raises a LowbitError subclass naming the problem.
def _two_linears(i: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(i, 8), nn.ReLU(), nn.Linear(8, 8))


API_CASES = {
    "zero-size-weight": (lambda: lowbit.quantize(_two_linears(0), "w8-weight"), SpecError, "zero elements"),
    "nan-activations": (
        lambda: lowbit.quantize(_two_linears(), "w8a8-static", calib=[torch.full((2, 8), float("nan"))]),
        NonFiniteError,
        "calibration input",
    ),
    "inf-activations-gptq": (
        lambda: lowbit.quantize(_two_linears(), "w4-g128-gptq", calib=[torch.full((2, 8), float("inf"))]),
        NonFiniteError,
        "calibration input",
    ),
    "calibration-batch-wrong-shape": (
        lambda: lowbit.quantize(_two_linears(), "w4-g128-gptq", calib=[torch.randn(2, 5)]),
        DataError,
        "does not fit the model",
    ),
    "empty-calibration": (lambda: lowbit.quantize(_two_linears(), "w4-g128-gptq", calib=[]), DataError, "empty"),
    "already-quantized": (
        lambda: lowbit.quantize(lowbit.quantize(_two_linears(), "w8-weight"), "w8-weight"),
        SpecError,
        "already quantized",
    ),
    "no-quantizable-layer": (lambda: lowbit.quantize(nn.Sequential(nn.ReLU()), "w8-weight"), SpecError, "matches no"),
    "unsupported-layer-api": (
        lambda: lowbit.quantize(
            nn.Sequential(nn.LSTM(8, 8)),
            lowbit.recipe.Recipe.from_dict({"rules": [{"types": ["LSTM"], "weight": {"format": "int8"}}]}),
        ),
        UnsupportedError,
        "LSTM",
    ),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_bad_input_raises_a_lowbit_error(case):
    call, error, expected = API_CASES[case]
    with pytest.raises(error, match=expected) as raised:
        call()
    assert isinstance(raised.value, LowbitError)


def test_zero_range_weights_quantize_to_exact_zeros():
    """Not an error: an all-zero weight quantizes (scale guard) and dequantizes to zeros."""
    model = _two_linears()
    nn.init.zeros_(model[0].weight)
    lowbit.quantize(model, "w4-g128")
    assert torch.count_nonzero(model[0].qweight.dequantize()) == 0


def test_the_doc_table_lists_every_case():
    rows = DOC.read_text()
    missing = [case for case in [*MODEL_CASES, *API_CASES] if f"`{case}`" not in rows]
    assert not missing, f"docs/bad-inputs.md lacks rows for {missing}"
