"""Model size in memory and on disk, and bits per weight over the weight layers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..tensor import QTensor

# Layers whose ``weight`` counts for bits per weight (a quantized layer is found by its ``qweight``).
WEIGHT_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.EmbeddingBag,
)
_WEIGHT_LAYER_NAMES = ("Conv1D",)  # transformers' GPT-2 style linear, matched by name (no import)


def _key(t: torch.Tensor) -> tuple | int:
    """The identity of a tensor's memory: two names for the same memory share a key."""
    ptr = t.data_ptr() if t.device.type != "meta" else 0
    return (str(t.device), ptr, t.numel() * t.element_size()) if ptr else id(t)


def _qtensor_parts(qt: QTensor) -> list[torch.Tensor]:
    return [t for t in (qt.data, qt.scale, qt.zero_point, qt.codebook) if t is not None]


def qweight_of(module: nn.Module) -> QTensor | None:
    """The module's quantized weight (its ``qweight`` property), or None for a float layer."""
    qt = getattr(module, "qweight", None)
    return qt if isinstance(qt, QTensor) else None


def weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv / Embedding layer, quantized or not."""
    for name, module in model.named_modules():
        if qweight_of(module) is not None or (
            (isinstance(module, WEIGHT_LAYERS) or type(module).__name__ in _WEIGHT_LAYER_NAMES)
            and torch.is_tensor(getattr(module, "weight", None))
        ):
            yield name, module


def model_size(model: nn.Module) -> dict:
    """``bytes`` of all parameters, buffers and quantized weights (shared memory counted once),
    logical ``params``, and ``bits_per_weight`` over the weight layers (all, and quantized only)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model_size: expected an nn.Module, got {type(model).__name__}")
    qtensors = [qt for _, m in model.named_modules() if (qt := qweight_of(m)) is not None]
    packed = {_key(t) for qt in qtensors for t in _qtensor_parts(qt)}
    memory: dict = {}
    params = sum(qt.numel() for qt in {id(qt): qt for qt in qtensors}.values())
    for p in model.parameters():  # parameters() already drops repeated Parameter objects
        key = _key(p)
        if key not in packed and key not in memory:
            params += p.numel()
        memory[key] = p.numel() * p.element_size()
    for t in [*model.buffers(), *(t for qt in qtensors for t in _qtensor_parts(qt))]:
        memory[_key(t)] = t.numel() * t.element_size()

    seen: set = set()
    total = [0, 0]  # bytes, weights over all weight layers
    quant = [0, 0, 0]  # bytes, weights, layers over quantized layers only
    layers = list(weight_layers(model))
    for _, module in layers:
        qt = qweight_of(module)
        if qt is not None:
            key, nbytes, numel = ("q", *map(_key, _qtensor_parts(qt))), qt.nbytes, qt.numel()
        else:
            w = module.weight
            key, nbytes, numel = _key(w), w.numel() * w.element_size(), w.numel()
        if key in seen:  # a tied weight (embedding and head) is stored once
            continue
        seen.add(key)
        total[0], total[1] = total[0] + nbytes, total[1] + numel
        if qt is not None:
            quant = [quant[0] + nbytes, quant[1] + numel, quant[2] + 1]
    return {
        "bytes": sum(memory.values()),
        "params": params,
        "bits_per_weight": 8.0 * total[0] / total[1] if total[1] else None,
        "quantized_bits_per_weight": 8.0 * quant[0] / quant[1] if quant[1] else None,
        "quantized_layers": quant[2],
        "weight_layers": len(layers),
    }


def directory_bytes(path: str | Path) -> int:
    """Bytes of all files under ``path`` (a checkpoint directory) or of one file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise ModelError(f"{path}: does not exist; give a checkpoint directory or file")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
