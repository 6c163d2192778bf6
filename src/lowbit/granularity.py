"""Granularity: which elements share one scale (and zero point).

Each granularity views a tensor as *blocks*: 2-D matrices whose rows are the quantization
groups. Range estimators reduce each row to one value; ``assemble`` puts the per-row
values back into the compact parameter tensor, and ``expand`` broadcasts that tensor over
the original shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import SpecError

Rows = torch.Tensor | tuple[torch.Tensor, ...]


def _as_tuple(value: Rows) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


class _Granularity:
    """Shared reduce(): apply a per-row function to every block and assemble the results."""

    def reduce(self, x: torch.Tensor, fn: Callable[[torch.Tensor], Rows]) -> Rows:
        """Apply ``fn`` (rows of a block -> one value per row) and return parameter-shaped output."""
        parts = [_as_tuple(fn(block)) for block in self.blocks(x)]  # type: ignore[attr-defined]
        out = tuple(
            self.assemble([p[i] for p in parts], x.shape)  # type: ignore[attr-defined]
            for i in range(len(parts[0]))
        )
        return out if len(out) > 1 else out[0]


@dataclass(frozen=True)
class PerTensor(_Granularity):
    """One scale for the whole tensor."""

    name: ClassVar[str] = "tensor"

    def blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x.reshape(1, -1)]

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return (1,)

    def assemble(self, parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        return parts[0].reshape(1)

    def expand(self, params: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return params.reshape([1] * len(shape)) if len(shape) else params.reshape(())


@dataclass(frozen=True)
class PerChannel(_Granularity):
    """One scale per index along ``axis`` (axis 0 = output channels of a weight)."""

    axis: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise SpecError(f"PerChannel: axis={self.axis!r} must be an integer")

    @property
    def name(self) -> str:
        return "channel" if self.axis == 0 else f"channel:{self.axis}"

    def _axis(self, shape: torch.Size) -> int:
        ndim = len(shape)
        if not -ndim <= self.axis < ndim:
            raise SpecError(
                f"PerChannel(axis={self.axis}) does not fit a tensor of shape {tuple(shape)}; "
                f"use an axis in [{-ndim}, {ndim - 1}]"
            )
        return self.axis % ndim

    def blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        axis = self._axis(x.shape)
        rest = math.prod(n for i, n in enumerate(x.shape) if i != axis)
        return [x.movedim(axis, 0).reshape(x.shape[axis], rest)]

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return (shape[self._axis(shape)],)

    def assemble(self, parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        return parts[0].reshape(self.param_shape(shape))

    def expand(self, params: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        axis = self._axis(shape)
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return params.reshape(view)


@dataclass(frozen=True)
class PerToken(_Granularity):
    """One scale per row of the last dimension (per token of an activation [..., hidden])."""

    name: ClassVar[str] = "token"

    def blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.dim() == 0:
            return [x.reshape(1, 1)]
        return [x.reshape(math.prod(x.shape[:-1]), x.shape[-1])]

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return tuple(shape[:-1]) if len(shape) > 1 else (1,)

    def assemble(self, parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        return parts[0].reshape(self.param_shape(shape))

    def expand(self, params: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return params.reshape(*self.param_shape(shape), 1) if len(shape) > 1 else params.reshape(-1)


@dataclass(frozen=True)
class PerGroup(_Granularity):
    """Groups of ``size`` consecutive elements along the input dimension.

    The tensor is viewed as [shape[0], rest] (a Linear or Conv weight as [out, in*kh*kw]);
    when ``size`` does not divide ``rest`` the last group of each row is a smaller remainder.
    """

    size: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise SpecError(f"PerGroup: size={self.size!r} must be a positive integer (e.g. 32, 64, 128)")

    @property
    def name(self) -> str:
        return f"group:{self.size}"

    @staticmethod
    def _rows_cols(shape: torch.Size) -> tuple[int, int]:
        """The [rows, input] matrix view: 0-D and 1-D tensors are a single row."""
        if len(shape) < 2:
            return 1, math.prod(shape)
        return shape[0], math.prod(shape[1:])

    def num_groups(self, shape: torch.Size) -> int:
        return math.ceil(self._rows_cols(shape)[1] / self.size)

    def blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        rows, cols = self._rows_cols(x.shape)
        view = x.reshape(rows, cols)
        full = (cols // self.size) * self.size
        out = []
        if full:
            out.append(view[:, :full].reshape(-1, self.size))
        if cols - full:
            out.append(view[:, full:])
        return out

    def param_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return (self._rows_cols(shape)[0], self.num_groups(shape))

    def assemble(self, parts: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
        rows, _ = self._rows_cols(shape)
        return torch.cat([p.reshape(rows, -1) for p in parts], dim=1)

    def expand(self, params: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        rows, cols = self._rows_cols(shape)
        wide = params.reshape(rows, -1).repeat_interleave(self.size, dim=1)[:, :cols]
        return wide.reshape(shape)


Granularity = PerTensor | PerChannel | PerToken | PerGroup


def granularity_to_dict(gran: Granularity) -> dict[str, Any]:
    """Plain-JSON description, inverse of ``granularity_from_dict``."""
    if isinstance(gran, PerChannel):
        return {"type": "channel", "axis": gran.axis}
    if isinstance(gran, PerGroup):
        return {"type": "group", "size": gran.size}
    return {"type": gran.name}


def granularity_from_dict(data: dict[str, Any]) -> Granularity:
    """Build a granularity from ``granularity_to_dict`` output; unknown keys are errors."""
    if not isinstance(data, dict) or "type" not in data:
        raise SpecError(f"granularity must be a mapping with a 'type' key, got {data!r}")
    kind, rest = data["type"], {k: v for k, v in data.items() if k != "type"}
    allowed = {"tensor": set(), "token": set(), "channel": {"axis"}, "group": {"size"}}
    if kind not in allowed:
        raise SpecError(f"granularity type {kind!r} is unknown; allowed: {sorted(allowed)}")
    unknown = sorted(set(rest) - allowed[kind])
    if unknown:
        raise SpecError(f"granularity {kind!r}: unknown key(s) {unknown}")
    cls = {"tensor": PerTensor, "token": PerToken, "channel": PerChannel, "group": PerGroup}[kind]
    return cls(**rest)


def parse_granularity(text: str) -> Granularity:
    """Parse 'tensor', 'channel', 'channel:1', 'token', 'group:128' or 'g128'."""
    name = text.strip().lower()
    try:
        if name in ("tensor", "per-tensor"):
            return PerTensor()
        if name in ("token", "per-token"):
            return PerToken()
        if name in ("channel", "per-channel"):
            return PerChannel()
        if name.startswith("channel:"):
            return PerChannel(int(name.split(":", 1)[1]))
        if name.startswith("group:"):
            return PerGroup(int(name.split(":", 1)[1]))
        if name.startswith("g") and name[1:].isdigit():
            return PerGroup(int(name[1:]))
    except SpecError:
        raise
    except ValueError:
        pass
    raise SpecError(f"granularity {text!r} is not understood; use tensor, channel[:AXIS], token or group:SIZE")
