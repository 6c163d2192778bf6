"""Formats: field validation, level tables, names and dict round trips."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError, SpecError
from lowbit.formats import (
    Binary,
    Codebook,
    Float,
    Int,
    Log2,
    NormalFloat,
    Ternary,
    format_from_dict,
    format_to_dict,
    parse_format,
)

# NF4 as published with QLoRA (bitsandbytes' table), to 4 decimals.
NF4_QLORA = [
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
]


def test_nf4_matches_qlora_table():
    assert torch.allclose(NormalFloat(4).levels(), torch.tensor(NF4_QLORA), atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_normal_float_levels_have_exact_zero_and_unit_ends(bits):
    levels = NormalFloat(bits).levels()
    assert levels.numel() == 2**bits
    assert (levels == 0).sum() == 1
    assert levels.min() == -1.0 and levels.max() == 1.0
    assert torch.all(levels[1:] > levels[:-1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_log2_levels_are_signed_powers_of_two_and_zero(bits):
    levels = Log2(bits).levels()
    assert levels.numel() == 2**bits - 1
    mags = levels[levels > 0]
    assert torch.equal(torch.log2(mags), torch.round(torch.log2(mags)))
    assert torch.equal(levels, -levels.flip(0))


def test_int_ranges():
    assert (Int(8).qmin, Int(8).qmax) == (-127, 127)
    assert (Int(8, full_range=True).qmin, Int(8, full_range=True).qmax) == (-128, 127)
    assert (Int(4, symmetric=False).qmin, Int(4, symmetric=False).qmax) == (0, 15)
    assert (Int(1, symmetric=False).qmin, Int(1, symmetric=False).qmax) == (0, 1)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Int(0), "bits=0"),
        (lambda: Int(9), "bits=9"),
        (lambda: Int(1), "Binary"),
        (lambda: NormalFloat(5), "bits=5"),
        (lambda: Log2(1), "bits=1"),
        (lambda: Float("fp4"), "fp4"),
        (lambda: Codebook(entries=300, dim=4), "300 entries"),
        (lambda: Codebook(entries=16, dim=2, code_bits=3), "3-bit"),
        (lambda: Codebook(entries=1, dim=2), "entries=1"),
        (lambda: Ternary(threshold=-1), "threshold"),
    ],
)
def test_impossible_specs_name_the_field(make, field):
    with pytest.raises(SpecError, match=field) as info:
        make()
    assert isinstance(info.value, LowbitError)


def test_codebook_code_bits():
    assert Codebook(256, 4).bits == 8
    assert Codebook(16, 2).bits == 4
    assert Codebook(5, 2).bits == 3


ALL = [
    Int(8),
    Int(3, symmetric=False),
    Int(8, full_range=True),
    NormalFloat(3),
    Log2(5),
    Binary(),
    Ternary(),
    Ternary(0.5),
    Float("bf16"),
    Float("fp8_e5m2"),
    Codebook(16, 2),
]


@pytest.mark.parametrize("fmt", ALL, ids=lambda f: f.name)
def test_dict_round_trip(fmt):
    assert format_from_dict(format_to_dict(fmt)) == fmt


@pytest.mark.parametrize(
    "fmt", [f for f in ALL if not isinstance(f, Ternary) or f.threshold == 0.7], ids=lambda f: f.name
)
def test_name_parses_back(fmt):
    if isinstance(fmt, Codebook):
        assert parse_format(fmt.name) == Codebook(fmt.entries, fmt.dim)
    else:
        assert parse_format(fmt.name) == fmt


def test_unknown_keys_and_names_are_errors():
    with pytest.raises(SpecError, match="unknown key"):
        format_from_dict({"type": "int", "bits": 4, "sign": True})
    with pytest.raises(SpecError, match="unknown"):
        format_from_dict({"type": "int5"})
    with pytest.raises(SpecError, match="not understood"):
        parse_format("int4-wat")
    assert parse_format("fp8") == Float("fp8_e4m3")
    assert parse_format("uint4") == Int(4, symmetric=False)
