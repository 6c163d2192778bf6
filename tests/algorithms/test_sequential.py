"""The block-by-block runner on tiny Llama and BERT models built in the test."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.nn import QLinear
from lowbit.recipe import Recipe
from lowbit.sequential import capture_inputs, find_blocks


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a few large hidden channels, as trained LLMs have (salient inputs)
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 12
            layer.post_attention_layernorm.weight[:4] *= 12
    return model


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return BertModel(cfg).eval()


def batches(vocab, n=6, length=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (2, length), generator=gen)} for _ in range(n)]


def test_blocks_are_found_from_the_module_tree():
    assert find_blocks(tiny_llama())[0] == "model.layers"
    assert find_blocks(tiny_bert())[0] == "encoder.layer"
    assert find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None


def test_find_blocks_skips_layer_lists_and_lists_inside_blocks():
    """Parallel layers in a ModuleList are no blocks; a mixture of experts' expert list (longer
    than the block list here) sits inside the blocks, which stay the block list."""
    from torch import nn

    heads = nn.Module()
    heads.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
    assert find_blocks(heads) is None

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)

    class MoEBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(Expert() for _ in range(6))

    model = nn.Module()
    model.layers = nn.ModuleList(MoEBlock() for _ in range(2))
    assert find_blocks(model)[0] == "layers"


def test_capture_records_block_zero_inputs_once_per_batch():
    model = tiny_llama()
    calib = batches(128)
    calls = capture_inputs(model, "model.layers", calib)
    assert len(calls) == len(calib)
    hidden = calls[0][0][0] if calls[0][0] else calls[0][1]["hidden_states"]
    assert hidden.shape == (2, 24, 64)
    assert torch.allclose(hidden, model.model.embed_tokens(calib[0]["input_ids"]))
    assert len(model.model.layers) == 3  # the block list is restored


def test_capture_stops_before_the_rest_of_the_model():
    """Recording block 0's inputs ends the forward: no block and not the head run during capture."""
    model = tiny_llama()
    ran = []
    handles = [m.register_forward_hook(lambda *a, n=n: ran.append(n)) for n, m in model.named_modules() if n]
    try:
        capture_inputs(model, "model.layers", batches(128, n=2))
    finally:
        for h in handles:
            h.remove()
    assert "model.embed_tokens" in ran
    assert not [n for n in ran if n.startswith("model.layers") or n in ("lm_head", "model.norm")]


def test_layers_reading_one_input_share_one_hessian(monkeypatch):
    """q/k/v read the very same tensor: one product per batch serves the three (float32 products
    summed in float64 agree with float64 products to 1e-5)."""
    from lowbit import calibration
    from lowbit.sequential import block_statistics

    model = tiny_llama()
    blocks_name, blocks = find_blocks(model)
    calib = batches(model.config.vocab_size, n=3)
    calls = dict(enumerate(capture_inputs(model, blocks_name, calib)))
    prefix = f"{blocks_name}.0."
    names = [f"{prefix}self_attn.{p}_proj" for p in "qkv"]
    rule = {"types": ["Linear"], "weight": {"format": "int4"}, "algorithm": "gptq"}
    plan = Recipe.from_dict({"name": "g", "rules": [rule]}).resolve(model)
    counted = []
    rows = calibration._hessian_rows
    monkeypatch.setattr(calibration, "_hessian_rows", lambda m, x: counted.append(1) or rows(m, x))
    stats, _, _ = block_statistics(blocks[0], prefix, {n: {"hessian"} for n in names}, plan, calls, 3, calls[0])
    assert len(counted) == 3  # one product per batch, not one per layer
    q, k, v = (stats[n].hessian for n in names)
    assert torch.equal(q, k) and torch.equal(q, v)
    with torch.no_grad():
        hidden = [call[0][0] if call[0] else call[1]["hidden_states"] for call in calls.values()]
        x = torch.cat([blocks[0].input_layernorm(h).reshape(-1, 64) for h in hidden]).double()
    want = 2 * x.T @ x / x.shape[0]
    assert float((q - want).abs().max() / want.abs().max()) < 1e-5


def _logit_error(model, ref, calib):
    with torch.no_grad():
        return sum(float((model(**b).logits - ref(**b).logits).pow(2).mean()) for b in calib)


