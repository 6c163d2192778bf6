"""Kernel registry: (op, weight layout, activation mode, device) -> the fastest implementation.

Kernels register themselves with the layouts, activation modes and devices they handle, a
priority and an availability check; ``select`` picks the best one that applies and falls
back to the reference path, which handles everything. ``LOWBIT_KERNEL=reference`` forces the
reference path (``LOWBIT_KERNEL=<name>`` forces a named kernel where it applies).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedError


@dataclass(frozen=True)
class Kernel:
    """One implementation of ``op`` for a set of layouts / activation modes / devices."""

    name: str
    op: str
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    layouts: frozenset[str] | None
    acts: frozenset[str] | None
    devices: frozenset[str] | None
    priority: int
    available: Callable[[nn.Module, torch.Tensor], bool]

    def applies(self, layout: str, act: str, device: str, module: nn.Module, x: torch.Tensor) -> bool:
        return (
            (self.layouts is None or layout in self.layouts)
            and (self.acts is None or act in self.acts)
            and (self.devices is None or device in self.devices)
            and self.available(module, x)
        )


_KERNELS: dict[str, list[Kernel]] = {}
_LOADED = False


def register_kernel(
    op: str,
    name: str,
    *,
    layouts: set[str] | None = None,
    acts: set[str] | None = None,
    devices: set[str] | None = None,
    priority: int = 0,
    available: Callable[[nn.Module, torch.Tensor], bool] | None = None,
):
    """Decorator: register ``fn(module, x) -> y`` as a kernel for ``op``."""

    def wrap(fn):
        kernel = Kernel(
            name,
            op,
            fn,
            None if layouts is None else frozenset(layouts),
            None if acts is None else frozenset(acts),
            None if devices is None else frozenset(devices),
            priority,
            available or (lambda module, x: True),
        )
        _KERNELS.setdefault(op, []).append(kernel)
        _KERNELS[op].sort(key=lambda k: -k.priority)
        return fn

    return wrap


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        # Importing registers; each module checks its own availability (device, CPU features).
        from . import cpu_avx2, cpu_int8, cpu_weightonly, cuda, reference  # noqa: F401


def prepacked(module: nn.Module, key: str, build: Callable[[nn.Module], object]) -> object:
    """``build(module)`` computed once per module and weight (a kernel's own weight layout),
    cached on the module and rebuilt if the module's codes change (e.g. after ``.to()``)."""
    cache = module.__dict__.setdefault("_kernel_cache", {})
    stamp = (module.qdata.data_ptr(), module.qdata.device.type)
    entry = cache.get(key)
    if entry is None or entry[0] != stamp:
        entry = (stamp, build(module))
        cache[key] = entry
    return entry[1]


def native_available() -> bool:
    """True when lowbit's compiled AVX-512 kernels are built and loaded on this machine."""
    from .build import load

    return load()


def kernels_for(op: str) -> list[Kernel]:
    _load()
    return list(_KERNELS.get(op, []))


def select(op: str, module: nn.Module, x: torch.Tensor) -> Kernel:
    """The highest-priority kernel that applies to this module and input."""
    _load()
    forced = os.environ.get("LOWBIT_KERNEL", "").strip()
    layout, act, device = module.layout, module.activation.mode, x.device.type
    candidates = _KERNELS.get(op, [])
    if forced:
        for kernel in candidates:
            if kernel.name == forced and kernel.applies(layout, act, device, module, x):
                return kernel
        if forced != "reference" and not any(k.name == forced for k in candidates):
            raise UnsupportedError(
                f"LOWBIT_KERNEL={forced!r} names no {op} kernel; known: {sorted({k.name for k in candidates})}"
            )
        candidates = [k for k in candidates if k.name == "reference"]
    for kernel in candidates:
        if kernel.applies(layout, act, device, module, x):
            return kernel
    raise UnsupportedError(f"no {op} kernel for layout {layout}, activations {act}, device {device}")


def run(op: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dispatch ``op`` for ``module`` on input ``x``. Outlier input channels (``set_outliers``)
    are split off here for every kernel: the kernel sees them zeroed, a float matmul adds them."""
    index = getattr(module, "outlier_index", None)
    if index is None or op != "linear":
        return select(op, module, x).fn(module, x)
    main = x.clone()
    main[..., index] = 0.0
    y = select(op, module, main).fn(module, main)
    return y + torch.nn.functional.linear(x[..., index], module.outlier_weight.to(x.dtype))
