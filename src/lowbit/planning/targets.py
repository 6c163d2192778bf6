"""Hardware targets: what each one's kernels run fast, so plans and presets only use that.

A target accepts a LayerScheme when its weight format/granularity, activation mode and
sparsity match one of the kernel families it declares. ``check(model)`` lists the layers of
a quantized model that would fall back (to a slower path, or to float) on the target.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SpecError
from ..formats import Binary, Codebook, Float, Int, Log2, NormalFloat, Ternary
from ..granularity import PerGroup, PerTensor, PerToken
from ..recipe import LayerScheme


@dataclass(frozen=True)
class Family:
    """One kernel family: weights (format kind, bits, granularities), activation modes and
    formats, sparsity patterns it accepts."""

    name: str
    weight_kinds: tuple[str, ...]  # "int", "nf", "log2", "binary", "ternary", "codebook", "fp16", "bf16", "fp8"
    weight_bits: tuple[int, ...]
    granularities: tuple[str, ...]  # "channel", "group", "tensor"
    activations: tuple[str, ...]  # "none", "dynamic-int8", "static-int8", "static-int8-sym", "dynamic-fp8"
    group_sizes: tuple[int, int] = (32, 256)
    sparsity: tuple[str, ...] = ()
    symmetric_only: bool = False


def _weight_kind(fmt) -> str:
    if isinstance(fmt, Int):
        return "int"
    if isinstance(fmt, NormalFloat):
        return "nf"
    if isinstance(fmt, Log2):
        return "log2"
    if isinstance(fmt, Binary):
        return "binary"
    if isinstance(fmt, Ternary):
        return "ternary"
    if isinstance(fmt, Codebook):
        return "codebook"
    return "fp8" if fmt.bits == 8 else fmt.dtype


def _activation_kind(scheme: LayerScheme) -> str:
    act = scheme.activation
    if act.mode == "none":
        return "none"
    fmt = act.format
    if isinstance(fmt, Float):
        return f"{act.mode}-fp8" if fmt.bits == 8 else f"{act.mode}-{fmt.dtype}"
    if not isinstance(fmt, Int) or fmt.bits != 8:
        return f"{act.mode}-{fmt.name}"
    gran = act.resolved_granularity
    if act.mode == "static" and not isinstance(gran, PerTensor):
        return "static-int8-per-channel"
    if act.mode == "dynamic" and not isinstance(gran, (PerToken, PerTensor)):
        return "dynamic-int8-other"
    suffix = "-sym" if act.mode == "static" and fmt.symmetric else ""
    return f"{act.mode}-int8{suffix}"


@dataclass(frozen=True)
class Target:
    """A deployment target and the kernel families it runs."""

    name: str
    description: str
    families: tuple[Family, ...]

    def supports(self, scheme: LayerScheme) -> tuple[bool, str]:
        """(True, family name) when a family runs the scheme, else (False, the reason)."""
        if scheme.skip or scheme.weight is None:
            return True, "float"
        fmt, gran = scheme.weight.format, scheme.weight.granularity
        kind, act = _weight_kind(fmt), _activation_kind(scheme)
        gkind = gran.name.split(":")[0]
        sparsity = None if scheme.sparsity is None else scheme.sparsity.pattern
        reasons = []
        for fam in self.families:
            if kind not in fam.weight_kinds or fmt.bits not in fam.weight_bits:
                reasons.append(f"{fam.name}: weights {fmt.name}")
            elif gkind not in fam.granularities:
                reasons.append(f"{fam.name}: granularity {gran.name}")
            elif isinstance(gran, PerGroup) and not fam.group_sizes[0] <= gran.size <= fam.group_sizes[1]:
                reasons.append(f"{fam.name}: group size {gran.size}")
            elif act not in fam.activations:
                reasons.append(f"{fam.name}: activations {act}")
            elif sparsity is not None and sparsity not in fam.sparsity:
                reasons.append(f"{fam.name}: sparsity {sparsity}")
            elif fam.symmetric_only and isinstance(fmt, Int) and not fmt.symmetric:
                reasons.append(f"{fam.name}: asymmetric weights")
            else:
                return True, fam.name
        return False, f"{self.name} has no kernel for this scheme ({'; '.join(reasons)})"

    def check(self, plan: dict[str, LayerScheme]) -> dict[str, str]:
        """Layers of a plan that fall back on this target, with the reason."""
        fallbacks = {}
        for name, scheme in plan.items():
            ok, why = self.supports(scheme)
            if not ok:
                fallbacks[name] = why
        return fallbacks


LUT_KINDS = ("nf", "log2", "binary", "ternary")
_W8A8 = Family(
    "w8a8-int8", ("int",), (8,), ("channel",), ("dynamic-int8", "static-int8", "static-int8-sym"), symmetric_only=True
)
_WEIGHT_ONLY_X86 = Family("weight-only", ("int", *LUT_KINDS), (1, 2, 3, 4, 8), ("channel", "group"), ("none",))
TARGETS: dict[str, Target] = {
    "x86": Target(
        "x86",
        "AVX-512 VNNI/BF16 CPUs: int8 W8A8, int/NF/log2 weight-only 1-8 bit, codebooks, bf16",
        (
            _W8A8,
            _WEIGHT_ONLY_X86,
            Family("codebook", ("codebook",), (1, 2, 3, 4, 5, 6, 7, 8), ("tensor", "group"), ("none",)),
            Family("float", ("bf16", "fp16"), (16,), ("tensor", "channel", "group"), ("none",)),
        ),
    ),
    "arm": Target(
        "arm",
        "ARM CPUs: int8 W8A8 and int8/int4 weight-only (portable kernels)",
        (
            _W8A8,
            Family("weight-only", ("int",), (4, 8), ("channel", "group"), ("none",)),
            Family("float", ("fp16", "bf16"), (16,), ("tensor", "channel", "group"), ("none",)),
        ),
    ),
    "cuda": Target(
        "cuda",
        "NVIDIA GPUs: int8 (_int_mm), int4 weight-only, fp8 on sm89+, 2:4 sparse, fp16/bf16",
        (
            _W8A8,
            Family("weight-only-int4", ("int",), (4, 8), ("group", "channel"), ("none",), sparsity=("2:4",)),
            Family("fp8", ("fp8",), (8,), ("channel", "tensor"), ("dynamic-fp8", "none")),
            Family("float", ("fp16", "bf16"), (16,), ("tensor", "channel", "group"), ("none",), sparsity=("2:4",)),
        ),
    ),
    "edge": Target(
        "edge",
        "NPUs / edge accelerators: int8 per-channel weights x int8 static per-tensor symmetric activations only",
        (Family("npu-int8", ("int",), (8,), ("channel",), ("static-int8-sym",), symmetric_only=True),),
    ),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise SpecError(f"target {name!r} is unknown; choose one of {sorted(TARGETS)}")
    return TARGETS[name]


def fallbacks_by_target(schemes: dict[str, LayerScheme]) -> dict[str, dict[str, str]]:
    """Per target, the layers of a quantized model (name -> scheme) that fall back there, with why."""
    return {name: target.check(schemes) for name, target in TARGETS.items()}


def checkpoint_schemes(manifest: dict) -> dict[str, LayerScheme]:
    """The per-layer schemes a lowbit checkpoint's manifest (lowbit.json) records."""
    layers = manifest.get("layers")
    if not isinstance(layers, dict):
        raise SpecError("lowbit.json has no 'layers' table; is this a lowbit checkpoint?")
    return {
        name: LayerScheme.from_dict(entry["scheme"], where=f"lowbit.json layers.{name}.scheme")
        for name, entry in layers.items()
        if isinstance(entry, dict) and isinstance(entry.get("scheme"), dict)
    }
