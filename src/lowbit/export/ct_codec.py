"""One quantized Linear <-> the compressed-tensors layout (weight_packed / weight_scale /
weight_zero_point / weight_shape, or int8 ``weight``), integers and scales carried exactly.

Conventions (compressed-tensors 0.20): a ``b``-bit int code is a signed q in
[-2^(b-1), 2^(b-1)-1] and dequantizes as (q - zero_point) * scale; packing offsets q by
2^(b-1) and fills int32 words densely along the input dimension (``pack_to_int32``), and
asymmetric group/channel zero points are packed the same way along the output dimension.
lowbit stores an Int code unsigned as q - qmin (symmetric) or as q with a uint8 zero point in
[0, 2^b-1] (asymmetric), so the conversion is a shift of both by 2^(b-1): nothing is rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedError
from ..formats import Int
from ..granularity import PerChannel, PerGroup, PerTensor, PerToken
from ..recipe import ActivationSpec
from ..tensor import QTensor, validate

PACKED = "pack-quantized"
INT8 = "int-quantized"


def _ct():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise UnsupportedError(
            "the Hugging Face export needs the compressed-tensors package; pip install compressed-tensors"
        ) from exc
    return pack_to_int32, unpack_from_int32


@dataclass(frozen=True)
class LayerLayout:
    """What compressed-tensors needs to know about one layer: its scheme (as QuantizationArgs
    dicts) and storage format; equal layouts share one config group."""

    weights: tuple[tuple[str, Any], ...]
    input_activations: tuple[tuple[str, Any], ...] | None
    format: str


def _weight_args(qt: QTensor, name: str) -> dict[str, Any]:
    fmt, gran = qt.fmt, qt.granularity
    if not isinstance(fmt, Int):
        raise UnsupportedError(
            f"{name}: {fmt.name} weights cannot be written as compressed-tensors, which stores integer "
            "grids only; re-quantize with an int recipe (w4-g128, w8-weight, int8-dynamic) or export "
            "with --format gguf"
        )
    if qt.zero_point is not None and qt.zero_point.is_floating_point():
        raise UnsupportedError(
            f"{name}: fractional zero points (HQQ) have no compressed-tensors form (it needs integer zero "
            "points); re-quantize with w4-g128, w4-g128-gptq or w4-g128-awq"
        )
    args: dict[str, Any] = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric}
    if isinstance(gran, PerGroup):
        if qt.shape[1] % gran.size:
            raise UnsupportedError(
                f"{name}: {qt.shape[1]} input features are not a multiple of the group size {gran.size}; "
                "compressed-tensors needs whole groups, re-quantize with a group size that divides it"
            )
        args.update(strategy="group", group_size=gran.size)
    elif isinstance(gran, PerChannel) and gran.axis in (0, -2):
        args["strategy"] = "channel"
    elif isinstance(gran, PerTensor):
        args["strategy"] = "tensor"
    else:
        raise UnsupportedError(f"{name}: weight granularity {gran.name} has no compressed-tensors strategy")
    return args


def _activation_args(act: ActivationSpec, name: str) -> dict[str, Any] | None:
    if act.mode == "none":
        return None
    fmt, gran = act.format, act.resolved_granularity
    if not isinstance(fmt, Int) or fmt.bits != 8:
        raise UnsupportedError(f"{name}: {fmt.name} activations are not exported; only int8 activations are")
    dynamic = act.mode == "dynamic"
    if dynamic and isinstance(gran, PerToken):
        strategy = "token"
    elif isinstance(gran, PerTensor):
        strategy = "tensor"
    else:
        raise UnsupportedError(f"{name}: {act.mode} {gran.name} activations have no compressed-tensors strategy")
    return {"num_bits": 8, "type": "int", "symmetric": fmt.symmetric, "strategy": strategy, "dynamic": dynamic}


def layout_of(layer, name: str) -> LayerLayout:
    """The compressed-tensors scheme of a lowbit QLinear, or UnsupportedError naming what blocks it."""
    if layer.input_smooth is not None:
        raise UnsupportedError(
            f"{name}: divides its input by a SmoothQuant/AWQ factor that could not be folded into a norm; "
            "compressed-tensors has no place for it. Re-quantize with int8-dynamic-rtn or w4-g128"
        )
    if layer.outlier_index is not None:
        raise UnsupportedError(f"{name}: float outlier channels (int8-outliers) have no compressed-tensors form")
    weights = _weight_args(layer.qweight, name)
    inputs = _activation_args(layer.activation, name)
    fmt = INT8 if inputs is not None and weights["num_bits"] == 8 else PACKED
    return LayerLayout(tuple(weights.items()), None if inputs is None else tuple(inputs.items()), fmt)


def _offset(fmt: Int) -> int:
    """lowbit code - this = compressed-tensors q."""
    return -fmt.qmin if fmt.symmetric else 2 ** (fmt.bits - 1)


def signed_codes(qt: QTensor) -> torch.Tensor:
    """The weight as compressed-tensors q (int8 [out, in]); pruned positions read as zero."""
    codes = qt.codes().to(torch.int16)
    if qt.mask is not None:  # pruned weights: the code whose value is exactly 0
        zero = qt.zero_point if qt.zero_point is not None else None
        rest = -qt.fmt.qmin if zero is None else qt.granularity.expand(zero.to(torch.int16), qt.shape)
        codes = torch.where(qt.keep_mask(), codes, rest)
    return (codes - _offset(qt.fmt)).to(torch.int8)


def _scale_2d(qt: QTensor) -> torch.Tensor:
    """Scales in compressed-tensors' shape and in the weight's dtype, as compressed-tensors makes
    them (it dequantizes in the scale's dtype, so fp16 scales would round an fp32 model)."""
    scale = qt.scale.reshape(qt.shape[0], 1) if isinstance(qt.granularity, PerChannel) else qt.scale
    return scale.to(qt.dtype)


def encode(layer, layout: LayerLayout) -> dict[str, torch.Tensor]:
    """The layer's tensors under compressed-tensors names (without the module prefix)."""
    pack_to_int32, _ = _ct()
    qt: QTensor = layer.qweight
    weights = dict(layout.weights)
    bits, q = weights["num_bits"], signed_codes(qt)
    out: dict[str, torch.Tensor] = {"weight_scale": _scale_2d(qt).contiguous()}
    if layout.format == PACKED:
        out["weight_packed"] = pack_to_int32(q, bits)
        out["weight_shape"] = torch.tensor(list(qt.shape), dtype=torch.int64)
    else:
        out["weight"] = q
    if not qt.fmt.symmetric:
        zp = (qt.zero_point.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        zp = zp.reshape(out["weight_scale"].shape)
        packed_zp = layout.format == PACKED and weights["strategy"] in ("group", "channel")
        out["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0) if packed_zp else zp.contiguous()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach()
    if layer.input_scale is not None:
        out["input_scale"] = layer.input_scale.detach().float().reshape(1)
        zero = layer.input_zero_point
        zp = torch.zeros(1, dtype=torch.int8) if zero is None else (zero.to(torch.int16) - 128).to(torch.int8)
        out["input_zero_point"] = zp.reshape(1)
    return out


def decode(tensors: dict[str, torch.Tensor], weights: Any, fmt_name: str, name: str, dtype: torch.dtype) -> QTensor:
    """A lowbit QTensor from one layer's compressed-tensors tensors (``weights``: QuantizationArgs)."""
    from ..errors import CheckpointError

    _, unpack_from_int32 = _ct()
    bits, strategy = int(weights.num_bits), str(weights.strategy)
    if weights.type != "int":
        raise UnsupportedError(f"{name}: {weights.type} weights are not imported; only int compressed-tensors are")
    scale = tensors.get("weight_scale")
    try:
        if fmt_name == PACKED:
            shape = torch.Size(int(d) for d in tensors["weight_shape"].tolist())
            q = unpack_from_int32(tensors["weight_packed"], bits, shape)
        elif fmt_name in (INT8, "naive-quantized"):
            q = tensors["weight"]
            shape = q.shape
        else:
            raise UnsupportedError(f"{name}: compressed-tensors format {fmt_name!r} is not imported")
        if scale is None:
            raise KeyError("weight_scale")
        zp = None
        if not weights.symmetric:
            zp = tensors["weight_zero_point"]
            if fmt_name == PACKED and strategy in ("group", "channel"):
                zp = unpack_from_int32(zp, bits, torch.Size((shape[0], scale.shape[-1])), packed_dim=0)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{name}: compressed-tensors tensors are missing or malformed ({exc})") from exc
    half = 2 ** (bits - 1)
    if weights.symmetric:
        fmt = Int(bits, symmetric=True, full_range=bool(q.numel()) and int(q.min()) < -(half - 1))
        codes, zero = q.to(torch.int16) - fmt.qmin, None
    else:
        fmt = Int(bits, symmetric=False)
        codes, zero = q.to(torch.int16) + half, (zp.to(torch.int16) + half).to(torch.uint8)
    gran = {"group": lambda: PerGroup(int(weights.group_size)), "channel": PerChannel, "tensor": PerTensor}
    if strategy not in gran:
        raise UnsupportedError(f"{name}: weight strategy {strategy!r} is not imported (group, channel, tensor are)")
    granularity = gran[strategy]()
    scale = _compact(scale.reshape(granularity.param_shape(shape)))
    if zero is not None:
        zero = zero.reshape(scale.shape)
    from .. import packing

    qt = QTensor(packing.pack(codes.to(torch.uint8), bits), fmt, granularity, shape, dtype, scale, zero)
    validate(qt, name)
    return qt


def _compact(scale: torch.Tensor) -> torch.Tensor:
    """fp32 scales that fp16 holds exactly are kept as fp16 (lowbit's usual scale dtype)."""
    if scale.dtype == torch.float32 and torch.equal(scale.to(torch.float16).float(), scale):
        return scale.to(torch.float16)
    return scale


def activation_from_args(args: Any, name: str) -> ActivationSpec:
    """lowbit's activation spec for compressed-tensors ``input_activations`` (None: weight-only)."""
    if args is None:
        return ActivationSpec()
    if args.type != "int" or args.num_bits != 8 or str(args.strategy) not in ("token", "tensor"):
        raise UnsupportedError(f"{name}: input activations {args.type}{args.num_bits}/{args.strategy} not imported")
    gran = PerToken() if str(args.strategy) == "token" else PerTensor()
    return ActivationSpec("dynamic" if args.dynamic else "static", Int(8, symmetric=bool(args.symmetric)), gran)
