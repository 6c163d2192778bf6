"""lowbit.runtime.compile: the compiled quantized model gives the eager model's outputs."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import kernels
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
    step = model._compiled_call
    with torch.inference_mode():
        assert torch.equal(model.generate(prompt, **gen), eager)
    # generate deep-copies the compile options: an unequal copy would compile the step on every call
    assert model._compiled_call is step
    speed = decode_speed(model, prompt, 4)
    assert speed["decode_tokens_per_s"] > 0 and speed["new_tokens"] == 4


def test_two_compiled_causal_lms_decode_their_own_tokens():
    """generate's compiled step is one function for every model (nn.Module.__call__): frozen guards
    must still keep each model on its own graphs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    prompt = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(9))
    gen = {"do_sample": False, "max_new_tokens": 5, "min_new_tokens": 5, "pad_token_id": 0}
    models, eager = [], []
    with torch.inference_mode():
        for seed, recipe in ((1, "w8-weight"), (2, "w4-g128")):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).eval()
            lowbit.quantize(model, recipe)
            eager.append(model.generate(prompt, **gen))
            lowbit_compile(model)
            models.append(model)
        assert not torch.equal(eager[0], eager[1])
        for _ in range(2):  # interleaved calls, each model after the other's graphs exist
            for model, want in zip(models, eager, strict=True):
                assert torch.equal(model.generate(prompt, **gen), want)


def test_frozen_guards_skip_the_models_internals_only():
    """The guard filter keeps inputs, globals and the model's own type check; it drops the guards
    on attributes beneath the model (and keeps everything when the model is not among them)."""
    from types import SimpleNamespace

    from lowbit.runtime import freeze_guards

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    other = torch.nn.Sequential(torch.nn.Linear(2, 2))

    def entry(name, value=None, is_global=False):
        return SimpleNamespace(name=name, has_value=value is not None, value=value, is_global=is_global)

    entries = [
        entry("L['self']", model),  # the model's type check
        entry("L['self']._modules['0']._parameters['weight']"),
        entry("L['self'][0]"),
        entry("L['self_other']"),  # a different local whose name starts alike
        entry("L['input'].shape"),
        entry("G['torch'].nn", is_global=True),
        entry("getattr(L['self']._modules['0'], '_traced_cpu-int8').packed"),  # read through getattr
        entry("dict(type(L['self']._modules['0']))"),
        entry("type(L['self'])"),  # the model's own class stays checked
        entry("getattr(L['input'], 'shape')"),
    ]
    keep = freeze_guards(model)
    assert keep(entries) == [True, False, False, True, True, True, False, False, True, True]
    assert freeze_guards(other)(entries) == [True] * len(entries)  # the model is not among them


def test_a_frozen_model_keeps_its_name_and_pickles_as_its_class():
    import copy
    import pickle

    from transformers import BertConfig, BertModel

    from lowbit.runtime import freeze_guards

    model = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32)).eval()  # fmt: skip
    freeze_guards(model)
    freeze_guards(model)  # idempotent: one own class
    own = type(model)
    assert own is not BertModel and own.__bases__ == (BertModel,)
    assert own.__name__ == "BertModel" and isinstance(model, BertModel)
    ids = torch.randint(0, 60, (1, 5))
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert type(clone) is BertModel
        assert torch.equal(clone(ids).last_hidden_state, model(ids).last_hidden_state)


def test_unfrozen_compile_keeps_all_guards():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32)).eval()  # fmt: skip
    lowbit.quantize(model, "w8-weight")
    batch = {"input_ids": torch.randint(0, 60, (1, 9))}
    with torch.inference_mode():
        compiled = lowbit_compile(model, batch, frozen=False)
        assert type(model) is BertModel  # no own class without freezing
        want = model(**batch).last_hidden_state
        assert torch.allclose(compiled(**batch).last_hidden_state, want, rtol=1e-4, atol=1e-5)


def test_compiled_kernel_choice_is_a_constant_and_empty_inputs_still_run():
    """While compiling, the kernel is chosen once per layer and taken as a constant (no guards on
    the registry); inputs of 0, 1 and many rows, and dynamic row counts, give the eager outputs."""
    from torch import nn

    torch.manual_seed(0)
    for recipe in ("int8-dynamic-rtn", "w4-g128"):
        torch._dynamo.reset()
        model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).eval()
        lowbit.quantize(model, recipe)
        with torch.inference_mode():
            compiled = lowbit_compile(model)
            for rows in (5, 0, 1, 40, 7):
                x = torch.randn(rows, 128)
                got, want = compiled(x), model(x)
                assert got.shape == want.shape == (rows, 64)
                assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * (float(want.abs().max()) if rows else 1.0))

        # the traced choice is the eager one
        x = torch.randn(3, 128)
        assert (
            kernels._choice_while_tracing("linear", model[0], x.dtype, x.dim())
            == kernels.select("linear", model[0], x).name
        )


native = pytest.mark.skipif(not kernels.native_available(), reason="needs the AVX-512 VNNI native kernels")


class _Siblings(torch.nn.Module):
    """Five layers reading one input (like q, k, v and gate, up), one reading another, a float head."""

    def __init__(self):
        super().__init__()
        self.branches = torch.nn.ModuleList(torch.nn.Linear(48, n) for n in (40, 40, 24, 40, 40))
        self.mix = torch.nn.Linear(40, 40)
        self.head = torch.nn.Linear(40, 3)

    def forward(self, x):
        a, b, c, d, e = (branch(x) for branch in self.branches)
        y = torch.relu(a * b) + torch.nn.functional.pad(c, (0, 16)) + d - e
        return self.head(self.mix(y))


