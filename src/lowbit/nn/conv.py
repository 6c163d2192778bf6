"""QConv2d: a Conv2d layer whose weight is a QTensor."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedError
from ..recipe import ActivationSpec
from ..tensor import QTensor
from .base import QModule


class QConv2d(QModule):
    """2-D convolution with a quantized weight. ``pre_pad`` carries the fixed padding of
    "same"-padding subclasses (e.g. EfficientNet's Conv2dStaticSamePadding)."""

    op = "conv2d"

    def __init__(
        self,
        qweight: QTensor,
        activation: ActivationSpec,
        bias=None,
        *,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups: int = 1,
        pre_pad: nn.Module | None = None,
    ) -> None:
        super().__init__(qweight, activation, bias)
        self.out_channels = qweight.shape[0]
        self.in_channels = qweight.shape[1] * groups
        self.kernel_size = tuple(qweight.shape[2:])
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), padding, tuple(dilation), groups
        self.pre_pad = pre_pad if pre_pad is not None else nn.Identity()

    @classmethod
    def from_float(cls, module: nn.Conv2d, qweight: QTensor, activation: ActivationSpec, name: str = "") -> QConv2d:
        pre_pad = None
        if type(module).forward is not nn.Conv2d.forward:
            pre_pad = getattr(module, "static_padding", None)
            if not isinstance(pre_pad, nn.Module):
                raise UnsupportedError(
                    f"{name}: {type(module).__name__} overrides Conv2d.forward in a way lowbit cannot reproduce; "
                    "skip it in the recipe (a rule with skip: true)"
                )
        if module.padding_mode != "zeros":
            raise UnsupportedError(f"{name}: padding_mode={module.padding_mode!r} is not supported; skip the layer")
        return cls(
            qweight,
            activation,
            module.bias,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            pre_pad=pre_pad,
        )

    def extra_repr(self) -> str:
        return f"stride={self.stride}, padding={self.padding}, groups={self.groups}, " + super().extra_repr()
