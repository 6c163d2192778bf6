"""GPT-2 style ``Conv1D`` layers (transformers.pytorch_utils): a Linear whose weight is stored
transposed ([in, out]). lowbit quantizes them as the Linear they are."""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (y = x W + b with W [in, out]), recognised without importing transformers."""
    return (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers.")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 2
    )


def conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """The nn.Linear that computes what ``module`` (a Conv1D) computes: the weight transposed."""
    weight = module.weight.detach()
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.T.contiguous(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return linear.train(module.training)
