"""torchrun with 2 CPU processes (gloo): evaluation and sensitivity are split across ranks and
the gathered result equals the single-process one; only rank 0 prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch


def _env(tmp_path) -> dict:
    # a fresh sensitivity cache per run, so both runs really measure; the built kernels stay shared
    from lowbit.models import cache_dir

    kernels = os.environ.get("LOWBIT_KERNEL_CACHE") or str(cache_dir() / "kernels")
    cache = str(tmp_path / f"cache-{os.urandom(4).hex()}")
    return {**os.environ, "LOWBIT_CACHE": cache, "LOWBIT_KERNEL_CACHE": kernels, "OMP_NUM_THREADS": "1"}


def _single(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, env=_env(tmp_path), check=False
    )


def _torchrun(tmp_path, *args: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=600, env=_env(tmp_path), check=False
    )


def _script_once_and_on_two_ranks(tmp_path, source: str) -> tuple[dict, dict]:
    """Run a Python script in one process and under torchrun with 2 ranks; the JSON each printed."""
    script = tmp_path / "script.py"
    script.write_text(source)
    one = _single(tmp_path, str(script))
    two = _torchrun(tmp_path, str(script))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    return json.loads(one.stdout), json.loads(two.stdout)


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    import lowbit

    path = tmp_path_factory.mktemp("bert")
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "ship", "sea", "big", "red", "fox"]
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, architectures=["BertModel"],
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    loaded = lowbit.load_model(str(path))
    lowbit.quantize(loaded, "w4-g128")
    return path, lowbit.save(loaded, tmp_path_factory.mktemp("ck") / "q")


def test_eval_embedding_split_over_two_ranks_equals_one(bert_checkpoint, tmp_path):
    _, ckpt = bert_checkpoint
    text = tmp_path / "sentences.txt"
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "big", "red", "fox", "sea", "ship"]
    text.write_text("\n".join(" ".join(words[(i * k) % 12] for k in range(3 + i % 7)) + "." for i in range(96)))
    args = ["-m", "lowbit", "eval", str(ckpt), "--task", "embedding", "--data", str(text), "--json"]
    one = _single(tmp_path, *args)
    two = _torchrun(tmp_path, *args)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert two.stdout.count('"task"') == 1  # only rank 0 printed
    metrics = [json.loads(run.stdout)["metrics"] for run in (one, two)]
    for m in metrics:
        m.pop("seconds", None)
    assert metrics[0] == metrics[1] and metrics[0]["sentences"] > 16


def test_sensitivity_split_over_two_ranks_equals_one(bert_checkpoint, tmp_path):
    model, _ = bert_checkpoint
    args = ["-m", "lowbit", "sensitivity", str(model), "--candidates", "w8-weight,w4-g128", "--samples", "2", "--json"]
    one = _single(tmp_path, *args)
    two = _torchrun(tmp_path, *args)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert _untimed(json.loads(two.stdout)["layers"]) == _untimed(json.loads(one.stdout)["layers"])


def _untimed(layers: dict) -> dict:
    """The table without its latency estimates (timings differ from run to run)."""
    out = {}
    for name, entry in layers.items():
        assert entry.pop("float_latency_ms") > 0
        for option in entry["options"].values():
            assert option.pop("latency_ms") > 0
        out[name] = entry
    return out


PERPLEXITY = textwrap.dedent(
    """
    import json, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from lowbit import distributed
    from lowbit.evaluation.perplexity import perplexity_of_ids

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (301,), generator=torch.Generator().manual_seed(1))
    result = perplexity_of_ids(model, ids, seq_len=32)
    if distributed.is_main():
        print(json.dumps({"nll": result["nll_per_token"], "tokens": result["tokens"], "world": distributed.world()}))
    """
)


def test_perplexity_windows_split_over_two_ranks_equal_one(tmp_path):
    a, b = _script_once_and_on_two_ranks(tmp_path, PERPLEXITY)
    assert (a["world"], b["world"]) == (1, 2)
    assert a["tokens"] == b["tokens"] > 250
    assert a["nll"] == b["nll"]  # per-window sums gathered and added in window order


QUANTIZE = textwrap.dedent(
    """
    import hashlib, json, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import lowbit
    from lowbit import distributed
    from lowbit.formats import Int
    from lowbit.granularity import PerChannel
    from lowbit.ranges import MovingMinMax, Percentile
    from lowbit.recipe import ActivationSpec, LayerScheme, Recipe, Rule
    from lowbit.spec import QuantSpec

    def model():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(config).eval()

    def custom(rng):
        act = ActivationSpec("static", Int(8, symmetric=False), range=rng)
        scheme = LayerScheme(QuantSpec(Int(8), PerChannel()), act, "rtn", {})
        return Recipe(name="custom", rules=(Rule(scheme, types=("Linear",)),))

    gen = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 64, (1, 24), generator=gen)} for _ in range(7)]
    recipes = {"gptq": "w4-g128-gptq", "awq": "w4-g128-awq", "w8a8-static": "w8a8-static",
               "percentile": custom(Percentile(99.0)), "moving": custom(MovingMinMax(0.9))}
    out = {"world": distributed.world()}
    for key, recipe in recipes.items():
        for sequential in (True, False):
            m = model()
            lowbit.quantize(m, recipe, calib, sequential=sequential)
            digest = hashlib.sha256()
            for name, value in sorted(m.state_dict().items()):
                digest.update(name.encode())
                digest.update(value.detach().contiguous().view(torch.uint8).numpy().tobytes())
            out[f"{key}-{'seq' if sequential else 'flat'}"] = digest.hexdigest()
    if distributed.is_main():
        print(json.dumps(out))
    """
)


def test_calibration_split_over_two_ranks_quantizes_bit_identically(tmp_path):
    """GPTQ Hessians, AWQ and SmoothQuant samples, static ranges (min-max, percentile samples,
    moving average): each rank calibrates on its share of 7 batches, the gathered statistics
    equal one process's, and so do the quantized weights, to the bit."""
    a, b = _script_once_and_on_two_ranks(tmp_path, QUANTIZE)
    assert (a.pop("world"), b.pop("world")) == (1, 2)
    assert len(a) == 10
    assert a == b


def test_cli_quantize_under_torchrun_writes_the_single_process_checkpoint(bert_checkpoint, tmp_path):
    import hashlib

    model, _ = bert_checkpoint
    digests = []
    for run, name in ((_single, "one"), (_torchrun, "two")):
        out = tmp_path / name
        args = [
            "-m",
            "lowbit",
            "quantize",
            str(model),
            "-r",
            "w4-g128-gptq",
            "-o",
            str(out),
            "--samples",
            "40",
        ]  # 3 batches
        result = run(tmp_path, *args, "--json")
        assert result.returncode == 0, result.stderr
        assert result.stdout.count('"recipe"') == 1  # only rank 0 printed
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())})
    assert digests[0] == digests[1] and "model.safetensors" in digests[0]
    assert not list(tmp_path.glob(".*.journal"))