@pytest.mark.parametrize("recipe", ["w3-g128", "w4-g128"])
def test_gptq_awq_and_both_beat_rtn_on_a_tiny_llama(recipe):
    calib, held_out = batches(128, 4), batches(128, 3, seed=9)
    ref = tiny_llama()
    errors = {}
    for label, algorithm, options in (
        ("rtn", "rtn", {}),
        ("gptq", "gptq", {}),
        ("awq", "awq", {}),
        ("awq+gptq", "awq", {"gptq": True}),
    ):
        model = tiny_llama()
        spec = {"format": "int3-asym" if recipe == "w3-g128" else "int4-asym", "granularity": "group:32"}
        rule = {"weight": spec, "algorithm": algorithm, "options": options}
        lowbit.quantize(model, Recipe.from_dict({"rules": [rule]}), calib=calib)
        errors[label] = _logit_error(model, ref, held_out)
    assert all(errors[label] < errors["rtn"] for label in ("gptq", "awq", "awq+gptq")), errors


def test_awq_scales_fold_into_rmsnorm_in_pre_norm_blocks_but_not_post_norm():
    calib = batches(128, 4)
    model = tiny_llama()
    awq = Recipe.from_dict(
        {
            "rules": [
                {
                    "weight": {"format": "int4-asym", "granularity": "group:32"},
                    "algorithm": "awq",
                    "options": {"grid": 5},
                }
            ]
        }
    )
    lowbit.quantize(model, awq, calib=calib)
    folded = model.lowbit.folded
    assert "model.layers.0.input_layernorm" in folded and "model.layers.0.post_attention_layernorm" in folded
    assert set(folded["model.layers.0.input_layernorm"]) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.input_smooth is None and layer.self_attn.o_proj.input_smooth is not None

    bert = tiny_bert()
    lowbit.quantize(bert, awq, calib=batches(100, 4))
    assert bert.lowbit.folded == {}  # post-LN: the LayerNorm output also feeds the residual
    assert isinstance(bert.encoder.layer[0].attention.self.query, QLinear)
    assert bert.encoder.layer[0].attention.self.query.input_smooth is not None


def test_sequential_and_single_pass_both_run_and_save(tmp_path):
    calib = batches(128, 4)
    for sequential in (True, False):
        model = tiny_llama()
        lowbit.quantize(model, "w4-g128-gptq", calib=calib, sequential=sequential)
        assert isinstance(model.model.layers[2].mlp.down_proj, QLinear)
    loaded = lowbit.Loaded(
        model, "causal-lm", "tiny", meta={"type": "hf", "kind": "causal-lm", "auto_class": "AutoModelForCausalLM"}
    )
    lowbit.save(loaded, tmp_path / "q")
    back = lowbit.load(tmp_path / "q")
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_outliers_and_bias_correction_through_quantize():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(256, 32)
    x[:, 5] *= 50
    ref = net(x)
    recipe = Recipe.from_dict(
        {
            "include_head": True,
            "rules": [
                {
                    "match": "0",
                    "weight": "int8",
                    "activation": "dynamic",
                    "algorithm": "outliers",
                    "options": {"threshold": 20.0},
                },
                {"match": "2", "weight": {"format": "int2-asym", "granularity": "channel"}, "bias_correction": True},
            ],
        }
    )
    lowbit.quantize(net, recipe, calib=[x])
    assert net[0].outlier_index.tolist() == [5]
    with torch.no_grad():
        out, ref = net(x), ref.detach()
    assert float((out - ref).mean(dim=0).abs().max()) < 0.05 * float(ref.abs().mean())  # mean shift removed


def test_block_stages_group_layers_by_shared_input_in_execution_order():
    from lowbit.sequential import block_stages

    model = tiny_llama()
    blocks_name, blocks = find_blocks(model)
    calls = capture_inputs(model, blocks_name, batches(model.config.vocab_size, n=1))
    prefix = f"{blocks_name}.0."
    names = [f"{prefix}{n}" for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)]
    stages = block_stages(blocks[0], prefix, names, calls[0])
    short = [[n[len(prefix) :] for n in stage] for stage in stages]
    assert short == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def test_calibration_samples_always_keep_the_rare_massive_rows():
    from lowbit.calibration import _Collector, finish_statistics
    from lowbit.recipe import ActivationSpec

    layer = torch.nn.Linear(8, 4)
    collector = _Collector(layer, {"samples"}, ActivationSpec(), max_samples=64, seed=0)
    gen = torch.Generator().manual_seed(0)
    for step in range(50):  # 50 batches of 32 rows; one row in the whole stream is huge
        rows = torch.randn(32, 8, generator=gen)
        if step == 17:
            rows[5, 3] = 1000.0
        collector.begin(step)
        collector(layer, (rows,))
        collector.end()
    samples = finish_statistics({"layer": collector}, 50)["layer"].samples
    assert samples.shape[0] == 64 + 2  # the reservoir plus max_samples // 32 peak rows
    assert float(samples.abs().max()) == 1000.0


