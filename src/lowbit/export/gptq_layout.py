"""One GPTQ-format Linear (AutoGPTQ / optimum / GPTQModel: qweight, qzeros, scales, g_idx) as a
lowbit QTensor, integers and scales carried exactly.

Layout: ``qweight`` int32 [in * bits / 32, out] packs 32/bits codes of consecutive input rows
per word, row k of a word in bits [k*bits, (k+1)*bits); ``qzeros`` int32 [groups, out * bits /
32] packs the zero points of consecutive output columns the same way; ``scales`` [groups, out];
``g_idx`` [in] the group of each input row. W[o, i] = scales[g, o] * (q[i, o] - zero[g, o]),
g = g_idx[i]. Checkpoints in the original ("gptq", v1) format store zero - 1 (a historical
off-by-one that the kernels undo by adding 1); "gptq_v2" stores the zero itself.
"""

from __future__ import annotations

import torch

from .. import packing
from ..errors import CheckpointError, UnsupportedError
from ..formats import Int
from ..granularity import PerChannel, PerGroup
from ..tensor import QTensor, validate

SUPPORTED_BITS = (2, 4, 8)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [n, m] holding 32/bits codes per word along dim 0 -> int64 [n * 32/bits, m]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64).view(1, -1, 1)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [n, m] holding 32/bits codes per word along dim 1 -> int64 [n, m * 32/bits]."""
    return unpack_rows(packed.t(), bits).t()


def decode(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool, v2: bool, name: str) -> QTensor:
    """A lowbit QTensor from one layer's GPTQ tensors (keys without the module prefix)."""
    if bits not in SUPPORTED_BITS:
        raise UnsupportedError(
            f"{name}: {bits}-bit GPTQ packing is not read (codes straddle int32 words); supported: {SUPPORTED_BITS}"
        )
    try:
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    except KeyError as exc:
        raise CheckpointError(f"{name}: GPTQ tensor {exc} is missing; the checkpoint is incomplete") from exc
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or not scales.is_floating_point():
        raise CheckpointError(f"{name}: qweight/qzeros must be int32 and scales float; not a GPTQ checkpoint")
    q = unpack_rows(qweight, bits)  # [in, out]
    in_features, out_features = q.shape
    groups = scales.shape[0]
    zeros = unpack_cols(qzeros, bits)[:, :out_features] + (0 if v2 else 1)  # [groups, out]
    if scales.shape[1] != out_features or zeros.shape[0] != groups:
        raise CheckpointError(
            f"{name}: scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not fit qweight "
            f"{tuple(qweight.shape)}; the checkpoint is corrupt"
        )
    size = in_features if group_size in (-1, 0) else group_size
    sequential = torch.arange(in_features) // size
    g_idx = tensors.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), sequential):
        raise UnsupportedError(
            f"{name}: act-order GPTQ (desc_act=true): g_idx assigns input rows to groups out of order, and "
            "lowbit groups consecutive rows; re-quantize with desc_act=false (or static_groups=true)"
        )
    if -(-in_features // size) != groups:
        raise CheckpointError(f"{name}: {groups} scale rows but {in_features} inputs in groups of {size}")
    half = 2 ** (bits - 1)
    if sym and bool((zeros == half).all()):
        fmt, zero = Int(bits, symmetric=True, full_range=True), None  # q - 2^(b-1): codes stay as they are
    else:
        if int(zeros.max()) > 2**bits - 1:
            raise UnsupportedError(
                f"{name}: a zero point of {int(zeros.max())} lies outside {bits} bits (v1 checkpoints cannot store "
                "zero 0); set checkpoint_format to gptq_v2 if the file stores zeros directly"
            )
        fmt, zero = Int(bits, symmetric=False), zeros.t().contiguous().to(torch.uint8)
    granularity = PerChannel() if groups == 1 and size == in_features else PerGroup(size)
    scale = scales.t().contiguous()
    scale = scale.reshape(out_features) if isinstance(granularity, PerChannel) else scale
    if zero is not None and isinstance(granularity, PerChannel):
        zero = zero.reshape(out_features)
    codes = q.t().contiguous().to(torch.uint8)
    shape = torch.Size((out_features, in_features))
    qt = QTensor(packing.pack(codes, bits), fmt, granularity, shape, torch.float32, scale, zero)
    validate(qt, name)
    return qt
