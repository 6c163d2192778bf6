"""Prefix replay for sensitivity runs: when only a layer of block b differs from the float model,
blocks 0..b-1 compute the same thing on every evaluation batch, so their output is
recorded once and replayed instead of recomputed. On a 30-block LM this removes about half of
the block compute of a sensitivity table; the damages are those of full forward passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..sequential import Call, _no_cache, _with_hidden, capture_inputs, find_blocks


class _Replayed(nn.Module):
    """Stands in for one of the first blocks: returns the recorded output of the last replayed
    block for the batch being run (every stand-in returns the same, so the block after them
    sees exactly its float input). Attributes the model's loop reads from its blocks (e.g. an
    attention type) come from the block it replaces."""

    def __init__(self, block: nn.Module, replay: BlockReplay) -> None:
        super().__init__()
        self._block = [block]  # a list: not registered as a submodule
        self._replay = [replay]

    def forward(self, *args, **kwargs) -> Any:
        return self._replay[0].recorded()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"][0], name)


class BlockReplay:
    """Records, per evaluation batch, the output of blocks 0..b-1 (advanced block by block
    as the sensitivity run moves down the model) and runs the model from block b on."""

    def __init__(self, model: nn.Module, batches: list[Any]) -> None:
        found = find_blocks(model)
        if found is None:
            raise ValueError("the model has no repeated blocks to replay")
        self.model, self.name, self.blocks = model, found[0], found[1]
        parent_name, _, self.attr = self.name.rpartition(".")
        self.parent = model.get_submodule(parent_name) if parent_name else model
        self.calls: list[Call] = capture_inputs(model, self.name, batches)
        self.outputs: list[Any] | None = None  # block (boundary - 1)'s raw output per batch
        self.boundary = 0  # blocks before this index are replayed
        self.current = 0  # the batch being run

    def block_of(self, layer: str) -> int | None:
        """Index of the block that holds the qualified layer name, or None outside the blocks."""
        prefix = self.name + "."
        if not layer.startswith(prefix):
            return None
        return int(layer[len(prefix) :].split(".", 1)[0])

    def advance(self, boundary: int) -> None:
        """Record the outputs of the blocks before ``boundary`` (only forward: a boundary
        below the current one restarts from block 0). The blocks must be as they stay while the
        replay is used (float, or quantized with the operating point's scheme)."""
        if boundary < self.boundary:
            self.outputs, self.boundary = None, 0
        with _no_cache(self.model), torch.inference_mode():
            while self.boundary < boundary:
                block = self.blocks[self.boundary]
                calls = self.calls
                if self.outputs is not None:
                    calls = [_with_hidden(c, _first(o)) for c, o in zip(self.calls, self.outputs, strict=True)]
                self.outputs = [block(*args, **kwargs) for args, kwargs in calls]
                self.boundary += 1

    def recorded(self) -> Any:
        return self.outputs[self.current]

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside: the first ``boundary`` blocks are replayed; set ``current`` before each batch."""
        if self.boundary == 0:
            yield
            return
        stand_ins = [_Replayed(self.blocks[i], self) for i in range(self.boundary)]
        setattr(self.parent, self.attr, nn.ModuleList([*stand_ins, *self.blocks[self.boundary :]]))
        try:
            yield
        finally:
            setattr(self.parent, self.attr, self.blocks)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output
