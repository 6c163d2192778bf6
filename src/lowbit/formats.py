"""Number formats: which values a code can stand for. One frozen dataclass per family.

Formats only describe; the arithmetic that uses them lives in ``primitives.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from typing import Any, ClassVar

import torch

from .errors import SpecError

_FLOAT_DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def _check_bits(name: str, bits: Any, allowed: range | tuple[int, ...]) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        shown = f"{allowed.start}..{allowed.stop - 1}" if isinstance(allowed, range) else allowed
        raise SpecError(f"{name}: bits={bits!r} is impossible; allowed values are {shown}")


@dataclass(frozen=True)
class Int:
    """Uniform integer grid of ``bits`` bits.

    Symmetric: signed codes in [-(2^(b-1)-1), 2^(b-1)-1] (``full_range`` adds -2^(b-1)),
    zero point fixed at 0. Asymmetric: codes in [0, 2^b-1] with an integer zero point.
    """

    bits: int = 8
    symmetric: bool = True
    full_range: bool = False
    kind: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        _check_bits("Int", self.bits, range(1, 9))
        if self.symmetric and self.bits == 1 and not self.full_range:
            raise SpecError(
                "Int(bits=1, symmetric=True) has only the level 0; use Binary() for sign "
                "quantization or Int(bits=1, symmetric=False)"
            )

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        half = 2 ** (self.bits - 1)
        return -half if self.full_range else -(half - 1)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1

    @property
    def needs_zero_point(self) -> bool:
        return not self.symmetric

    @property
    def name(self) -> str:
        suffix = "" if self.symmetric else "-asym"
        return f"int{self.bits}{suffix}{'-full' if self.full_range else ''}"


def _normal_float_levels(bits: int) -> torch.Tensor:
    """Quantiles of N(0,1) with an exact zero, normalised to [-1, 1] (QLoRA's NF construction)."""
    n = 2**bits
    offset = 1.0 - 0.5 * (1.0 / (2 * n) + 1.0 / (2 * (n - 1)))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    levels = levels / levels.abs().max()
    return torch.sort(levels).values.float()


@cache
def _cached_levels(kind: str, bits: int) -> torch.Tensor:
    if kind == "nf":
        return _normal_float_levels(bits)
    if kind == "log2":
        mags = torch.tensor([2.0 ** (-k) for k in range(2 ** (bits - 1) - 1)], dtype=torch.float32)
        return torch.sort(torch.cat([-mags, torch.zeros(1), mags])).values
    if kind == "binary":
        return torch.tensor([-1.0, 1.0])
    if kind == "ternary":
        return torch.tensor([-1.0, 0.0, 1.0])
    raise SpecError(f"no level table for format kind {kind!r}")


class _LevelTable:
    """Base of the formats whose codes index a fixed table of levels in [-1, 1]."""

    kind: ClassVar[str] = "lut"

    def levels(self) -> torch.Tensor:
        """Normalised levels, ascending, float32; value = scale * levels[code]."""
        return _cached_levels(self.table, self.bits).clone()  # type: ignore[attr-defined]

    @property
    def needs_zero_point(self) -> bool:
        return False


@dataclass(frozen=True)
class NormalFloat(_LevelTable):
    """NF-b: 2^b quantiles of a normal distribution scaled by the group's absmax (NF4 at b=4)."""

    bits: int = 4
    table: ClassVar[str] = "nf"

    def __post_init__(self) -> None:
        _check_bits("NormalFloat", self.bits, (2, 3, 4))

    @property
    def name(self) -> str:
        return f"nf{self.bits}"


@dataclass(frozen=True)
class Log2(_LevelTable):
    """Sign plus power-of-two magnitudes 2^0 .. 2^-(2^(b-1)-2), and zero, times the absmax."""

    bits: int = 4
    table: ClassVar[str] = "log2"

    def __post_init__(self) -> None:
        _check_bits("Log2", self.bits, range(2, 9))

    @property
    def name(self) -> str:
        return f"log2-{self.bits}"


@dataclass(frozen=True)
class Binary(_LevelTable):
    """Sign times a per-group scale equal to mean |w| (the L2-optimal scale for sign codes)."""

    bits: ClassVar[int] = 1
    table: ClassVar[str] = "binary"
    name: ClassVar[str] = "binary"


@dataclass(frozen=True)
class Ternary(_LevelTable):
    """{-1, 0, +1} times a scale (TWN): keep |w| > threshold * mean|w|, scale = mean of kept |w|."""

    threshold: float = 0.7
    bits: ClassVar[int] = 2
    table: ClassVar[str] = "ternary"
    name: ClassVar[str] = "ternary"

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold < 2.0):
            raise SpecError(f"Ternary: threshold={self.threshold!r} must lie in (0, 2); TWN uses 0.7")


