"""quantize -> save -> eval through the CLI, on a tiny HF model and on real MiniLM; bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True, timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    words = [
        "the",
        "a",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        "ship",
        "sea",
        "big",
        "small",
        "red",
        "green",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
    ]
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(words) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        architectures=["BertModel"],
    )
    BertModel(cfg).save_pretrained(path)
    return path


def test_quantize_then_eval_a_model_directory(tiny_bert_dir, tmp_path):
    out = tmp_path / "q"
    result = run("quantize", str(tiny_bert_dir), "--recipe", "w8-weight", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["recipe"] == "w8-weight" and info["layers"] == 16 and (out / "lowbit.json").exists()
    assert 8.4 < info["quantized_bits_per_weight"] < 9.0  # 8-bit codes + one fp32 scale per row of 32-64
    # 16 layers: 12 linears, the pooler (the output head) and 3 embedding tables
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["source"]["model"] == str(tiny_bert_dir) and len(manifest["source"]["sha256"]) == 64
    ev = run("eval", str(out), "--task", "embedding", "--json")
    assert ev.returncode == 0, ev.stderr
    data = json.loads(ev.stdout)
    assert set(data) >= {"task", "metrics", "size_bytes", "bits_per_weight", "model"}
    assert data["bits_per_weight"] == pytest.approx(info["bits_per_weight"])  # one figure for one checkpoint
    assert data["metrics"]["mean_cosine"] > 0.99  # compared with the source model named in lowbit.json


def test_quantize_for_a_target_names_the_layers_that_fall_back(tiny_bert_dir, tmp_path):
    from lowbit.planning.targets import checkpoint_schemes, fallbacks_by_target

    out = tmp_path / "q"
    result = run("quantize", str(tiny_bert_dir), "--recipe", "w4-g128", "--target", "edge", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["target"] == "edge" and len(info["fallbacks"]) == info["layers"] == 16
    assert all("edge has no kernel for this scheme" in why for why in info["fallbacks"].values())
    assert "16 of 16 layers fall back on edge" in result.stderr
    schemes = checkpoint_schemes(json.loads((out / "lowbit.json").read_text()))
    by_target = fallbacks_by_target(schemes)
    assert by_target["edge"] == info["fallbacks"]
    assert not by_target["x86"]  # int4 groups and int8 tables run on x86's weight-only kernels
    ok = run("quantize", str(tiny_bert_dir), "--recipe", "w8-weight", "--target", "x86", "--out", str(tmp_path / "o"),
             "--json")  # fmt: skip
    assert ok.returncode == 0 and json.loads(ok.stdout)["fallbacks"] == {} and "fall back" not in ok.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["quantize", "/no/such/model", "--recipe", "w8-weight"], "no such file"),
        (["quantize", "{empty}", "--recipe", "w8-weight"], "not a model directory"),
        (["quantize", "{model}", "--recipe", "w4-g12"], "did you mean 'w4-g128'"),
        (["quantize", "{model}", "--recipe", "{bad_recipe}"], "unknown key 'wieght'"),
        (["quantize", "{truncated}", "--recipe", "w8-weight"], "truncated"),
        (["quantize", "{model}", "--recipe", "w8-weight", "--out", "{model}/inside"], "inside the input"),
        (["eval", "{model}", "--task", "perplexitty"], "task"),
        (["quantize", "{model}", "--recipe", "w8-weight", "--target", "tpu"], "target 'tpu' is unknown"),
        (["quantize", "{model}", "--recipe", "w9-g64"], "2-8 bits"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(args, message, tiny_bert_dir, tmp_path):
    import shutil

    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_bert_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    bad_recipe = tmp_path / "bad.json"
    bad_recipe.write_text(json.dumps({"rules": [{"wieght": "int8"}]}))
    fill = {
        "empty": str(empty),
        "model": str(tiny_bert_dir),
        "truncated": str(truncated),
        "bad_recipe": str(bad_recipe),
    }
    out_dir = tmp_path / "out"
    args = [a.format(**fill) for a in args]
    if "--out" not in args and args[0] == "quantize":
        args += ["--out", str(out_dir)]
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out_dir.exists() and not (tiny_bert_dir / "inside").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_recipes_lists_presets():
    result = run("recipes", "--json")
    presets = json.loads(result.stdout)["recipes"]
    assert {"int8-dynamic", "w4-g128", "nf4-g64", "vq-2bit"} <= set(presets)


@pytest.mark.slow
def test_demo_json_contract(tmp_path):
    result = run("demo", "--sentences", "120", "--max-tokens", "1024", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    recipes = {(r["model"], r["recipe"]) for r in rows}
    assert {("builtin:minilm", r) for r in ("float32", "int8-dynamic", "w8-weight", "w4-g128", "nf4-g64")} <= recipes
    assert {("builtin:smollm2-135m", r) for r in ("float32", "w8-weight", "w4-g128")} <= recipes
    by = {(r["model"], r["recipe"]): r for r in rows}
    float_ppl = by[("builtin:smollm2-135m", "float32")]["perplexity"]
    assert abs(by[("builtin:smollm2-135m", "w8-weight")]["perplexity"] / float_ppl - 1) < 0.01
    assert by[("builtin:minilm", "int8-dynamic")]["cosine"] > 0.99
    for row in rows:
        assert row["size_mb"] > 0 and row["latency_ms"] > 0 and row["bits_per_weight"] > 0
    assert by[("builtin:minilm", "w4-g128")]["size_mb"] < by[("builtin:minilm", "w8-weight")]["size_mb"]
    assert (tmp_path / "lowbit-demo-report.html").stat().st_size > 10_000  # the demo writes its report


def test_plan_with_the_fisher_estimate_for_a_target(tiny_bert_dir, tmp_path):
    """`lowbit plan --method fisher --target arm`: Fisher table over the grid the target runs, a
    recipe that quantizes, latency estimates, and no layer that falls back."""
    out = tmp_path / "plan.json"
    result = run("plan", str(tiny_bert_dir), "--avg-bits", "6", "--method", "fisher", "--target", "arm",
                 "--samples", "2", "--no-verify", "--out", str(out), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["target"] == "arm" and info["fallbacks"] == {}
    assert set(info["plan"]["counts"]) <= {"w8-weight", "w4-g32", "w4-g64", "w4-g128", "fp16"}  # arm: int4/int8, fp16
    assert info["plan"]["bits_per_weight"] <= 6 and info["plan"]["latency_ms"] > 0 and info["latency_front"]
    q = run("quantize", str(tiny_bert_dir), "--recipe", str(out), "--target", "arm", "--out", str(tmp_path / "q"),
            "--json")  # fmt: skip
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["fallbacks"] == {}
