"""QuantSpec = number format + granularity + range estimator (+ how scales are stored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SpecError
from .formats import Format, format_from_dict, format_to_dict, parse_format
from .granularity import (
    Granularity,
    PerChannel,
    granularity_from_dict,
    granularity_to_dict,
    parse_granularity,
)
from .ranges import MinMax, RangeEstimator, estimator_from_dict, estimator_to_dict

SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor. ``scale_dtype`` float16 stores scales in half precision
    (falling back to float32 per tensor when a scale leaves fp16's normal range)."""

    format: Format
    granularity: Granularity = field(default_factory=PerChannel)
    range: RangeEstimator = field(default_factory=MinMax)
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(f"scale_dtype={self.scale_dtype!r} is unknown; allowed: {sorted(SCALE_DTYPES)}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": format_to_dict(self.format),
            "granularity": granularity_to_dict(self.granularity),
            "range": estimator_to_dict(self.range),
            "scale_dtype": self.scale_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Inverse of ``to_dict``; accepts short strings too ('int4', 'group:128', 'mse')."""
        if not isinstance(data, dict):
            raise SpecError(f"a quantization spec must be a mapping, got {data!r}")
        allowed = {"format", "granularity", "range", "scale_dtype"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise SpecError(f"quantization spec: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        if "format" not in data:
            raise SpecError("quantization spec: 'format' is required (e.g. 'int8', 'nf4')")
        fmt = data["format"]
        gran = data.get("granularity", {"type": "channel", "axis": 0})
        kwargs: dict[str, Any] = {
            "format": parse_format(fmt) if isinstance(fmt, str) else format_from_dict(fmt),
            "granularity": parse_granularity(gran) if isinstance(gran, str) else granularity_from_dict(gran),
        }
        if "range" in data:
            kwargs["range"] = estimator_from_dict(data["range"])
        if "scale_dtype" in data:
            kwargs["scale_dtype"] = data["scale_dtype"]
        return cls(**kwargs)

    @property
    def name(self) -> str:
        return f"{self.format.name}/{self.granularity.name}/{self.range.name}"
