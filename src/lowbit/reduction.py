"""Reductions over calibration batches in one fixed order, whatever the number of processes.

Per-batch partial results are combined along the aligned binary tree over batch indices: node
``(start, size)`` (size a power of two, start a multiple of it) is ``combine(left half, right
half)``, and the total folds the maximal aligned blocks of ``count`` left to right. Every process
handles whole aligned blocks ("units") of that tree, so the nodes it computes are exactly the
ones a single process computes; gathering them and finishing the tree gives bit-identical floats
under torchrun and in one process (float addition is not associative, so any other split would
not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from . import distributed

T = TypeVar("T")
Node = tuple[int, int]  # (start, size)
Combine = Callable[[T, T, Node], T]


def _maximal_blocks(count: int) -> list[Node]:
    """The aligned blocks a left-to-right binary counter over ``count`` leaves ends with."""
    blocks, start = [], 0
    for bit in reversed(range(count.bit_length())):
        if count & (1 << bit):
            blocks.append((start, 1 << bit))
            start += 1 << bit
    return blocks


def units(count: int, parts: int) -> list[Node]:
    """Aligned tree nodes covering ``range(count)`` in order, small enough to deal ``parts``
    processes about equal shares (at least four units per part where the data allows)."""
    target = max(1, count // (4 * parts))
    size_cap = 1 << (target.bit_length() - 1)
    out: list[Node] = []
    for start, size in _maximal_blocks(count):
        step = min(size, size_cap)
        out += [(s, step) for s in range(start, start + size, step)]
    return out


def owned(count: int, rank: int | None = None, world: int | None = None) -> list[int]:
    """The batch indices one process handles: a contiguous run of whole units, balanced by
    batch count; rank 0 always starts at batch 0. All of them without torchrun."""
    rank = distributed.rank() if rank is None else rank
    world = distributed.world() if world is None else world
    if world == 1:
        return list(range(count))
    pieces = units(count, world)
    owner = [0] + [min(world - 1, (2 * s + n) * world // (2 * count)) for s, n in pieces[1:]]  # by midpoint
    mine = [piece for piece, r in zip(pieces, owner, strict=True) if r == rank]
    return [i for s, n in mine for i in range(s, s + n)]


class TreeReducer(Generic[T]):
    """Streams per-batch values (in increasing batch index) into the aligned tree, keeping only
    the O(log n) pending nodes, like a binary counter."""

    def __init__(self, combine: Combine) -> None:
        self.combine = combine
        self.stack: list[tuple[Node, T]] = []

    def push(self, index: int, value: T) -> None:
        """Add batch ``index``'s value; merges every completed pair of sibling nodes."""
        if self.stack and self.stack[-1][0][0] + self.stack[-1][0][1] > index:
            raise ValueError(f"TreeReducer: batch {index} came after a later one")
        self.stack.append(((index, 1), value))
        while len(self.stack) >= 2:
            (left, a), (right, b) = self.stack[-2], self.stack[-1]
            (s1, n1), (s2, n2) = left, right
            if n1 != n2 or s1 + n1 != s2 or s1 % (2 * n1):
                break
            node = (s1, 2 * n1)
            self.stack[-2:] = [(node, self.combine(a, b, node))]

    def nodes(self) -> dict[Node, T]:
        return dict(self.stack)


def finish(nodes: dict[Node, T], count: int, combine: Combine) -> T:
    """The total over ``range(count)`` from disjoint aligned nodes covering it."""

    def node(start: int, size: int) -> T:
        if (start, size) in nodes:
            return nodes[(start, size)]
        if size == 1:
            raise RuntimeError(f"ordered reduction: batch {start} was computed by no process")
        half = size // 2
        return combine(node(start, half), node(start + half, half), (start, size))

    total: T | None = None
    for start, size in _maximal_blocks(count):
        value = node(start, size)
        total = value if total is None else combine(total, value, (0, start + size))
    if total is None:
        raise ValueError("ordered reduction over no batches")
    return total


def gathered(reducers: dict[str, TreeReducer], count: int) -> dict[str, T]:
    """Every process's nodes, per key, merged and finished (on every process)."""
    local = {key: reducer.nodes() for key, reducer in reducers.items()}
    if distributed.world() > 1:
        parts = distributed.all_objects(local)
        merged: dict[str, dict[Node, T]] = {key: {} for key in reducers}
        for part in parts:
            for key, found in part.items():
                merged[key].update(found)
    else:
        merged = local
    return {key: finish(merged[key], count, reducers[key].combine) for key in reducers}
