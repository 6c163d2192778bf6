"""Recipes: ordered rules mapping layers to a LayerScheme; strict JSON/YAML round trip.

A rule matches a module by name glob and/or type; the first matching rule wins and
unmatched layers stay float. The output head and the embeddings are left float unless the
recipe says ``include_head`` / ``include_embeddings`` or a rule names them exactly, or the recipe
gives them a scheme of their own (``head``: weight-only presets store them in int8, so a vocabulary
head, read in full for every token at batch 1, reads a quarter of the float bytes).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from .errors import LowbitError, SpecError, UnsupportedError
from .formats import Format, Int, format_from_dict, format_to_dict, parse_format
from .granularity import (
    Granularity,
    PerTensor,
    PerToken,
    granularity_from_dict,
    granularity_to_dict,
    parse_granularity,
)
from .ranges import MinMax, RangeEstimator, estimator_from_dict, estimator_to_dict
from .spec import QuantSpec

ACT_MODES = ("none", "dynamic", "static")
LAYER_TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}


@contextlib.contextmanager
def malformed(where: str, error: type[LowbitError] = SpecError) -> Iterator[None]:
    """Turn a parser's TypeError/ValueError/... on a hand-edited or corrupt document into a
    LowbitError naming where it is (LowbitErrors pass through unchanged)."""
    try:
        yield
    except LowbitError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as exc:
        raise error(f"{where}: malformed ({type(exc).__name__}: {exc}); fix the value or re-create the file") from exc


def _strict(data: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """Refuse non-mappings and unknown keys, suggesting the closest allowed key."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpecError(f"{where}: unknown key {key!r}{hint}; allowed: {sorted(allowed)}")
    return data


@dataclass(frozen=True)
class ActivationSpec:
    """How a layer's input is quantized: none (weight-only), dynamic (per token at run time)
    or static (calibrated, per tensor by default)."""

    mode: str = "none"
    format: Format = field(default_factory=lambda: Int(8))
    granularity: Granularity | None = None
    range: RangeEstimator = field(default_factory=MinMax)

    def __post_init__(self) -> None:
        if self.mode not in ACT_MODES:
            raise SpecError(f"activation mode {self.mode!r} is unknown; allowed: {list(ACT_MODES)}")

    @property
    def resolved_granularity(self) -> Granularity:
        if self.granularity is not None:
            return self.granularity
        return PerToken() if self.mode == "dynamic" else PerTensor()

    def to_dict(self) -> dict[str, Any]:
        if self.mode == "none":
            return {"mode": "none"}
        out = {"mode": self.mode, "format": format_to_dict(self.format), "range": estimator_to_dict(self.range)}
        if self.granularity is not None:
            out["granularity"] = granularity_to_dict(self.granularity)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "activation") -> ActivationSpec:
        if isinstance(data, str):
            data = {"mode": data}
        data = _strict(data, {"mode", "format", "granularity", "range"}, where)
        kwargs: dict[str, Any] = {"mode": data.get("mode", "none")}
        if "format" in data:
            fmt = data["format"]
            kwargs["format"] = parse_format(fmt) if isinstance(fmt, str) else format_from_dict(fmt)
        if "granularity" in data:
            g = data["granularity"]
            kwargs["granularity"] = parse_granularity(g) if isinstance(g, str) else granularity_from_dict(g)
        if "range" in data:
            kwargs["range"] = estimator_from_dict(data["range"])
        return cls(**kwargs)


SPARSITY_PATTERNS = ("unstructured", "2:4")
SPARSITY_METHODS = ("magnitude", "sparsegpt")


@dataclass(frozen=True)
class SparsitySpec:
    """Pruning combined with quantization: ``pattern`` unstructured (``ratio`` of the weights
    removed) or 2:4 (two of every four inputs kept); ``method`` magnitude or sparsegpt (Hessian-
    aware, needs calibration data); magnitude ``scope`` per layer or global over the recipe."""

    pattern: str = "2:4"
    ratio: float = 0.5
    method: str = "magnitude"
    scope: str = "layer"

    def __post_init__(self) -> None:
        if self.pattern not in SPARSITY_PATTERNS:
            raise SpecError(f"sparsity pattern {self.pattern!r} is unknown; allowed: {list(SPARSITY_PATTERNS)}")
        if self.method not in SPARSITY_METHODS:
            raise SpecError(f"sparsity method {self.method!r} is unknown; allowed: {list(SPARSITY_METHODS)}")
        if self.scope not in ("layer", "global"):
            raise SpecError(f"sparsity scope {self.scope!r} is unknown; allowed: layer, global")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise SpecError(f"sparsity ratio {self.ratio!r} must lie in (0, 1)")
        if self.pattern == "2:4" and self.ratio != 0.5:
            raise SpecError("2:4 sparsity removes exactly half the weights; leave ratio at 0.5")
        if self.scope == "global" and (self.pattern != "unstructured" or self.method != "magnitude"):
            raise SpecError("global sparsity is for unstructured magnitude pruning")

    @property
    def storage(self) -> str:
        return "2:4" if self.pattern == "2:4" else "bitmask"

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "ratio": self.ratio, "method": self.method, "scope": self.scope}

    @classmethod
    def from_dict(cls, data: Any, where: str = "sparsity") -> SparsitySpec:
        if isinstance(data, str):
            data = {"pattern": data}
        data = _strict(data, {"pattern", "ratio", "method", "scope"}, where)
        return cls(**data)


