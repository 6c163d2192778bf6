"""Quantized modules (QLinear, QConv2d, QEmbedding) and the float -> quantized swap."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedError
from ..recipe import ActivationSpec
from ..tensor import QTensor
from .base import WEIGHT_BUFFERS, QModule, same_weight
from .conv import QConv2d
from .embedding import QEmbedding
from .linear import QLinear

QUANTIZED_TYPES: dict[type[nn.Module], type[QModule]] = {
    nn.Linear: QLinear,
    nn.Conv2d: QConv2d,
    nn.Embedding: QEmbedding,
}


def quantized_class(module: nn.Module, name: str = "") -> type[QModule]:
    for float_type, qtype in QUANTIZED_TYPES.items():
        if isinstance(module, float_type):
            return qtype
    raise UnsupportedError(
        f"{name}: {type(module).__name__} layers cannot be quantized; supported: Linear, Conv2d, Embedding"
    )


def to_quantized(module: nn.Module, qweight: QTensor, activation: ActivationSpec, name: str = "") -> QModule:
    """The quantized replacement of a float layer."""
    return quantized_class(module, name).from_float(module, qweight, activation, name)


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


__all__ = [
    "WEIGHT_BUFFERS",
    "QConv2d",
    "QEmbedding",
    "QLinear",
    "QModule",
    "get_submodule",
    "same_weight",
    "set_submodule",
    "to_quantized",
]
