"""Quantization algorithms: pure functions that take a weight (and statistics) and a format.

Each algorithm is registered with the options it accepts and the calibration statistics it
needs (see ``calibration.STAT_KINDS``), so recipes are validated before any work starts and
calibration collects exactly what is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import SpecError
from ..tensor import QTensor


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm: ``fn(weight, spec, stats, *, name, activation, **options)``
    returning a QTensor or a LayerResult."""

    name: str
    fn: Callable
    options: frozenset[str]
    stats: frozenset[str]
    description: str
    option_stats: Callable[[dict], frozenset[str]] | None = None  # fewer stats for some options

    @property
    def needs_data(self) -> bool:
        return bool(self.stats)

    def stats_for(self, options: dict) -> frozenset[str]:
        """The statistics a layer with these options uses (``stats`` unless the algorithm says less)."""
        return self.stats if self.option_stats is None else self.option_stats(options)


@dataclass
class LayerResult:
    """An algorithm's output for one layer: the quantized weight, plus an optional per-input-
    channel divisor ``smooth`` (x / smooth enters the layer; SmoothQuant, AWQ), an optional
    replacement ``bias`` (bias correction) and float outlier channels (outlier split)."""

    qweight: QTensor
    smooth: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    outlier_index: torch.Tensor | None = None  # input channels kept in float ...
    outlier_weight: torch.Tensor | None = None  # ... and their weight columns [out, n]


_REGISTRY: dict[str, Algorithm] = {}


def register_algorithm(
    name: str,
    options: set[str],
    stats: set[str],
    description: str,
    option_stats: Callable[[dict], set[str]] | None = None,
):
    """Decorator registering ``fn`` under ``name``; ``option_stats(options)`` may name a subset of
    ``stats`` that a layer with those options needs."""

    def wrap(fn: Callable) -> Callable:
        narrow = None if option_stats is None else (lambda opts: frozenset(option_stats(opts)) & frozenset(stats))
        _REGISTRY[name] = Algorithm(name, fn, frozenset(options), frozenset(stats), description, narrow)
        return fn

    return wrap


def _load_builtin() -> None:
    from . import awq, gptq, hqq, outliers, rtn, smoothquant  # noqa: F401


def get_algorithm(name: str, where: str = "algorithm") -> Algorithm:
    _load_builtin()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(f"{where}: algorithm {name!r} is unknown{hint}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def algorithm_options(name: str, where: str = "algorithm") -> set[str]:
    return set(get_algorithm(name, where).options)


def algorithm_needs_data(name: str) -> bool:
    return get_algorithm(name).needs_data


def available_algorithms() -> dict[str, str]:
    _load_builtin()
    return {name: algo.description for name, algo in _REGISTRY.items()}


def as_result(value: QTensor | LayerResult) -> LayerResult:
    return value if isinstance(value, LayerResult) else LayerResult(value)