@dataclass(frozen=True)
class LayerScheme:
    """What happens to one layer: weight spec (None keeps the weight float), activation spec,
    the algorithm that produces the quantized weight, its options, and an optional skip."""

    weight: QuantSpec | None = None
    activation: ActivationSpec = field(default_factory=ActivationSpec)
    algorithm: str = "rtn"
    options: dict[str, Any] = field(default_factory=dict)
    skip: bool = False
    bias_correction: bool = False
    sparsity: SparsitySpec | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.skip:
            return {"skip": True}
        out: dict[str, Any] = {
            "weight": None if self.weight is None else self.weight.to_dict(),
            "activation": self.activation.to_dict(),
            "algorithm": self.algorithm,
        }
        if self.options:
            out["options"] = dict(self.options)
        if self.bias_correction:
            out["bias_correction"] = True
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "scheme") -> LayerScheme:
        with malformed(where):
            return cls._from_dict(data, where)

    @classmethod
    def _from_dict(cls, data: dict[str, Any], where: str) -> LayerScheme:
        if not isinstance(data, dict):
            raise SpecError(f"{where} must be a mapping")
        if data.get("skip"):
            return cls(skip=True)
        kwargs: dict[str, Any] = {}
        if data.get("weight") is not None:
            w = data["weight"]
            kwargs["weight"] = QuantSpec.from_dict({"format": w} if isinstance(w, str) else w)
        if "activation" in data:
            kwargs["activation"] = ActivationSpec.from_dict(data["activation"], f"{where}.activation")
        if "algorithm" in data:
            if not isinstance(data["algorithm"], str):
                raise SpecError(f"{where}.algorithm must be a name such as 'rtn' or 'gptq'")
            kwargs["algorithm"] = data["algorithm"]
        if "options" in data:
            kwargs["options"] = dict(_strict(data["options"], set(data["options"]), f"{where}.options"))
        if "bias_correction" in data:
            if not isinstance(data["bias_correction"], bool):
                raise SpecError(f"{where}.bias_correction must be true or false")
            kwargs["bias_correction"] = data["bias_correction"]
        if data.get("sparsity") is not None:
            kwargs["sparsity"] = SparsitySpec.from_dict(data["sparsity"], f"{where}.sparsity")
        scheme = cls(**kwargs)
        scheme.validate(where)
        return scheme

    def validate(self, where: str = "scheme") -> None:
        """Check the algorithm exists and its options are ones it accepts."""
        if self.skip:
            return
        from .algorithms import algorithm_options

        allowed = algorithm_options(self.algorithm, where)
        _strict(self.options, allowed, f"{where}.options")
        if self.weight is None and self.activation.mode == "none":
            raise SpecError(f"{where}: a scheme needs a weight spec or an activation spec (or skip: true)")
        if self.sparsity is not None:
            wanted = "gptq" if self.sparsity.method == "sparsegpt" else ("rtn", "gptq")
            if self.algorithm not in wanted:
                raise SpecError(
                    f"{where}: {self.sparsity.method} sparsity works with algorithm {wanted}, not {self.algorithm!r}"
                )

    @property
    def needs_calibration(self) -> bool:
        from .algorithms import algorithm_needs_data

        if self.skip:
            return False
        return self.activation.mode == "static" or self.bias_correction or algorithm_needs_data(self.algorithm)


_RULE_KEYS = {"match", "types", "skip", "weight", "activation", "algorithm", "options", "bias_correction", "sparsity"}


