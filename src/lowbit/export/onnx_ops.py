"""The ONNX pieces of a quantized layer, as autograd Functions with a ``symbolic``: in eager mode
each computes what lowbit computes (the numeric reference), and when ``torch.onnx.export`` traces
it, it writes QuantizeLinear / DequantizeLinear / MatMulInteger / com.microsoft MatMulNBits nodes
over the layer's own integer codes and scales (nothing is re-quantized)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.onnx import TensorProtoDataType as Onnx

from ..formats import Int
from ..granularity import PerTensor
from ..primitives import QParams, choose_qparams, dequantize, quantize
from ..recipe import ActivationSpec


@dataclass(frozen=True)
class ActQuant:
    """How a layer's input is quantized in the graph: ``dynamic`` (min-max range per token, i.e.
    along ``axis``, or per tensor, computed at run time) or ``static`` (calibrated scale/zero)."""

    spec: ActivationSpec
    axis: int = -1  # the channel axis: -1 for Linear inputs, 1 for NCHW conv inputs

    @property
    def fmt(self) -> Int:
        return self.spec.format  # type: ignore[return-value]

    @property
    def per_tensor(self) -> bool:
        return isinstance(self.spec.resolved_granularity, PerTensor)

    def reference(self, x: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None) -> torch.Tensor:
        """lowbit's fake quantization of ``x`` (kernels/reference.py), channels moved last."""
        x = x.movedim(self.axis, -1)
        gran = self.spec.resolved_granularity
        if self.spec.mode == "dynamic":
            qp = choose_qparams(x, self.fmt, gran, self.spec.range, name="activation")
        else:
            qp = QParams(scale, zero)
        out = dequantize(quantize(x, self.fmt, qp, gran), self.fmt, qp, gran, x.shape, x.dtype)
        return out.movedim(-1, self.axis)


def untraced(fn, *args):
    """``fn(*args)`` hidden from the TorchScript tracer: a Function's ``symbolic`` describes the
    graph, its forward only supplies the values the rest of the trace sees."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return fn(*args)
    finally:
        torch._C._set_tracing_state(state)


def _const(g, value, dtype: torch.dtype = torch.float32):
    return g.op("Constant", value_t=torch.as_tensor(value, dtype=dtype))


def _reduce(g, op: str, x, act: ActQuant):
    if act.per_tensor:
        return g.op(op, x, keepdims_i=1)
    return g.op(op, x, axes_i=[act.axis], keepdims_i=1)


def dynamic_scale(g, x, act: ActQuant):
    """lowbit's symmetric min-max scale (primitives.qparams_from_range) per token or tensor. For
    qmin = -qmax it is max|x| / qmax (an all-zero row keeps codes 0; a constant row c gets |c|/qmax
    where lowbit takes |c|: the same value up to float rounding); full-range formats use
    max(max(hi, 0) / qmax, min(lo, 0) / qmin)."""
    fmt = act.fmt
    if fmt.qmin == -fmt.qmax:
        absmax = _reduce(g, "ReduceMax", g.op("Abs", x), act)
        return g.op("Max", g.op("Div", absmax, _const(g, float(fmt.qmax))), _const(g, 1e-30))
    hi, lo = _reduce(g, "ReduceMax", x, act), _reduce(g, "ReduceMin", x, act)
    zero = _const(g, 0.0)
    scale = g.op(
        "Max",
        g.op("Div", g.op("Max", hi, zero), _const(g, float(fmt.qmax))),
        g.op("Div", g.op("Min", lo, zero), _const(g, float(fmt.qmin))),
    )
    return g.op("Max", scale, _const(g, 1e-30))


def _round_clip(g, t, fmt: Int):
    return g.op("Clip", g.op("Round", t), _const(g, float(fmt.qmin)), _const(g, float(fmt.qmax)))


def emit_act_quant(g, x, act: ActQuant, scale=None, zero=None):
    """Quantize-dequantize ``x`` in the graph: QuantizeLinear/DequantizeLinear for 8-bit static
    activations, the same arithmetic in plain ops (Div, Round, Clip, Mul) otherwise."""
    fmt = act.fmt
    if act.spec.mode == "dynamic":
        s = dynamic_scale(g, x, act)
        return g.op("Mul", _round_clip(g, g.op("Div", x, s), fmt), s)
    if fmt.bits == 8:
        if fmt.symmetric:  # int8 codes, zero point 0; int8 saturates at -128, lowbit clips at qmin
            zero = _const(g, 0, torch.int8)
            x = g.op("Max", x, g.op("Mul", scale, _const(g, float(fmt.qmin))))
        q = g.op("QuantizeLinear", x, scale, zero)
        return g.op("DequantizeLinear", q, scale, zero)
    zf = _const(g, 0.0) if zero is None else g.op("Cast", zero, to_i=Onnx.FLOAT)
    q = _round_clip(g, g.op("Add", g.op("Round", g.op("Div", x, scale)), zf), fmt)
    return g.op("Mul", g.op("Sub", q, zf), scale)


class ActQuantOp(torch.autograd.Function):
    """Activation quantization (dynamic or static) before a layer's matmul or conv."""

    @staticmethod
    def forward(ctx, x, scale, zero, act: ActQuant):  # type: ignore[override]
        return untraced(act.reference, x, scale, zero)

    @staticmethod
    def symbolic(g, x, scale, zero, act: ActQuant):
        return emit_act_quant(g, x, act, scale, zero)


