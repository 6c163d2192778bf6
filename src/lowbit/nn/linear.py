"""QLinear: a Linear layer whose weight is a QTensor."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedError
from ..recipe import ActivationSpec
from ..tensor import QTensor
from .base import QModule


class QLinear(QModule):
    """y = x W^T + b with W quantized; activations per the spec (none / dynamic / static)."""

    op = "linear"

    def __init__(self, qweight: QTensor, activation: ActivationSpec, bias=None) -> None:
        super().__init__(qweight, activation, bias)
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def from_float(cls, module: nn.Linear, qweight: QTensor, activation: ActivationSpec, name: str = "") -> QLinear:
        if type(module).forward is not nn.Linear.forward:
            raise UnsupportedError(
                f"{name}: {type(module).__name__} overrides Linear.forward, so swapping it would change the "
                "model; skip it in the recipe (a rule with skip: true)"
            )
        return cls(qweight, activation, module.bias)