@dataclass(frozen=True)
class Rule:
    """``match`` (glob on the module's qualified name) and ``types`` (class names; empty = any
    supported layer) select modules; ``scheme`` says what to do with them."""

    scheme: LayerScheme
    match: str = "*"
    types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in self.types:
            if name not in LAYER_TYPES:
                raise UnsupportedError(f"rule type {name!r} is not a supported layer; supported: {list(LAYER_TYPES)}")

    def matches(self, name: str, module: nn.Module) -> bool:
        types = self.types or tuple(LAYER_TYPES)
        return any(is_layer_type(module, t) for t in types) and fnmatch.fnmatchcase(name, self.match)

    def names_exactly(self, name: str) -> bool:
        return not any(c in self.match for c in "*?[") and self.match == name

    def to_dict(self) -> dict[str, Any]:
        return {"match": self.match, "types": list(self.types), **self.scheme.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Rule:
        data = _strict(data, _RULE_KEYS, where)
        types = data.get("types", [])
        if isinstance(types, str):
            types = [types]
        if not isinstance(data.get("match", "*"), str) or not isinstance(types, list):
            raise SpecError(f"{where}: 'match' must be a glob string and 'types' a list of layer types")
        scheme = LayerScheme.from_dict({k: v for k, v in data.items() if k not in ("match", "types")}, where)
        return cls(scheme=scheme, match=data.get("match", "*"), types=tuple(types))


_RECIPE_KEYS = {"name", "description", "rules", "include_head", "include_embeddings", "head", "base"}


@dataclass(frozen=True)
class Recipe:
    """Ordered rules plus whether the output head and embeddings may be quantized, or the
    scheme they get (``head``: applies to the output head and every embedding table)."""

    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    include_head: bool = False
    include_embeddings: bool = False
    head: LayerScheme | None = None

    def resolve(self, model: nn.Module) -> dict[str, LayerScheme]:
        """Which layer gets which scheme (a rule naming the layer exactly, then ``head`` for the
        output head and embeddings, then the first matching rule; skipped layers omitted)."""
        head = output_head_name(model)
        plan: dict[str, LayerScheme] = {}
        for name, module in model.named_modules():
            if not any(is_layer_type(module, t) for t in LAYER_TYPES) or not name:
                continue
            vocabulary = name == head or isinstance(module, nn.Embedding)
            protected = (name == head and not self.include_head) or (
                isinstance(module, nn.Embedding) and not self.include_embeddings
            )
            exact = next((r for r in self.rules if r.names_exactly(name) and r.matches(name, module)), None)
            if exact is None and _custom_embedding(module):
                continue  # e.g. OPT's learned positions: its own forward (offsets, position ids) would be lost
            if exact is None and vocabulary and self.head is not None:
                if not self.head.skip:
                    plan[name] = self.head
                continue
            for rule in self.rules:
                if rule.matches(name, module) and (not protected or rule.names_exactly(name)):
                    if not rule.scheme.skip:
                        plan[name] = rule.scheme
                    break
        return plan

    @property
    def needs_calibration(self) -> bool:
        return any(rule.scheme.needs_calibration for rule in self.rules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "include_head": self.include_head,
            "include_embeddings": self.include_embeddings,
            "head": None if self.head is None else self.head.to_dict(),
            "rules": [rule.to_dict() for rule in self.rules],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        with malformed(where):
            return cls._from_dict(data, where)

    @classmethod
    def _from_dict(cls, data: Any, where: str) -> Recipe:
        data = _strict(data, _RECIPE_KEYS, where)
        if not isinstance(data.get("rules", []), list):
            raise SpecError(f"{where}.rules must be a list of rules")
        rules = tuple(Rule.from_dict(r, f"{where}.rules[{i}]") for i, r in enumerate(data.get("rules", [])))
        base = None
        if "base" in data:
            from .presets import get_preset

            base = get_preset(data["base"])
            rules = rules + base.rules
        if not rules:
            raise SpecError(f"{where}: no rules; add at least one rule or a 'base' preset")
        for key in ("include_head", "include_embeddings"):
            if key in data and not isinstance(data[key], bool):
                raise SpecError(f"{where}.{key} must be true or false")
        head = base.head if base else None
        if "head" in data:
            head = None if data["head"] is None else LayerScheme.from_dict(data["head"], f"{where}.head")
        if head is not None and head.activation.mode != "none":
            raise SpecError(f"{where}.head: the output head and embeddings take a weight-only scheme (no activation)")
        return cls(
            name=str(data.get("name", base.name if base else "custom")),
            rules=rules,
            description=str(data.get("description", base.description if base else "")),
            include_head=data.get("include_head", base.include_head if base else False),
            include_embeddings=data.get("include_embeddings", base.include_embeddings if base else False),
            head=head,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_name(self, name: str) -> Recipe:
        return replace(self, name=name)


def read_recipe_file(path: str | Path) -> Recipe:
    """A recipe from a .json or .yaml/.yml file, strictly validated."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not a UTF-8 text file ({exc}); save the recipe as UTF-8 JSON or YAML") from exc
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: both mean a malformed file
        raise SpecError(f"{path}: cannot parse the recipe ({exc})") from exc
    return Recipe.from_dict(data, where=str(path))


def is_layer_type(module: nn.Module, type_name: str) -> bool:
    """``module`` is a layer of LAYER_TYPES[type_name]; GPT-2's Conv1D counts as a Linear."""
    from .nn.transposed import is_conv1d

    return isinstance(module, LAYER_TYPES[type_name]) or (type_name == "Linear" and is_conv1d(module))


def _custom_embedding(module: nn.Module) -> bool:
    """An Embedding subclass with a forward of its own, which a QEmbedding cannot stand in for."""
    return isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward


def resolve_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A Recipe from a Recipe, a preset name, or a path to a JSON/YAML file."""
    if isinstance(recipe, Recipe):
        return recipe
    text = str(recipe)
    if text.endswith((".json", ".yaml", ".yml")) or Path(text).is_file():
        return read_recipe_file(text)
    from .presets import get_preset

    return get_preset(text)


def output_head_name(model: nn.Module) -> str | None:
    """The output head: a Hugging Face model's output embeddings, else the last Linear layer."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    last = None
    for name, module in model.named_modules():
        if head is not None and module is head:
            return name
        if isinstance(module, nn.Linear):
            last = name
    return last
