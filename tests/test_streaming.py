"""Streaming quantization (one layer in memory at a time) against quantize + save in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError, SpecError
from lowbit.export.checkpoint import WEIGHTS_INDEX, read_weights
from lowbit.streaming import quantize_streaming


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def _save_llama(path: Path, dtype: torch.dtype, tied: bool) -> Path:
    """A tiny Llama saved by save_pretrained in shards of 50 KB (so several files and an index)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(path, max_shard_size="50KB")
    _tokenizer().save_pretrained(path)
    assert (path / "model.safetensors.index.json").exists()
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream-src")
    return {
        "bf16": _save_llama(root / "bf16", torch.bfloat16, tied=False),
        "fp32-tied": _save_llama(root / "fp32", torch.float32, tied=True),
    }


@pytest.mark.parametrize("recipe", ["w4-g128", "w8-weight", "w2-g64-hqq"])
@pytest.mark.parametrize("which", ["bf16", "fp32-tied"])
def test_streaming_equals_in_memory(sources, tmp_path, which, recipe):
    source = sources[which]
    streamed = quantize_streaming(source, recipe, tmp_path / "stream", shard_bytes=40_000)
    assert (streamed / WEIGHTS_INDEX).exists() and len(list(streamed.glob("model-*.safetensors"))) > 1
    loaded = lowbit.load_model(source)
    lowbit.quantize(loaded, recipe)
    lowbit.save(loaded, tmp_path / "memory")
    want, got = read_weights(tmp_path / "memory"), read_weights(streamed)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():  # bf16 -> float32 is exact, so the bytes agree
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    manifest = json.loads((streamed / "lowbit.json").read_text())
    reference = json.loads((tmp_path / "memory" / "lowbit.json").read_text())
    for key in ("layers", "tied", "recipe", "architecture", "kind", "source"):
        assert manifest[key] == reference[key], key
    assert bool(manifest["tied"]) == (which == "fp32-tied")
    a, b = lowbit.load(streamed), lowbit.load(tmp_path / "memory")
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)
    assert a.tokenizer is not None


def test_single_shard_output_is_one_file(sources, tmp_path):
    out = quantize_streaming(sources["bf16"], "w4-g128", tmp_path / "one")
    assert (out / "model.safetensors").exists() and not (out / WEIGHTS_INDEX).exists()
    assert lowbit.load(out).model.lowbit.schemes


def test_calibrated_recipe_is_refused(sources, tmp_path):
    with pytest.raises(SpecError, match="streaming supports calibration-free recipes"):
        quantize_streaming(sources["bf16"], "w4-g128-gptq", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_shard_leaves_no_output(sources, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sources["bf16"], broken)
    sorted(broken.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(LowbitError, match="missing"):
        quantize_streaming(broken, "w4-g128", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_failure_midway_leaves_no_output(sources, tmp_path):
    """A corrupt weight found after some layers were written: the temp dir is removed."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    import shutil

    shutil.copytree(sources["bf16"], bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.2.mlp.down_proj.weight"
    shard = bad / index[key]
    tensors = load_file(shard)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="down_proj"):
        quantize_streaming(bad, "w4-g128", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


def test_sharded_checkpoint_missing_shard_is_a_clear_error(sources, tmp_path):
    out = quantize_streaming(sources["bf16"], "w4-g128", tmp_path / "ck", shard_bytes=40_000)
    sorted(out.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(LowbitError, match="missing"):
        lowbit.load(out)


def test_cli_stream(sources, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(Path(lowbit.__file__).parents[1])}
    cmd = [sys.executable, "-m", "lowbit", "quantize", str(sources["bf16"]), "--recipe", "w4-g128"]
    done = subprocess.run([*cmd, "--out", str(out), "--stream", "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["layers"] == 23 and result["out"] == str(out)  # 21 linears + int8 embeddings and head
    assert lowbit.load(out).model.lowbit.recipe.name == "w4-g128"
    bad = subprocess.run(
        [*cmd[:-1], "w4-g128-gptq", "--out", str(tmp_path / "bad"), "--stream"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "calibration-free" in bad.stderr


def test_write_shard_reads_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    from lowbit.streaming import write_shard

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "b": torch.randn(7, generator=gen),
        "c": torch.randint(-8, 8, (4, 3), dtype=torch.int8, generator=gen),
        "d": torch.tensor([True, False, True]),
        "e": torch.zeros(0, 4, dtype=torch.float16),
        "f": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),  # not contiguous
    }
    write_shard(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"} and sorted(fh.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            got = fh.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_stored_names_that_transformers_renames_are_found(tmp_path):
    """GPT-NeoX files store the head as embed_out.weight; transformers loads it as lm_head. The
    streamed checkpoint finds it under its stored name and equals the in-memory one."""
    from safetensors.torch import load_file, save_file
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    source = tmp_path / "neox"
    GPTNeoXForCausalLM(cfg).save_pretrained(source)
    tensors = load_file(source / "model.safetensors")
    if "lm_head.weight" in tensors:  # store it under the older name, as released checkpoints do
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
        save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    streamed = quantize_streaming(source, "w8-weight", tmp_path / "stream")
    loaded = lowbit.load_model(source)
    lowbit.quantize(loaded, "w8-weight")
    want, got = read_weights(lowbit.save(loaded, tmp_path / "memory")), read_weights(streamed)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