class DequantMatMul(torch.autograd.Function):
    """y = x @ DequantizeLinear(codes [in, out], scale, zero), per output channel (axis 1) or
    per tensor: ``codes`` int8 (symmetric) or uint8 (asymmetric, with its zero points)."""

    @staticmethod
    def forward(ctx, x, codes, scale, zero):  # type: ignore[override]
        w = (codes.float() - zero.float()) * scale
        return x @ w.to(x.dtype)

    @staticmethod
    def symbolic(g, x, codes, scale, zero):
        axis = {} if scale.type().sizes() == [] else {"axis_i": 1}
        return g.op("MatMul", x, g.op("DequantizeLinear", codes, scale, zero, **axis))


class IntegerMatMul(torch.autograd.Function):
    """uint8 x uint8 -> int32 matmul (MatMulInteger) with dynamic activations, then the two scales.
    ``ort=False``: lowbit's symmetric per-token scales (exact); ``ort=True``: ONNX Runtime's fused
    DynamicQuantizeLinear (uint8, asymmetric, one scale per tensor: an approximation).

    Both operands are uint8 (``codes`` = int8 weight codes + 128, zero point 128): ONNX Runtime's
    u8 x s8 kernel multiplies with vpmaddubsw on AVX2 CPUs, whose int16 pair sums saturate
    (255 * 127 * 2 > 32767): on a Zen 3 MiniLM's embeddings then reached only 0.988 cosine to
    lowbit's. Its u8 x u8 kernel widens to 16 bits first and is exact on every x86 CPU."""

    @staticmethod
    def forward(ctx, x, codes, scale, act: ActQuant, ort: bool):  # type: ignore[override]
        return untraced(act.reference, x, None, None) @ ((codes.float() - 128.0) * scale).to(x.dtype)

    @staticmethod
    def symbolic(g, x, codes, scale, act: ActQuant, ort: bool):
        zero = _const(g, 128, torch.uint8)  # the weight codes' zero point, and lowbit's activations' below
        if ort:
            xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
            acc = g.op("Cast", g.op("MatMulInteger", xq, codes, xz, zero), to_i=Onnx.FLOAT)
            return g.op("Mul", acc, g.op("Mul", xs, scale))
        s = dynamic_scale(g, x, act)
        q = g.op("Add", _round_clip(g, g.op("Div", x, s), act.fmt), _const(g, 128.0))
        xq = g.op("Cast", q, to_i=Onnx.UINT8)
        acc = g.op("Cast", g.op("MatMulInteger", xq, codes, zero, zero), to_i=Onnx.FLOAT)
        return g.op("Mul", g.op("Mul", acc, s), scale)


def unpack_nbits(blob: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Codes [N, K] from MatMulNBits' packed B [N, blocks, block*bits/8] (low bits first)."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(blob.to(torch.int32) >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(blob.shape[0], -1)[:, :k]


class NBitsMatMul(torch.autograd.Function):
    """y = x @ W^T with W in ONNX Runtime's com.microsoft MatMulNBits layout: codes of ``bits``
    bits in blocks of ``block`` along the input dimension, a scale and a zero point per block
    (uint8, packed like the codes, or float for fractional zero points)."""

    @staticmethod
    def forward(ctx, x, blob, scales, zeros, k: int, n: int, bits: int, block: int):  # type: ignore[override]
        codes = unpack_nbits(blob, bits, k).float()
        blocks = -(-k // block)
        if zeros.dtype == torch.uint8:
            zeros = unpack_nbits(zeros.reshape(n, -1), bits, blocks)
        z = zeros.float().reshape(n, blocks).repeat_interleave(block, dim=1)[:, :k]
        s = scales.float().reshape(n, blocks).repeat_interleave(block, dim=1)[:, :k]
        return F.linear(x, ((codes - z) * s).to(x.dtype))

    @staticmethod
    def symbolic(g, x, blob, scales, zeros, k: int, n: int, bits: int, block: int):
        y = g.op("com.microsoft::MatMulNBits", x, blob, scales, zeros, K_i=k, N_i=n, bits_i=bits, block_size_i=block)
        sizes = x.type().varyingSizes()
        if sizes is not None:  # tell the exporter's shape inference what the custom op returns
            y.setType(x.type().with_sizes([*sizes[:-1], n]))
        return y


class DequantConv(torch.autograd.Function):
    """Conv2d over DequantizeLinear(int8/uint8 codes [O, I, kh, kw], scale, zero, axis 0); ``conv`` is
    (stride, torch padding, ONNX pads [top, left, bottom, right], dilation, groups)."""

    @staticmethod
    def forward(ctx, x, codes, scale, zero, bias, conv: tuple):  # type: ignore[override]
        stride, padding, _, dilation, groups = conv
        view = (-1, 1, 1, 1) if scale.dim() else ()
        w = (codes.float() - zero.float().reshape(view)) * scale.reshape(view)
        return F.conv2d(x, w.to(x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def symbolic(g, x, codes, scale, zero, bias, conv: tuple):
        stride, _, pads, dilation, groups = conv
        axis = {} if scale.type().sizes() == [] else {"axis_i": 0}
        w = g.op("DequantizeLinear", codes, scale, zero, **axis)
        inputs = (x, w) if bias is None else (x, w, bias)
        return g.op(
            "Conv",
            *inputs,
            strides_i=list(stride),
            pads_i=list(pads),
            dilations_i=list(dilation),
            group_i=groups,
        )
