"""lowbit.runtime.compile: the compiled quantized model gives the eager model's outputs."""

from __future__ import annotations

import torch

import lowbit
from lowbit.runtime import compile as lowbit_compile
from lowbit.runtime import quantized_layers


def test_compiled_int8_dynamic_matches_eager():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=64)).eval()  # fmt: skip
    lowbit.quantize(model, "int8-dynamic-rtn")
    assert quantized_layers(model) > 0
    batch = {"input_ids": torch.randint(0, 60, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    with torch.inference_mode():
        eager = model(**batch).last_hidden_state
        compiled = lowbit_compile(model, batch)
        for length in (24, 17):  # a second length runs without error (dynamic shapes)
            part = {k: v[:, :length] for k, v in batch.items()}
            got = compiled(**part).last_hidden_state
            want = model(**part).last_hidden_state
            # the same integer kernels; Inductor may reorder float ops around them
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert torch.allclose(eager, model(**batch).last_hidden_state)


def test_two_compiled_models_of_one_class_keep_their_own_graphs():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    models = []
    for seed, recipe in ((0, "int8-dynamic-rtn"), (1, "w4-g128")):
        torch.manual_seed(seed)
        model = BertModel(cfg).eval()
        lowbit.quantize(model, recipe)
        models.append(model)
    batch = {"input_ids": torch.randint(0, 60, (2, 20)), "attention_mask": torch.ones(2, 20, dtype=torch.long)}
    with torch.inference_mode():
        compiled = [lowbit_compile(m, batch) for m in models]
        for model, fast in zip(models, compiled, strict=True):
            want = model(**batch).last_hidden_state
            got = fast(**batch).last_hidden_state
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_compiled_decoding_generates_the_eager_tokens():
    """A quantized causal LM under lowbit.runtime.compile decodes with a static cache and a compiled
    step (transformers' auto-compile, switched on for CPU) and greedy-decodes the eager tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.evaluation.speed import decode_speed

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    lowbit.quantize(model, "w4-g128")
    prompt = torch.randint(0, 96, (1, 7))
    gen = {"do_sample": False, "max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0}
    with torch.inference_mode():
        eager = model.generate(prompt, **gen)
        lowbit_compile(model)
        assert model.generation_config.cache_implementation == "static"
        compiled = model.generate(prompt, **gen)
    assert torch.equal(compiled, eager)
    assert hasattr(model, "_compiled_call")  # generate really took the compiled decode step
    speed = decode_speed(model, prompt, 4)
    assert speed["decode_tokens_per_s"] > 0 and speed["new_tokens"] == 4
