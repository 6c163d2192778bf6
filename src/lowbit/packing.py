"""Exact pack/unpack of b-bit codes (b = 1..8) into bytes.

Layout: codes are taken in runs of 8; a run of 8 b-bit codes fills exactly b bytes as a
little-endian bit stream, code k occupying bits [k*b, (k+1)*b). So 4-bit code 2i sits in
the low nibble of byte i, 1-bit code k is bit k%8 of byte k//8, and 3-bit packs 8 codes
into 3 bytes. The last run is zero-padded and the output trimmed to ceil(n*b/8) bytes.
"""

from __future__ import annotations

import math

import torch

from .errors import SpecError

SUPPORTED_BITS = tuple(range(1, 9))


def _check(bits: int) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise SpecError(f"packing: bits={bits!r} is unsupported; allowed: 1..8")


def packed_size(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    _check(bits)
    return math.ceil(numel * bits / 8)


_CHUNK_RUNS = 1 << 20  # runs of 8 codes per step: bounds the int64 scratch to 64 MB


def _pack_runs(runs: torch.Tensor, bits: int) -> torch.Tensor:
    """[r, 8] int64 codes -> [r * bits] uint8."""
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (runs << shifts).sum(dim=1)  # at most 56 bits: no overflow
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unpack_runs(data: torch.Tensor, bits: int) -> torch.Tensor:
    """[r, bits] int64 bytes -> [r * 8] uint8 codes."""
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (data << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    return ((words.unsqueeze(1) >> shifts) & (2**bits - 1)).to(torch.uint8).reshape(-1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (any shape, flattened, each < 2^bits) into a 1-D uint8 tensor."""
    _check(bits)
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        raise SpecError(f"packing: codes must be uint8, got {flat.dtype}")
    n = flat.numel()
    if n and int(flat.max()) >= 2**bits:
        raise SpecError(f"packing: a code is {int(flat.max())}, which does not fit in {bits} bits")
    if bits == 8:
        return flat.clone()
    runs = math.ceil(n / 8)
    padded = torch.zeros(runs * 8, dtype=torch.uint8)
    padded[:n] = flat
    padded = padded.view(runs, 8)
    out = torch.cat(
        [_pack_runs(padded[i : i + _CHUNK_RUNS].to(torch.int64), bits) for i in range(0, runs, _CHUNK_RUNS)]
        or [torch.zeros(0, dtype=torch.uint8)]
    )
    return out[: packed_size(n, bits)].contiguous()


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``numel`` codes as a 1-D uint8 tensor."""
    _check(bits)
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        raise SpecError(f"unpacking: packed data must be uint8, got {flat.dtype}")
    need = packed_size(numel, bits)
    if flat.numel() != need:
        raise SpecError(f"unpacking: {numel} codes of {bits} bits need {need} bytes, got {flat.numel()}")
    if bits == 8:
        return flat.clone()
    runs = math.ceil(numel / 8)
    padded = torch.zeros(runs * bits, dtype=torch.uint8)
    padded[:need] = flat
    padded = padded.view(runs, bits)
    codes = torch.cat(
        [_unpack_runs(padded[i : i + _CHUNK_RUNS].to(torch.int64), bits) for i in range(0, runs, _CHUNK_RUNS)]
        or [torch.zeros(0, dtype=torch.uint8)]
    )
    return codes[:numel].contiguous()
