"""pack/unpack: exact for every width and odd length; documented layout; clear errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import SpecError
from lowbit.packing import pack, packed_size, unpack


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact(bits, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_size(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack(packed, bits, n), codes)


def test_layout():
    # 4-bit: code 2i in the low nibble of byte i.
    assert pack(torch.tensor([1, 2, 3, 4], dtype=torch.uint8), 4).tolist() == [0x21, 0x43]
    # 1-bit: code k is bit k of the byte.
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0b1101, 1]
    # 3-bit: 8 codes in 3 bytes, little-endian bit stream.
    codes = torch.tensor([7, 0, 0, 0, 0, 0, 0, 5], dtype=torch.uint8)
    stream = 7 | (5 << 21)
    assert pack(codes, 3).tolist() == [stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]


def test_large_tensor_spans_chunks():
    codes = torch.randint(0, 8, (3 * (1 << 20) * 8 + 5,), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, 3), 3, codes.numel()), codes)


def test_errors():
    with pytest.raises(SpecError, match="bits=9"):
        pack(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(SpecError, match="does not fit"):
        pack(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(SpecError, match="uint8"):
        pack(torch.zeros(4, dtype=torch.int32), 4)
    with pytest.raises(SpecError, match="need 2 bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 4)
