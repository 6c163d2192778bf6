"""Granularities: parameter shapes, blocks/assemble/expand consistency, remainder groups."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import SpecError
from lowbit.granularity import (
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    granularity_from_dict,
    granularity_to_dict,
    parse_granularity,
)


def _absmax(gran, x):
    return gran.reduce(x, lambda r: r.abs().amax(dim=1))


@pytest.mark.parametrize(
    "gran, shape, pshape",
    [
        (PerTensor(), (6, 10), (1,)),
        (PerChannel(0), (6, 10), (6,)),
        (PerChannel(1), (6, 10), (10,)),
        (PerChannel(-1), (2, 3, 4), (4,)),
        (PerToken(), (2, 3, 8), (2, 3)),
        (PerGroup(4), (6, 10), (6, 3)),
        (PerGroup(5), (6, 10), (6, 2)),
        (PerGroup(4), (3, 2, 5), (3, 3)),
        (PerGroup(3), (7,), (1, 3)),
    ],
)
def test_param_shapes_and_expand(gran, shape, pshape):
    x = torch.randn(shape)
    amax = _absmax(gran, x)
    assert tuple(amax.shape) == pshape == tuple(gran.param_shape(x.shape))
    full = gran.expand(amax, x.shape).expand(x.shape)
    # Every element is bounded by its own group's absmax, and the bound is attained per group.
    assert torch.all(x.abs() <= full)
    assert torch.equal(_absmax(gran, torch.where(x.abs() == full, x, torch.zeros_like(x))), amax)


def test_remainder_group_is_its_own_group():
    x = torch.zeros(2, 10)
    x[:, 8:] = 5.0  # the 2-element remainder group of size-4 grouping
    x[:, 0] = 1.0
    amax = _absmax(PerGroup(4), x)
    assert amax.tolist() == [[1.0, 0.0, 5.0], [1.0, 0.0, 5.0]]


def test_bad_fields():
    with pytest.raises(SpecError, match="size"):
        PerGroup(0)
    with pytest.raises(SpecError, match="size"):
        PerGroup(-3)
    with pytest.raises(SpecError, match="axis"):
        PerChannel(2).param_shape(torch.Size([3, 4]))
    with pytest.raises(SpecError, match="not understood"):
        parse_granularity("rows")
    with pytest.raises(SpecError, match="unknown key"):
        granularity_from_dict({"type": "group", "size": 4, "axis": 1})


@pytest.mark.parametrize("gran", [PerTensor(), PerToken(), PerChannel(1), PerGroup(64)])
def test_round_trips(gran):
    assert granularity_from_dict(granularity_to_dict(gran)) == gran
    assert parse_granularity(gran.name) == gran
    assert parse_granularity("g128") == PerGroup(128)
