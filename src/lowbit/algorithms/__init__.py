"""Quantization algorithms: pure functions that take a weight (and statistics) and a format.

Each algorithm is registered with the options it accepts and the calibration statistics it
needs, so recipes can be validated before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import SpecError


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm: ``fn(weight, spec, stats, **options) -> QTensor``."""

    name: str
    fn: Callable
    options: frozenset[str]
    needs_data: bool
    description: str


_REGISTRY: dict[str, Algorithm] = {}


def register_algorithm(name: str, options: set[str], needs_data: bool, description: str):
    """Decorator registering ``fn`` under ``name``."""

    def wrap(fn: Callable) -> Callable:
        _REGISTRY[name] = Algorithm(name, fn, frozenset(options), needs_data, description)
        return fn

    return wrap


def _load_builtin() -> None:
    from . import rtn  # noqa: F401


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
