"""The ordered reduction behind split calibration: any split of the batches into the processes'
shares gives the same floats, to the bit, as one process summing them all."""

from __future__ import annotations

import pytest
import torch

from lowbit.reduction import TreeReducer, finish, owned, units


def _add(a: torch.Tensor, b: torch.Tensor, node) -> torch.Tensor:
    return a + b


@pytest.mark.parametrize("count", [1, 2, 3, 7, 8, 13, 64, 100, 128, 129])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_shares_cover_every_batch_once_contiguously_and_rank0_starts_at_zero(count, world):
    shares = [owned(count, rank, world) for rank in range(world)]
    flat = [i for share in shares for i in share]
    assert flat == list(range(count))  # disjoint, complete, in rank order
    assert shares[0][0] == 0
    for share in shares:
        assert share == list(range(share[0], share[-1] + 1)) if share else True
    if count >= 8 * world:  # enough units to balance within a unit's size
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 2 * max(n for _, n in units(count, world))


@pytest.mark.parametrize("count", [1, 5, 13, 64, 100])
def test_units_are_aligned_tree_nodes(count):
    for start, size in units(count, 3):
        assert size & (size - 1) == 0 and start % size == 0


@pytest.mark.parametrize("count", [1, 2, 5, 13, 37, 100])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_split_sum_is_bit_identical_to_one_process(count, world):
    gen = torch.Generator().manual_seed(count)
    # values of wildly different magnitude, in float32: any change of summation order shows
    values = [torch.randn(16, generator=gen) * 10.0 ** torch.randint(-6, 7, (16,), generator=gen) for _ in range(count)]
    one = TreeReducer(_add)
    for i, v in enumerate(values):
        one.push(i, v)
    reference = finish(one.nodes(), count, _add)
    nodes = {}
    for rank in range(world):
        part = TreeReducer(_add)
        for i in owned(count, rank, world):
            part.push(i, values[i])
        nodes.update(part.nodes())
    assert torch.equal(finish(nodes, count, _add), reference)
    naive = sum(values[1:], values[0])
    assert torch.allclose(reference, naive, rtol=1e-5, atol=1e-3 * float(naive.abs().max()))


def test_missing_batch_and_out_of_order_pushes_are_errors():
    reducer = TreeReducer(_add)
    reducer.push(0, torch.ones(1))
    reducer.push(2, torch.ones(1))
    with pytest.raises(RuntimeError, match="batch 1"):
        finish(reducer.nodes(), 3, _add)
    with pytest.raises(ValueError, match="came after"):
        reducer.push(1, torch.ones(1))
