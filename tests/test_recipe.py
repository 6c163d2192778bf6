"""Recipes: presets, strict JSON/YAML round trips, rule resolution."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lowbit.errors import SpecError, UnsupportedError
from lowbit.presets import describe_presets, get_preset
from lowbit.recipe import Recipe, read_recipe_file, resolve_recipe

STABLE = [
    "int8-dynamic",
    "w8a8-static",
    "w8-weight",
    "w4-g128",
    "nf4-g64",
    "fp8",
    "fp16",
    "bf16",
    "binary",
    "ternary",
    "log2-4",
    "vq-2bit",
    "w4a8",
    "w2a8",
    "ternary-a8",
    "binary-a8",
]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(8, 10)


@pytest.mark.parametrize("name", STABLE)
def test_stable_presets_exist_with_one_line_descriptions(name):
    desc = describe_presets()[name]
    assert desc and "\n" not in desc
    recipe = get_preset(name)
    assert recipe.name == name and recipe.rules


@pytest.mark.parametrize("name", STABLE)
def test_json_and_yaml_round_trip(name, tmp_path):
    recipe = get_preset(name)
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert read_recipe_file(path) == recipe


def test_resolution_first_match_wins_and_protects_head_and_embeddings():
    model = Tiny()
    plan = get_preset("w4a8").resolve(model)
    assert set(plan) == {"block.0", "block.2", "conv"}
    recipe = Recipe.from_dict(
        {
            "rules": [
                {"match": "block.2", "skip": True},
                {"match": "block.*", "weight": "int8"},
                {"match": "head", "weight": {"format": "int4", "granularity": "group:4"}},
                {"types": ["Conv2d"], "weight": "nf4"},
            ]
        }
    )
    plan = recipe.resolve(model)
    assert set(plan) == {"block.0", "head", "conv"}  # exact name quantizes the head; embed stays float
    assert plan["block.0"].weight.format.name == "int8"
    assert plan["conv"].weight.format.name == "nf4"
    wide = Recipe.from_dict({"include_head": True, "include_embeddings": True, "rules": [{"weight": "int8"}]})
    assert set(wide.resolve(model)) == {"embed", "block.0", "block.2", "conv", "head"}


def test_base_preset_extension():
    recipe = Recipe.from_dict({"base": "w8-weight", "rules": [{"match": "block.0", "skip": True}]})
    assert recipe.name == "w8-weight" and recipe.head == get_preset("w8-weight").head
    assert set(recipe.resolve(Tiny())) == {"block.2", "conv", "embed", "head"}
    float_head = Recipe.from_dict({"base": "w4-g128", "head": None, "rules": []})
    assert float_head.head is None and set(float_head.resolve(Tiny())) == {"block.0", "block.2", "conv"}


def test_head_scheme_covers_output_head_and_embeddings_unless_a_rule_names_them():
    model = Tiny()
    recipe = get_preset("w4-g128")
    plan = recipe.resolve(model)
    assert set(plan) == {"embed", "block.0", "block.2", "conv", "head"}
    assert plan["embed"] is recipe.head and plan["head"] is recipe.head
    assert plan["embed"].weight.format.name == "int8" and plan["embed"].weight.granularity.name == "channel"
    assert plan["block.0"].weight.format.name == "int4-asym"
    named = Recipe.from_dict({"base": "w4-g128", "rules": [{"match": "head", "skip": True}]})
    assert set(named.resolve(model)) == {"embed", "block.0", "block.2", "conv"}  # the exact rule wins
    assert get_preset("int8-dynamic").head is None  # activation presets keep them float
    again = Recipe.from_dict(json.loads(recipe.to_json()))
    assert again.head == recipe.head
    with pytest.raises(SpecError, match="head: the output head and embeddings take a weight-only"):
        Recipe.from_dict({"rules": [{"weight": "int8"}], "head": {"weight": "int8", "activation": "dynamic"}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"rules": [{"wieght": "int8"}]}, "unknown key 'wieght' \\(did you mean 'weight'\\?\\)"),
        ({"rules": [{"weight": "int9"}]}, "bits=9"),
        ({"rules": [{"weight": {"format": "int4", "granularity": "group:0"}}]}, "size"),
        ({"rules": [{"weight": "int8", "activation": {"mode": "sometimes"}}]}, "activation mode"),
        ({"rules": [{"weight": "int8", "algorithm": "magic"}]}, "algorithm 'magic' is unknown"),
        ({"rules": [{"weight": "int8", "options": {"damp": 0.1}}]}, "unknown key 'damp'"),
        ({"rules": [{"weight": {"format": "int8", "range": {"type": "percentile", "percentile": 101}}}]}, "percentile"),
        ({"rules": []}, "no rules"),
        ({"rules": [{"weight": "int8"}], "colour": "blue"}, "unknown key 'colour'"),
        ({"base": "w4-g12"}, "did you mean 'w4-g128'"),
        ({"rules": [{"activation": "none"}]}, "needs a weight spec"),
    ],
)
def test_bad_recipes_name_the_problem(data, message):
    with pytest.raises(SpecError, match=message):
        Recipe.from_dict(data)


def test_unsupported_layer_type():
    with pytest.raises(UnsupportedError, match="LSTM"):
        Recipe.from_dict({"rules": [{"types": ["LSTM"], "weight": "int8"}]})


def test_resolve_recipe_from_name_file_and_typos(tmp_path):
    assert resolve_recipe("nf4-g64").name == "nf4-g64"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "rules": [{"weight": "int8"}]}))
    assert resolve_recipe(path).name == "mine"
    with pytest.raises(SpecError, match="did you mean 'int8-dynamic'"):
        resolve_recipe("int8-dynamik")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [weight: int8\n")
    with pytest.raises(SpecError, match="cannot parse"):
        resolve_recipe(bad)


def test_output_head_of_hf_model_is_protected():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    plan = get_preset("int8-dynamic").resolve(LlamaForCausalLM(cfg))
    assert "lm_head" not in plan and len(plan) == 7
    plan = get_preset("w8-weight").resolve(LlamaForCausalLM(cfg))
    assert plan["lm_head"] is plan["model.embed_tokens"] and len(plan) == 9


class _OffsetPositions(nn.Embedding):
    """Like OPT's learned positions: an Embedding with a forward of its own."""

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return super().forward(positions + 2)


def test_embeddings_with_their_own_forward_are_left_float_unless_named():
    import lowbit

    model = nn.ModuleDict(
        {"tokens": nn.Embedding(16, 8), "positions": _OffsetPositions(18, 8), "proj": nn.Linear(8, 8)}
    )
    plan = get_preset("w4-g128").resolve(model)  # its head scheme covers embeddings
    assert "tokens" in plan and "positions" not in plan and "proj" in plan
    recipe = Recipe.from_dict({"rules": [{"match": "positions", "weight": {"format": "int8"}}]})
    assert "positions" in recipe.resolve(model)
    with pytest.raises(UnsupportedError, match=r"overrides Embedding\.forward"):
        lowbit.quantize(model, recipe)