def _plain_and_asymmetric(module, algorithm: str, record) -> dict[str, float]:
    """Tiny Llamas quantized block by block with ``algorithm`` (int3-asym, groups of 32), plain and
    with ``asymmetric``; every call of ``module.asymmetric_target`` is passed to ``record``.
    Returns each model's logit error against float on held-out batches."""
    calib, held_out = batches(128, 4), batches(128, 3, seed=9)
    ref = tiny_llama()
    original = module.asymmetric_target

    def spy(weight, hessian, cross, damp):
        record(weight, hessian, cross)
        return original(weight, hessian, cross, damp)

    errors = {}
    for label, options in (("plain", {}), ("asymmetric", {"asymmetric": True})):
        model = tiny_llama()
        rule = {
            "weight": {"format": "int3-asym", "granularity": "group:32"},
            "algorithm": algorithm,
            "options": options,
        }
        module.asymmetric_target = spy
        try:
            lowbit.quantize(model, Recipe.from_dict({"rules": [rule]}), calib=calib)
        finally:
            module.asymmetric_target = original
        errors[label] = _logit_error(model, ref, held_out)
    return errors


def test_asymmetric_gptq_collects_float_inputs_beside_the_quantized_ones():
    """Block-by-block GPTQ with ``asymmetric``: layers after the first quantized ones get cross
    statistics against the float model's inputs (equal to the Hessian in block 0's first stage,
    different later); the model is closer to float than plain GPTQ on held-out data."""
    from lowbit.algorithms import gptq as gptq_module

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    errors = _plain_and_asymmetric(gptq_module, "gptq", lambda w, h, c: seen.append((h.clone(), c.clone())))
    assert len(seen) == 7 * 3  # every layer of every block
    h, c = seen[0]  # q_proj of block 0: its inputs are the float model's
    torch.testing.assert_close(c, h, rtol=1e-5, atol=1e-6)
    h, c = seen[len(seen) - 1]  # down_proj of the last block: inputs drifted
    assert not torch.allclose(c, h, rtol=1e-3, atol=1e-4)
    assert errors["asymmetric"] < errors["plain"], errors


def test_asymmetric_awq_targets_the_float_model_through_shared_scales():
    """Block-by-block AWQ with ``asymmetric``: q/k/v (one input) search one shared scale on their
    float-output targets, and the model ends closer to float than plain AWQ on held-out data."""
    from lowbit.algorithms import awq as awq_module

    targets = []
    errors = _plain_and_asymmetric(awq_module, "awq", lambda w, h, c: targets.append(w.shape))
    # every layer once, plus q/k/v and gate/up again for their shared scale search
    assert len(targets) == 3 * (7 + 5), len(targets)
    assert errors["asymmetric"] < errors["plain"], errors


def test_a_run_that_fails_midway_leaves_the_float_model_as_it_was():
    """Block 0 is quantized with AWQ (divisors folded into its norms), then a layer of block 1
    asks for something impossible: the error surfaces, every layer and norm is the float one
    again, and the same model quantizes on a second try."""
    from lowbit.errors import SpecError
    from lowbit.nn.base import QModule

    model, calib = tiny_llama(), batches(128, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    awq = {"weight": {"format": "int4-asym", "granularity": "group:32"}, "algorithm": "awq"}
    bad = {"match": "model.layers.1.mlp.down_proj", "weight": {"format": "int4", "granularity": "group:32"}}
    recipe = Recipe.from_dict({"rules": [{**bad, "algorithm": "hqq"}, awq]})
    with pytest.raises(SpecError, match="asymmetric"):
        lowbit.quantize(model, recipe, calib=calib)
    assert not any(isinstance(m, QModule) for m in model.modules()) and not hasattr(model, "lowbit")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    lowbit.quantize(model, Recipe.from_dict({"rules": [awq]}), calib=calib)
    assert model.lowbit.folded  # the retry folded divisors into norms as a first run would
