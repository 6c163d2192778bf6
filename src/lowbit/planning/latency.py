"""Estimated latency of each layer under each candidate: the quantized layer, run by the kernels
lowbit dispatches to, timed on the input shape the layer sees in one planning batch (a causal
LM: one decoded token, where weight-only formats pay off; other models: the batch as it is).

Layers of the same type, weight shape and input shape share one timing. A plan's estimate is
the sum over its layers: it leaves out what stays float (attention, norms, the head) and what
torch.compile would fuse, so it ranks plans rather than predicting a wall time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..calibration import forward_batch


def latency_batch(kind: str, batch: Any) -> Any:
    """The batch the layers are timed on: a causal LM's first token (decoding), else ``batch``."""
    if kind == "causal-lm" and isinstance(batch, dict) and "input_ids" in batch:
        return {k: v[:1, :1] if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in batch.items()}
    return batch


def input_shapes(model: nn.Module, layers: list[str], batch: Any) -> dict[str, tuple[int, ...]]:
    """Shape of the first input each named layer receives on ``batch``."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name in layers:

        def record(module, args, name=name):
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = tuple(args[0].shape)

        hooks.append(model.get_submodule(name).register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            forward_batch(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def time_ms(fn: Callable[[], Any], budget_s: float = 0.03, max_calls: int = 200) -> float:
    """Median milliseconds per call of ``fn`` after two warm-up calls, over about ``budget_s``."""
    with torch.inference_mode():
        fn()
        fn()
        times = []
        spent = 0.0
        while len(times) < 5 or (spent < budget_s and len(times) < max_calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            spent += times[-1]
    return 1e3 * statistics.median(times)


def layer_latencies(
    model: nn.Module,
    layers: list[str],
    candidates: list[str],
    build: Callable[[str, str], nn.Module],
    batch: Any,
) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """(float ms per layer, ms per (layer, candidate)); ``build(layer, candidate)`` gives the
    quantized layer. Layers that get no tensor input on ``batch`` are left out."""
    shapes = input_shapes(model, layers, batch)
    float_ms: dict[str, float] = {}
    quantized_ms: dict[tuple[str, str], float] = {}
    shared: dict[tuple, float] = {}
    gen = torch.Generator().manual_seed(0)
    for name in layers:
        if name not in shapes:
            continue
        layer = model.get_submodule(name)
        x = torch.randn(shapes[name], generator=gen).to(layer.weight.dtype)
        key = (type(layer).__name__, tuple(layer.weight.shape), shapes[name], getattr(layer, "groups", 1))
        if (key, None) not in shared:
            shared[(key, None)] = time_ms(lambda layer=layer, x=x: layer(x))
        float_ms[name] = shared[(key, None)]
        for cand in candidates:
            if (key, cand) not in shared:
                quantized = build(name, cand)
                shared[(key, cand)] = time_ms(lambda q=quantized, x=x: q(x))
            quantized_ms[(name, cand)] = shared[(key, cand)]
    return float_ms, quantized_ms
