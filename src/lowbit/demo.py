"""`lowbit demo`: the main job on the bundled real model."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelError
from .evaluate.weights import format_study, linear_weights
from .formats import Binary, Codebook, Float, Int, Log2, NormalFloat, Ternary
from .granularity import PerChannel, PerGroup, PerTensor
from .io import read_safetensors
from .models import builtin_path
from .ranges import MSE
from .spec import QuantSpec


def study_specs() -> list[QuantSpec]:
    """Formats x granularities compared on real weights (scales stored as fp16, like peers)."""
    half = "float16"
    specs = [
        QuantSpec(Int(8), PerTensor(), scale_dtype=half),
        QuantSpec(Int(8), PerChannel(), scale_dtype=half),
        QuantSpec(Int(8), PerGroup(128), scale_dtype=half),
        QuantSpec(Int(4), PerChannel(), scale_dtype=half),
        QuantSpec(Int(4), PerChannel(), MSE(), scale_dtype=half),
        QuantSpec(Int(4), PerGroup(128), scale_dtype=half),
        QuantSpec(Int(4, symmetric=False), PerGroup(128), scale_dtype=half),
        QuantSpec(Int(4), PerGroup(32), scale_dtype=half),
        QuantSpec(Int(3), PerGroup(128), scale_dtype=half),
        QuantSpec(Int(2, symmetric=False), PerGroup(64), scale_dtype=half),
        QuantSpec(NormalFloat(4), PerGroup(64), scale_dtype=half),
        QuantSpec(NormalFloat(4), PerChannel(), scale_dtype=half),
        QuantSpec(NormalFloat(3), PerGroup(64), scale_dtype=half),
        QuantSpec(NormalFloat(2), PerGroup(64), scale_dtype=half),
        QuantSpec(Log2(4), PerChannel(), scale_dtype=half),
        QuantSpec(Ternary(), PerChannel(), scale_dtype=half),
        QuantSpec(Binary(), PerChannel(), scale_dtype=half),
        QuantSpec(Float("fp16"), PerTensor()),
        QuantSpec(Float("bf16"), PerTensor()),
        QuantSpec(Float("fp8_e4m3"), PerChannel(), scale_dtype=half),
        QuantSpec(Float("fp8_e5m2"), PerChannel(), scale_dtype=half),
        QuantSpec(Codebook(256, 4), PerTensor()),
    ]
    return specs


def weights_file(spec: str) -> Path:
    """The safetensors file behind MODEL (builtin:NAME, a directory or a .safetensors file)."""
    path = builtin_path(spec.removeprefix("builtin:")) if spec.startswith("builtin:") else Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{path}: directory holds no .safetensors weights; point at a model directory")
        return files[0]
    if not path.exists():
        raise ModelError(f"{spec}: no such file or directory; check the path")
    return path


def format_study_of(spec: str, specs: list[QuantSpec] | None = None) -> dict:
    """Every format of the core on the Linear weights of MODEL."""
    tensors, _ = read_safetensors(weights_file(spec))
    weights = linear_weights(tensors)
    if not weights:
        raise ModelError(f"{spec}: no 2-D Linear weights found to study")
    return {
        "model": spec,
        "weights": len(weights),
        "parameters": sum(w.numel() for w in weights.values()),
        "rows": format_study(weights, specs or study_specs()),
    }
