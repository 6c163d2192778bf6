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
    FalconLinear, written as a matmul), checked with random weights on a random input (so an
    uninitialised skeleton being loaded answers the same); anything else (LoRA terms, other
    signatures) keeps the layer unquantizable."""
    from torch.func import functional_call

    out_features, in_features = module.weight.shape
    gen = torch.Generator().manual_seed(0)
    params = {"weight": torch.randn(out_features, in_features, generator=gen)}
    if module.bias is not None:
        params["bias"] = torch.randn(out_features, generator=gen)
    x = torch.randn(3, in_features, generator=gen)
    try:
        with torch.no_grad():
            got = functional_call(module, params, (x,))
    except Exception:  # any failure of the custom forward means "not a plain linear"
        return False
    want = F.linear(x, params["weight"], params.get("bias"))
    return isinstance(got, torch.Tensor) and got.shape == want.shape and bool(torch.allclose(got, want, atol=1e-4))