@native
def _compiled_and_eager(monkeypatch, model, inputs):
    """(compiled output, eager output, calls grouped per compiled graph) for ``inputs`` (a tensor
    or keyword inputs), compiled afresh: with torch's graph caches off, so the pass really runs."""
    from lowbit.kernels import shared_input

    replaced = []
    real = shared_input.group_shared_inputs
    monkeypatch.setattr(shared_input, "group_shared_inputs", lambda graph: replaced.append(real(graph)))

    def run(module):
        return module(**inputs) if isinstance(inputs, dict) else module(inputs)

    with torch.inference_mode(), torch._inductor.config.patch(fx_graph_cache=False):
        with torch._functorch.config.patch(enable_autograd_cache=False):
            torch._dynamo.reset()
            compiled = run(lowbit_compile(model, inputs))
        return compiled, run(model), replaced


@native
def test_layers_reading_one_input_run_as_one_grouped_call(monkeypatch):
    """kernels.shared_input groups the five sibling layers (a triple and a pair, one call each);
    two of them have SmoothQuant divisors of their own (quantized once per divisor), which puts
    them in the pair. Outputs equal the eager model's."""
    torch.manual_seed(0)
    model = _Siblings().eval()
    lowbit.quantize(model, "int8-dynamic-rtn")
    assert quantized_layers(model) == 6
    model.branches[0].set_input_smooth(torch.rand(48) + 0.5)
    model.branches[3].set_input_smooth(torch.rand(48) + 0.5)
    x = torch.randn(2, 9, 48)
    got, want, replaced = _compiled_and_eager(monkeypatch, model, x)
    assert replaced == [5]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@native
def test_static_layers_reading_one_input_run_as_grouped_calls(monkeypatch):
    """w8a8-static (calibrated scales and SmoothQuant divisors, one per layer): the five siblings
    still group, each quantizing x with its own parameters inside the grouped call."""
    torch.manual_seed(0)
    model = _Siblings().eval()
    lowbit.quantize(model, "w8a8-static", calib=[torch.randn(4, 9, 48) for _ in range(2)])
    branches = model.branches
    assert branches[0].input_scale is not None and not torch.equal(branches[0].input_scale, branches[1].input_scale)
    x = torch.randn(2, 9, 48)
    got, want, replaced = _compiled_and_eager(monkeypatch, model, x)
    assert replaced == [5]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_compile_options_equal_their_deep_copy():
    """transformers compares a deep copy of the compile options with the last ones on every
    generate call and compiles again when they differ."""
    import copy

    from lowbit.runtime import compile_options

    model = _Siblings()
    options = compile_options(model)
    assert copy.deepcopy(options) == options
    assert compile_options() == compile_options()


def test_group_sizes():
    from lowbit.kernels.shared_input import _chunks

    assert [len(c) for c in _chunks(list(range(7)))] == [3, 2, 2]
    assert [[len(c) for c in _chunks(list(range(n)))] for n in range(1, 7)] == [[], [2], [3], [2, 2], [3, 2], [3, 3]]


def test_equal_input_parameters_become_one_tensor():
    from lowbit.runtime import share_equal_input_params

    torch.manual_seed(0)
    model = _Siblings().eval()
    lowbit.quantize(model, "int8-dynamic-rtn")
    first, second, third = model.branches[0], model.branches[1], model.branches[2]
    first.set_input_smooth(torch.arange(1.0, 49.0))
    second.set_input_smooth(torch.arange(1.0, 49.0))
    third.set_input_smooth(torch.arange(2.0, 50.0))
    x = torch.randn(3, 48)
    before = [m(x) for m in (first, second, third)]
    assert share_equal_input_params(model) == 1
    assert first.input_smooth is second.input_smooth and third.input_smooth is not first.input_smooth
    assert all(torch.equal(m(x), y) for m, y in zip((first, second, third), before))


@native
def test_minilm_compiled_runs_qkv_as_one_call_and_matches_eager(monkeypatch):
    """Real MiniLM under int8-dynamic (per-layer SmoothQuant divisors), compiled: each block's
    q, k and v become one grouped native call (6 x 3 calls replaced), and sentence embeddings
    stay within cosine 0.999 of the eager model's: the grouped calls are bit-equal to separate
    ones, but Inductor's float ops around them round differently, which can flip an activation
    code, and flips compound over six layers (as in test_minilm_native_matches_reference)."""
    loaded = lowbit.load_model("builtin:minilm")
    lowbit.quantize(loaded, "int8-dynamic")
    texts = ["grouped kernels must agree with the eager model", "a second sentence, longer, with more words in it"]
    batch = dict(loaded.tokenizer(texts, padding=True, return_tensors="pt"))
    compiled, eager, replaced = _compiled_and_eager(monkeypatch, loaded.model, batch)
    compiled, eager = compiled.last_hidden_state, eager.last_hidden_state
    assert replaced == [18]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = [torch.nn.functional.normalize((h * mask).sum(1), dim=-1) for h in (compiled, eager)]
    assert bool(((pooled[0] * pooled[1]).sum(-1) > 0.999).all())
