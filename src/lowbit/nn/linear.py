"""QLinear: a Linear layer whose weight is a QTensor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        if type(module).forward is not nn.Linear.forward and not computes_linear(module):
            raise UnsupportedError(
                f"{name}: {type(module).__name__} overrides Linear.forward, so swapping it would change the "
                "model; skip it in the recipe (a rule with skip: true)"
            )
        return cls(qweight, activation, module.bias)


def computes_linear(module: nn.Module) -> bool:
    """Whether a Linear subclass with its own forward still computes x W^T + b (e.g. Falcon's
    FalconLinear, written as a matmul), checked on a fixed random input; anything else (LoRA
    terms, other dtypes or signatures) keeps the layer unquantizable."""
    weight, bias = module.weight, module.bias
    if weight.device.type == "meta" or weight.dim() != 2:
        return False
    gen = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(3, weight.shape[1], generator=gen, device=weight.device).to(weight.dtype)
    try:
        with torch.no_grad():
            got, want = module(x), F.linear(x, weight, bias)
    except Exception:
        return False
    tol = 1e-5 if weight.dtype == torch.float32 else 1e-2
    return (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))
    )
