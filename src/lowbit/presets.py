"""Named recipes with stable names (DESIGN.md); each has a one-line description."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable

from .errors import SpecError
from .formats import Binary, Codebook, Float, Format, Int, Log2, NormalFloat, Ternary
from .granularity import Granularity, PerChannel, PerGroup, PerTensor
from .ranges import MSE
from .recipe import ActivationSpec, LayerScheme, Recipe, Rule, SparsitySpec
from .spec import QuantSpec

DYNAMIC_INT8 = ActivationSpec("dynamic", Int(8))
# Static activation ranges by MSE search, not min-max: on SmolLM2 (W8A8 + SmoothQuant 0.5, 32 x 512
# calibration) 28.448 vs 29.810 perplexity (float 24.938); percentile 99.99 clips the model's
# rare huge activations and gets 59.958 (closing notes). With alpha 0.8 and 128 x 512 calibration:
# 25.226, without SmoothQuant 32.718 (bench/results/llm_accuracy_w8a8_mse.json).
STATIC_UINT8 = ActivationSpec("static", Int(8, symmetric=False), range=MSE())
# The output head and embedding tables of the weight-only presets: int8 per row (per output
# channel of the head). A tied LM head is read in full for every decoded token; in float it is
# often the largest single read of a 4-bit model (SmolLM2: 113 MB of 169 MB).
INT8_HEAD = LayerScheme(QuantSpec(Int(8), PerChannel(), scale_dtype="float32"))


def _weights(
    fmt: Format,
    gran: Granularity | None = None,
    activation: ActivationSpec | None = None,
    algorithm: str = "rtn",
    scale_dtype: str = "float16",
    sparsity: SparsitySpec | None = None,
    **options,
) -> tuple[Rule, ...]:
    spec = QuantSpec(fmt, gran or PerChannel(), scale_dtype=scale_dtype)
    scheme = LayerScheme(spec, activation or ActivationSpec(), algorithm, dict(options), sparsity=sparsity)
    return (Rule(scheme, types=("Linear", "Conv2d")),)


_TABLE: dict[str, tuple[str, Callable[[], tuple[Rule, ...]]]] = {
    "int8-dynamic": (
        "int8 per-channel weights x int8 per-token activations at run time, SmoothQuant-balanced (W8A8)",
        lambda: _weights(Int(8), activation=DYNAMIC_INT8, algorithm="smoothquant", scale_dtype="float32", alpha="auto"),
    ),
    "int8-dynamic-rtn": (
        "int8 per-channel weights x int8 per-token activations, no calibration data (plain W8A8)",
        lambda: _weights(Int(8), activation=DYNAMIC_INT8, scale_dtype="float32"),
    ),
    "w8a8-static": (
        "int8 per-channel weights x uint8 per-tensor activations calibrated ahead of time, SmoothQuant-balanced",
        lambda: _weights(Int(8), activation=STATIC_UINT8, algorithm="smoothquant", scale_dtype="float32", alpha="auto"),
    ),
    "w8-weight": (
        "int8 per-channel weights, float activations (weight-only)",
        lambda: _weights(Int(8), scale_dtype="float32"),
    ),
    "w4-g128": (
        "4-bit asymmetric weights in groups of 128, fp16 scales, float activations",
        lambda: _weights(Int(4, symmetric=False), PerGroup(128)),
    ),
    "w3-g128": (
        "3-bit asymmetric weights in groups of 128, round-to-nearest",
        lambda: _weights(Int(3, symmetric=False), PerGroup(128)),
    ),
    "w2-g64": (
        "2-bit asymmetric weights in groups of 64, round-to-nearest",
        lambda: _weights(Int(2, symmetric=False), PerGroup(64)),
    ),
    "w4-g128-gptq": (
        "4-bit asymmetric groups of 128 by GPTQ (Hessian-aware, act-order), calibrated",
        lambda: _weights(Int(4, symmetric=False), PerGroup(128), algorithm="gptq"),
    ),
    "w4-g128-awq": (
        "4-bit asymmetric groups of 128 by AWQ (activation-aware scales + clipping), calibrated",
        lambda: _weights(Int(4, symmetric=False), PerGroup(128), algorithm="awq"),
    ),
    "w4-g128-hqq": (
        "4-bit asymmetric groups of 128 by HQQ (zero points optimised, no data)",
        lambda: _weights(Int(4, symmetric=False), PerGroup(128), algorithm="hqq"),
    ),
    "w3-g128-gptq": (
        "3-bit asymmetric groups of 128 by GPTQ, calibrated",
        lambda: _weights(Int(3, symmetric=False), PerGroup(128), algorithm="gptq"),
    ),
    "w3-g128-awq": (
        "3-bit asymmetric groups of 128 by AWQ, calibrated",
        lambda: _weights(Int(3, symmetric=False), PerGroup(128), algorithm="awq"),
    ),
    "w3-g128-hqq": (
        "3-bit asymmetric groups of 128 by HQQ (no data)",
        lambda: _weights(Int(3, symmetric=False), PerGroup(128), algorithm="hqq"),
    ),
    "w2-g64-gptq": (
        "2-bit asymmetric groups of 64 by GPTQ, calibrated",
        lambda: _weights(Int(2, symmetric=False), PerGroup(64), algorithm="gptq"),
    ),
    "w2-g64-awq": (
        "2-bit asymmetric groups of 64 by AWQ, calibrated",
        lambda: _weights(Int(2, symmetric=False), PerGroup(64), algorithm="awq"),
    ),
    "w2-g64-hqq": (
        "2-bit asymmetric groups of 64 by HQQ (zero points optimised, no data)",
        lambda: _weights(Int(2, symmetric=False), PerGroup(64), algorithm="hqq"),
    ),
    "int8-outliers": (
        "int8 per-token x per-channel, activation outlier channels (|x| > 6) kept in float (LLM.int8)",
        lambda: _weights(Int(8), activation=DYNAMIC_INT8, algorithm="outliers", scale_dtype="float32"),
    ),
    "w4-g128-2of4": (
        "2:4 sparse (magnitude) + 4-bit asymmetric groups of 128: about 3 bits per weight",
        lambda: _weights(Int(4, symmetric=False), PerGroup(128), sparsity=SparsitySpec("2:4")),
    ),
    "w4-g128-2of4-sparsegpt": (
        "2:4 sparse + 4-bit groups of 128, pruned and quantized jointly by SparseGPT, calibrated",
        lambda: _weights(
            Int(4, symmetric=False), PerGroup(128), algorithm="gptq", sparsity=SparsitySpec("2:4", method="sparsegpt")
        ),
    ),
    "nf4-g64": (
        "NF4 (normal-quantile 4-bit) weights in groups of 64, fp16 absmax scales",
        lambda: _weights(NormalFloat(4), PerGroup(64)),
    ),
    "fp8": (
        "fp8 e4m3 per-channel weights x fp8 e4m3 per-token dynamic activations",
        lambda: _weights(
            Float("fp8_e4m3"), activation=ActivationSpec("dynamic", Float("fp8_e4m3")), scale_dtype="float32"
        ),
    ),
    "fp16": ("weights stored as float16", lambda: _weights(Float("fp16"), PerTensor())),
    "bf16": ("weights stored as bfloat16", lambda: _weights(Float("bf16"), PerTensor())),
    "binary": ("1-bit sign weights x per-channel mean |w| (use QAT to recover)", lambda: _weights(Binary())),
    "ternary": ("ternary {-1, 0, +1} weights, TWN threshold, per channel", lambda: _weights(Ternary())),
    "log2-4": ("4-bit power-of-two weights (sign + exponent) per channel", lambda: _weights(Log2(4))),
    "vq-2bit": (
        "vector quantization: 256-entry k-means codebook over 4-weight vectors (2 bits/weight)",
        lambda: _weights(Codebook(256, 4), PerTensor(), scale_dtype="float32"),
    ),
    "w4a8": (
        "4-bit symmetric weights in groups of 128 x int8 per-token dynamic activations",
        lambda: _weights(Int(4), PerGroup(128), activation=DYNAMIC_INT8),
    ),
    "w2a8": (
        "2-bit asymmetric weights in groups of 64 x int8 per-token dynamic activations",
        lambda: _weights(Int(2, symmetric=False), PerGroup(64), activation=DYNAMIC_INT8),
    ),
    "ternary-a8": (
        "ternary weights x int8 per-token dynamic activations",
        lambda: _weights(Ternary(), activation=DYNAMIC_INT8),
    ),
    "binary-a8": (
        "binary weights x int8 per-token dynamic activations",
        lambda: _weights(Binary(), activation=DYNAMIC_INT8),
    ),
}


# Weight-only presets of 8 bits or fewer per weight: their head and embeddings are stored in int8.
_INT8_HEAD = frozenset(
    [
        "w8-weight",
        *(f"{base}{alg}" for base in ("w4-g128", "w3-g128", "w2-g64") for alg in ("", "-gptq", "-awq", "-hqq")),
        "w4-g128-2of4",
        "w4-g128-2of4-sparsegpt",
        "nf4-g64",
    ]
)


def _all() -> dict[str, tuple[str, Callable[[], tuple[Rule, ...]]]]:
    return _TABLE


def preset_names() -> list[str]:
    return list(_all())


def describe_presets() -> dict[str, str]:
    """Preset name -> one-line description, in a stable order."""
    return {name: desc for name, (desc, _) in _all().items()}


# Any weight-only grid by name: w<bits>-g<group> (e.g. w5-g64, w3-g32), asymmetric round-to-nearest
# with fp16 scales like w4-g128. Mixed-precision plans choose among many of these.
_GRID_NAME = re.compile(r"w(\d+)-g(\d+)")
GRID_GROUPS = tuple(2**i for i in range(4, 11))  # 16 ... 1024


def weight_grid(name: str) -> tuple[str, Callable[[], tuple[Rule, ...]]] | None:
    """(description, rules) of a ``w<bits>-g<group>`` name, None for other names; out-of-range
    bits or groups are a SpecError that names the valid range (and a close preset)."""
    match = _GRID_NAME.fullmatch(name)
    if match is None:
        return None
    bits, group = int(match.group(1)), int(match.group(2))
    if not (2 <= bits <= 8 and group in GRID_GROUPS):
        close = difflib.get_close_matches(name, _all(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError(
            f"recipe {name!r}: a w<bits>-g<group> name takes 2-8 bits and a group of 16, 32, ... 1024 "
            f"weights (e.g. w5-g64){hint}"
        )
    desc = f"{bits}-bit asymmetric weights in groups of {group}, fp16 scales, round-to-nearest"
    return desc, lambda: _weights(Int(bits, symmetric=False), PerGroup(group))


def get_preset(name: str) -> Recipe:
    """The named preset, or a ``w<bits>-g<group>`` grid; a typo gets the closest name suggested."""
    table = _all()
    entry = table.get(name) or weight_grid(name)
    if entry is None:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError(
            f"recipe {name!r} is not a preset, a w<bits>-g<group> grid or a recipe file{hint} (see `lowbit recipes`)"
        )
    desc, rules = entry
    head = INT8_HEAD if name in _INT8_HEAD or name not in table else None
    return Recipe(name=name, rules=rules(), description=desc, head=head)
