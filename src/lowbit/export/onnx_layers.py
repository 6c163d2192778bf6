"""lowbit's quantized layers rewritten as modules that ``torch.onnx.export`` turns into QDQ /
MatMulInteger / MatMulNBits nodes over the layer's own codes and scales, with a note per layer
of how it was written (and, for formats ONNX has no grid for, why it was dequantized)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from ..formats import Int
from ..granularity import PerChannel, PerGroup, PerTensor, PerToken
from ..nn import QConv2d, QEmbedding, QLinear, QModule
from ..ranges import MinMax
from ..tensor import QTensor
from .onnx_ops import ActQuant, ActQuantOp, DequantConv, DequantMatMul, IntegerMatMul, NBitsMatMul


@dataclass
class LayerNote:
    """How one quantized layer went into the graph."""

    name: str
    weight: str  # "int8-qdq" | "int8-matmulinteger" | "matmulnbits-<bits>" | "int8-gather" | "float"
    activation: str = "none"  # "none" | "dynamic-token" | "dynamic-tensor" | "dynamic-ort" | "static"
    why: str = ""  # for "float": why the weight was dequantized
    approximated: str = ""  # what the graph computes differently from lowbit, if anything


def _integer_zero(qt: QTensor) -> bool:
    return qt.zero_point is None or not qt.zero_point.is_floating_point()


def _nbits_block(gran: PerGroup) -> bool:
    return gran.size >= 16 and gran.size & (gran.size - 1) == 0


def weight_route(qt: QTensor, conv: bool) -> tuple[str, str]:
    """("qdq" | "nbits" | "float", why it is float)."""
    fmt, gran = qt.fmt, qt.granularity
    if not isinstance(fmt, Int):
        return "float", f"{fmt.name} has no ONNX integer grid"
    per_channel = isinstance(gran, PerTensor) or (isinstance(gran, PerChannel) and gran.axis == 0)
    if per_channel and _integer_zero(qt):
        return "qdq", ""
    if isinstance(gran, PerGroup) and not conv:
        if not _nbits_block(gran):
            return "float", f"group size {gran.size} is not a power of two >= 16 (MatMulNBits blocks)"
        if fmt.bits > 4 and not _integer_zero(qt):
            return "float", "MatMulNBits has no 8-bit weights with fractional zero points"
        return "nbits", ""
    if not _integer_zero(qt):
        return "float", f"fractional zero points (HQQ) with {gran.name} scales have no ONNX form"
    return "float", f"{gran.name} scales on a {'conv' if conv else 'linear'} weight have no ONNX form here"


def int_codes(qt: QTensor) -> torch.Tensor:
    """Stored codes (q - qmin, uint8 values as int16) with pruned weights set to the code of 0."""
    codes = qt.codes().to(torch.int16)
    keep = qt.keep_mask()
    if keep is None:
        return codes
    fmt: Int = qt.fmt  # type: ignore[assignment]
    if qt.zero_point is None:
        zero = torch.tensor(-fmt.qmin, dtype=torch.int16)
    else:
        zero = qt.granularity.expand(qt.zero_point.to(torch.int16), qt.shape)
    return torch.where(keep, codes, zero)


def qdq_weight(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero) for DequantizeLinear: int8 q for symmetric formats (zero 0), uint8 codes
    with the stored zero points for asymmetric ones; scale per output channel or a scalar."""
    fmt: Int = qt.fmt  # type: ignore[assignment]
    codes = int_codes(qt)
    scale = qt.scale.float().reshape(-1)
    if fmt.symmetric:
        q, zero = (codes + fmt.qmin).to(torch.int8), torch.zeros(scale.shape, dtype=torch.int8)
    else:
        q, zero = codes.to(torch.uint8), qt.zero_point.reshape(-1).to(torch.uint8)
    if isinstance(qt.granularity, PerTensor):
        scale, zero = scale.reshape(()), zero.reshape(())
    return q, scale, zero


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] codes < 2**bits -> [rows, n*bits/8] bytes, low bits first (n a multiple of 8/bits)."""
    per = 8 // bits
    parts = codes.to(torch.int32).reshape(codes.shape[0], -1, per)
    return sum(parts[..., i] << (bits * i) for i in range(per)).to(torch.uint8)


def nbits_weight(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(B, scales, zero_points, bits, block) in MatMulNBits' layout from lowbit's group codes,
    widened to 2/4/8 bits where needed (3-bit codes as 4-bit: the same integers)."""
    fmt: Int = qt.fmt  # type: ignore[assignment]
    block = qt.granularity.size  # type: ignore[attr-defined]
    n, k = qt.shape
    blocks = -(-k // block)
    bits = 2 if fmt.bits <= 2 else 4 if fmt.bits <= 4 else 8
    codes = torch.zeros(n, blocks * block, dtype=torch.int16)
    codes[:, :k] = int_codes(qt)
    blob = _pack(codes, bits).reshape(n, blocks, block * bits // 8)
    scales = qt.scale.float().reshape(n, blocks)
    if qt.zero_point is not None and qt.zero_point.is_floating_point():
        return blob, scales, qt.zero_point.float().reshape(n, blocks), bits, block
    zeros = torch.full((n, blocks), -fmt.qmin, dtype=torch.int16)
    if qt.zero_point is not None:
        zeros = qt.zero_point.to(torch.int16).reshape(n, blocks)
    per = 8 // bits
    padded = torch.zeros(n, -(-blocks // per) * per, dtype=torch.int16)
    padded[:, :blocks] = zeros
    return blob, scales.reshape(-1), _pack(padded, bits).reshape(-1), bits, block


def act_quant(module: QModule, name: str, axis: int) -> ActQuant | None:
    """The activation quantization of ``module`` in graph form, or None for weight-only layers
    and for activation formats without an ONNX grid (fp8: left in float, see ``act_gap``)."""
    spec = module.activation
    if spec.mode == "none" or act_gap(module):
        return None
    fmt, gran = spec.format, spec.resolved_granularity
    if spec.mode == "dynamic":
        if not (fmt.symmetric and isinstance(gran, PerToken | PerTensor) and type(spec.range) is MinMax):
            raise UnsupportedError(
                f"{name}: dynamic activations {fmt.name}/{gran.name}/{spec.range.name} are not exported "
                "(symmetric min-max per token or per tensor only); re-quantize with int8-dynamic"
            )
    elif not isinstance(gran, PerTensor) or module.input_scale is None or module.input_scale.numel() != 1:
        raise UnsupportedError(f"{name}: static activations with {gran.name} scales are not exported (per tensor only)")
    return ActQuant(spec, axis)


def act_gap(module: QModule) -> str:
    """Why the layer's activation quantization is left out of the graph ('' when it is not)."""
    fmt = module.activation.format
    if module.activation.mode == "none" or isinstance(fmt, Int):
        return ""
    return f"{fmt.name} activations have no ONNX grid; they stay float"


def _act_label(act: ActQuant | None) -> str:
    if act is None:
        return "none"
    if act.spec.mode == "dynamic":
        return "dynamic-tensor" if act.per_tensor else "dynamic-token"
    return act.spec.mode


class _Exported(nn.Module):
    """Shared input path: outlier channels split off, SmoothQuant/AWQ divisor, activation quant."""

    def __init__(self, module: QModule, act: ActQuant | None) -> None:
        super().__init__()
        self.act = act
        for key in ("input_smooth", "outlier_index", "outlier_weight", "bias"):
            value = getattr(module, key)
            self.register_buffer(key, None if value is None else value.detach().clone())
        scale, zero = module.input_scale, module.input_zero_point
        self.register_buffer("input_scale", None if scale is None else scale.float().reshape(()))
        self.register_buffer("input_zero_point", None if zero is None else zero.to(torch.uint8).reshape(()))

    def expose_weight(self, qweight) -> None:
        """Let ``.weight`` answer (after the routes registered their buffers) with the quantized
        weight where no float one is written, for model code that reads its dtype or shape."""
        self.__dict__["_qweight"] = qweight

    def __getattr__(self, name: str):
        if name == "weight" and "weight" not in self.__dict__.get("_buffers", {}) and "_qweight" in self.__dict__:
            return self.__dict__["_qweight"]
        return super().__getattr__(name)

    def quantize_input(self, x: torch.Tensor, channel_axis: int) -> torch.Tensor:
        if self.input_smooth is not None:
            view = [1] * x.dim()
            view[channel_axis] = -1
            x = x / self.input_smooth.reshape(view)
        if self.act is None:
            return x
        return ActQuantOp.apply(x, self.input_scale, self.input_zero_point, self.act)


class OnnxLinear(_Exported):
    """A QLinear as ONNX nodes (see ``LayerNote`` for which)."""

    def __init__(self, module: QLinear, name: str, dynamic: str = "token") -> None:
        act = act_quant(module, name, -1)
        super().__init__(module, act)
        qt = module.qweight
        self.route, why = weight_route(qt, conv=False)
        act_name = _act_label(act)
        fmt = qt.fmt
        if (
            self.route == "qdq"
            and act is not None
            and act.spec.mode == "dynamic"
            and fmt.bits == 8
            and fmt.symmetric
            and act.fmt.bits == 8
        ):
            self.route, self.ort = "integer", dynamic == "ort"
            act_name = "dynamic-ort" if self.ort else act_name
        if self.route in ("qdq", "integer"):
            codes, scale, zero = qdq_weight(qt)
            if self.route == "integer":  # uint8 codes + 128 (zero point 128): see IntegerMatMul
                codes = (codes.to(torch.int16) + 128).to(torch.uint8)
            self.register_buffer("codes", codes.t().contiguous())
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
            label = "int8-matmulinteger" if self.route == "integer" else "int8-qdq"
        elif self.route == "nbits":
            blob, scales, zeros, self.bits, self.block = nbits_weight(qt)
            self.register_buffer("blob", blob)
            self.register_buffer("scales", scales)
            self.register_buffer("zeros", zeros)
            label = f"matmulnbits-{self.bits}"
        else:
            self.register_buffer("weight", qt.dequantize(torch.float32))
            label = "float"
        self.shape = tuple(qt.shape)
        self.note = LayerNote(name, label, act_name, why, act_gap(module))
        self.expose_weight(module.qweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = None
        if self.outlier_index is not None:
            side = F.linear(x[..., self.outlier_index], self.outlier_weight.to(x.dtype))
            keep = torch.ones(x.shape[-1], dtype=x.dtype)
            keep[self.outlier_index] = 0.0
            x = x * keep
        if self.route == "integer":
            if self.input_smooth is not None:
                x = x / self.input_smooth
            y = IntegerMatMul.apply(x, self.codes, self.scale, self.act, self.ort)
        else:
            x = self.quantize_input(x, -1)
            if self.route == "qdq":
                y = DequantMatMul.apply(x, self.codes, self.scale, self.zero)
            elif self.route == "nbits":
                n, k = self.shape
                y = NBitsMatMul.apply(x, self.blob, self.scales, self.zeros, k, n, self.bits, self.block)
            else:
                y = F.linear(x, self.weight.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if side is None else y + side


def _onnx_pads(module: QConv2d) -> tuple[int, int, int, int]:
    """[top, left, bottom, right] for the conv's padding ('same' puts the odd pixel at the end)."""
    padding = module.padding
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (ph, pw, ph, pw)


class OnnxConv2d(_Exported):
    """A QConv2d as DequantizeLinear (axis 0) + Conv, or a float Conv for other formats."""

    def __init__(self, module: QConv2d, name: str) -> None:
        act = act_quant(module, name, 1)
        super().__init__(module, act)
        self.pre_pad = module.pre_pad
        qt = module.qweight
        self.route, why = weight_route(qt, conv=True)
        self.conv = (module.stride, module.padding, _onnx_pads(module), module.dilation, module.groups)
        if self.route == "qdq":
            codes, scale, zero = qdq_weight(qt)
            self.register_buffer("codes", codes)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
        else:
            self.register_buffer("weight", qt.dequantize(torch.float32))
        act_name = _act_label(act)
        self.note = LayerNote(name, "int8-qdq" if self.route == "qdq" else "float", act_name, why, act_gap(module))
        self.expose_weight(module.qweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(self.pre_pad(x), 1)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.route == "qdq":
            return DequantConv.apply(x, self.codes, self.scale, self.zero, bias, self.conv)
        stride, padding, _, dilation, groups = self.conv
        return F.conv2d(x, self.weight.to(x.dtype), bias, stride, padding, dilation, groups)


class OnnxEmbedding(nn.Module):
    """An int8 table with per-row (or one) scale: Gather the codes of the ids, then dequantize
    only those rows (Cast, Sub zero, Mul scale), so the graph stores one byte per weight."""

    def __init__(self, qt: QTensor) -> None:
        super().__init__()
        codes, scale, zero = qdq_weight(qt)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.reshape(-1, 1) if scale.dim() else scale)
        self.register_buffer("zero", zero.reshape(-1, 1) if zero.dim() else zero)
        self.per_row = scale.dim() > 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.codes[ids].float()
        if not self.per_row:
            return (rows - self.zero.float()) * self.scale
        return (rows - self.zero[ids].float()) * self.scale[ids]


def exportable(module: QModule, name: str, dynamic: str = "token") -> tuple[nn.Module, LayerNote]:
    """The ONNX-exportable replacement of a quantized layer and how it is written."""
    if isinstance(module, QLinear):
        new = OnnxLinear(module, name, dynamic)
        return new, new.note
    if isinstance(module, QConv2d):
        new = OnnxConv2d(module, name)
        return new, new.note
    if isinstance(module, QEmbedding):
        qt = module.qweight
        route, why = weight_route(qt, conv=False)
        if route == "qdq":
            new = OnnxEmbedding(qt)
            return new, LayerNote(name, "int8-gather")
        why = why or f"{qt.granularity.name} scales have no int8 Gather form here"
        table = qt.dequantize(torch.float32)
        new = nn.Embedding.from_pretrained(table, freeze=True, padding_idx=module.padding_idx)
        return new, LayerNote(name, "float", "none", f"embedding table written as float (Gather): {why}")
    raise UnsupportedError(f"{name}: {type(module).__name__} layers are not exported to ONNX")
