"""Fuzz the loaders that read untrusted files (hypothesis, bounded in time): a checkpoint with
random bytes flipped, cut or rewritten, random lowbit.json edits, random recipes. The only
exception allowed out is a LowbitError; a checkpoint that still loads must still run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.recipe import Recipe, read_recipe_file

# CI runs a short, reproducible campaign; LOWBIT_FUZZ_EXAMPLES=2000 runs a longer random one.
_LONG = int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=_LONG or 40,
    derandomize=not _LONG,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = _model()
    recipe = Recipe.from_dict({"rules": [{"weight": {"format": "int4", "granularity": "group:32"}}]})
    lowbit.quantize(model, recipe)
    return lowbit.save(model, tmp_path_factory.mktemp("ck") / "q")


def _load_and_run(path: Path) -> None:
    try:
        loaded = lowbit.load(path, module=_model())
    except LowbitError:
        return
    out = loaded.model(torch.randn(2, 64))
    assert out.shape == (2, 4)


def _copy(checkpoint: Path, tmp: Path) -> Path:
    target = tmp / "fuzzed"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(checkpoint, target)
    return target


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8), cut=st.booleans())
def test_corrupted_weight_bytes_never_crash(checkpoint, tmp_path, edits, cut):
    path = _copy(checkpoint, tmp_path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for offset, value in edits:
        data[offset % len(data)] = value
    if cut:
        data = data[: edits[0][0] % len(data)]
    weights.write_bytes(bytes(data))
    _load_and_run(path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(obj, prefix=()):
    """Every (path) into a JSON object, so a fuzz step can replace any node."""
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from _paths(value, (*prefix, index))


def _replace(obj, path, value):
    if not path:
        return value
    obj[path[0]] = _replace(obj[path[0]], path[1:], value)
    return obj


@FUZZ
@given(data=st.data())
def test_edited_manifests_never_crash(checkpoint, tmp_path, data):
    path = _copy(checkpoint, tmp_path)
    manifest = json.loads((path / "lowbit.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(manifest))
        where = data.draw(st.sampled_from(paths))
        manifest = _replace(manifest, where, data.draw(JSON_VALUES))
    (path / "lowbit.json").write_text(json.dumps(manifest))
    _load_and_run(path)


RECIPE_KEYS = st.sampled_from(
    ["rules", "name", "weight", "activation", "format", "granularity", "types", "match", "algorithm", "options",
     "skip", "sparsity", "range", "scale_dtype", "mode", "base", "bias_correction", "pattern"]
)  # fmt: skip
RECIPE_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 300)
    | st.floats(allow_nan=True)
    | st.sampled_from(
        ["int4", "int8", "nf4", "group:0", "group:128", "channel", "gptq", "Linear", "x", "fp8", "", "*"]
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(RECIPE_KEYS, inner, max_size=4),
    max_leaves=10,
)


@FUZZ
@given(recipe=st.dictionaries(RECIPE_KEYS, RECIPE_VALUES, max_size=4))
def test_random_recipes_never_crash(recipe):
    try:
        parsed = Recipe.from_dict(recipe)
        model = _model()
        lowbit.quantize(model, parsed, calib=[torch.randn(4, 64)])
    except LowbitError:
        return
    assert model(torch.randn(2, 64)).shape == (2, 4)


@FUZZ
@given(content=st.text(max_size=200).map(str.encode) | st.binary(max_size=200))
def test_random_recipe_files_never_crash(tmp_path, content):
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"r{suffix}"
        path.write_bytes(content)
        with contextlib.suppress(LowbitError):
            read_recipe_file(path)