@dataclass(frozen=True)
class Float:
    """A torch floating-point dtype; fp8 carries a per-group scale mapping absmax to the dtype max."""

    dtype: str = "fp16"
    kind: ClassVar[str] = "float"

    def __post_init__(self) -> None:
        if self.dtype not in _FLOAT_DTYPES:
            raise SpecError(f"Float: dtype={self.dtype!r} is unknown; allowed: {sorted(_FLOAT_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _FLOAT_DTYPES[self.dtype]

    @property
    def bits(self) -> int:
        return torch.finfo(self.torch_dtype).bits

    @property
    def scaled(self) -> bool:
        """fp8 needs a scale to use its narrow range; fp16/bf16 are plain casts."""
        return self.bits == 8

    @property
    def max_value(self) -> float:
        return float(torch.finfo(self.torch_dtype).max)

    @property
    def needs_zero_point(self) -> bool:
        return False

    @property
    def name(self) -> str:
        return self.dtype


@dataclass(frozen=True)
class Codebook:
    """Vector quantization: k-means over ``dim``-long sub-vectors, codes of ceil(log2(entries)) bits."""

    entries: int = 256
    dim: int = 4
    code_bits: int | None = None
    iters: int = 25
    seed: int = 0
    kind: ClassVar[str] = "codebook"
    _resolved_bits: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for key in ("entries", "dim", "iters", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"Codebook: {key}={value!r} must be an integer")
        if self.entries < 2:
            raise SpecError(f"Codebook: entries={self.entries} must be at least 2")
        if not 1 <= self.dim <= 64:
            raise SpecError(f"Codebook: dim={self.dim} must lie in 1..64")
        if self.iters < 0:
            raise SpecError(f"Codebook: iters={self.iters} must be >= 0")
        needed = max(1, math.ceil(math.log2(self.entries)))
        bits = min(needed, 8) if self.code_bits is None else self.code_bits
        _check_bits("Codebook code_bits", bits, range(1, 9))
        if self.entries > 2**bits:
            raise SpecError(
                f"Codebook: {self.entries} entries cannot be addressed by {bits}-bit codes "
                f"(at most {2**bits}); lower entries or raise code_bits (max 8, 256 entries)"
            )
        object.__setattr__(self, "_resolved_bits", bits)

    @property
    def bits(self) -> int:
        return self._resolved_bits

    @property
    def needs_zero_point(self) -> bool:
        return False

    @property
    def name(self) -> str:
        return f"vq{self.entries}x{self.dim}"


Format = Int | NormalFloat | Log2 | Binary | Ternary | Float | Codebook
_BY_TYPE: dict[str, type] = {
    "int": Int,
    "nf": NormalFloat,
    "log2": Log2,
    "binary": Binary,
    "ternary": Ternary,
    "float": Float,
    "codebook": Codebook,
}
_TYPE_OF = {cls: key for key, cls in _BY_TYPE.items()}


def format_to_dict(fmt: Format) -> dict[str, Any]:
    """Plain-JSON description of a format (inverse of ``format_from_dict``)."""
    data = {k: v for k, v in asdict(fmt).items() if not k.startswith("_")}
    return {"type": _TYPE_OF[type(fmt)], **data}


def format_from_dict(data: dict[str, Any]) -> Format:
    """Build a format from ``format_to_dict`` output, refusing unknown types and keys."""
    if not isinstance(data, dict) or "type" not in data:
        raise SpecError(f"format must be a mapping with a 'type' key, got {data!r}")
    kind = data["type"]
    if kind not in _BY_TYPE:
        raise SpecError(f"format type {kind!r} is unknown; allowed: {sorted(_BY_TYPE)}")
    cls = _BY_TYPE[kind]
    given = {k: v for k, v in data.items() if k != "type"}
    allowed = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise SpecError(f"format {kind!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**given)


def parse_format(text: str) -> Format:
    """Parse a short name: int4, int8-asym, int8-full, nf4, log2-4, binary, ternary, fp16,
    bf16, fp8 (= fp8_e4m3), fp8_e5m2, vq256x4."""
    name = text.strip().lower()
    try:
        if name in ("binary", "ternary"):
            return Binary() if name == "binary" else Ternary()
        if name in _FLOAT_DTYPES or name == "fp8":
            return Float("fp8_e4m3" if name == "fp8" else name)
        if name.startswith("nf"):
            return NormalFloat(int(name[2:]))
        if name.startswith("log2-"):
            return Log2(int(name[5:]))
        if name.startswith("vq"):
            entries, dim = name[2:].split("x")
            return Codebook(int(entries), int(dim))
        if name.startswith(("int", "uint")):
            base, *flags = name.split("-")
            bits = int(base[4:] if base.startswith("uint") else base[3:])
            unknown = set(flags) - {"asym", "full"}
            if unknown:
                raise ValueError(unknown)
            asym = base.startswith("uint") or "asym" in flags
            return Int(bits, symmetric=not asym, full_range="full" in flags)
    except SpecError:
        raise
    except (ValueError, IndexError):
        pass
    raise SpecError(
        f"format {text!r} is not understood; examples: int8, int4-asym, nf4, log2-4, binary, "
        "ternary, fp16, bf16, fp8, fp8_e5m2, vq256x4"
    )
