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
_FUNCTIONS: dict[tuple[str, str], Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {}  # (op, name) -> fn
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
        _FUNCTIONS[(op, name)] = fn
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


@torch.compiler.assume_constant_result
def _choice_while_tracing(op: str, module: nn.Module, dtype: torch.dtype, dim: int) -> str:
    """``select``'s answer for a CPU input of this dtype and number of dimensions (a one-element
    probe), taken by torch.compile as a constant: tracing ``select`` itself guarded every compiled
    call on the registry, the environment and each kernel's checks (about 450 guards on MiniLM)."""
    return select(op, module, torch.zeros((1,) * dim, dtype=dtype)).name


def _kernel_fn(op: str, module: nn.Module, x: torch.Tensor) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """The selected kernel's function. While torch.compile traces a non-empty CPU input, the choice
    is made once and kept: CPU kernels' checks read only the input's dtype, device and number of
    dimensions besides the module. (Empty inputs, whose sizes torch.compile never treats as
    dynamic, and CUDA kernels, which check their first real call against the reference, are
    selected as in eager.)"""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and not _statically_empty(x):
        return _FUNCTIONS[(op, _choice_while_tracing(op, module, x.dtype, x.dim()))]
    return select(op, module, x).fn


def _statically_empty(x: torch.Tensor) -> bool:
    return any(type(d) is int and d == 0 for d in x.shape)


def run(op: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dispatch ``op`` for ``module`` on input ``x``. Outlier input channels (``set_outliers``)
    are split off here for every kernel: the kernel sees them zeroed, a float matmul adds them."""
    index = getattr(module, "outlier_index", None)
    if index is None or op != "linear":
        return _kernel_fn(op, module, x)(module, x)
    main = x.clone()
    main[..., index] = 0.0
    y = _kernel_fn(op, module, main)(module, main)
    return y + torch.nn.functional.linear(x[..., index], module.outlier_weight.to(x.dtype))
