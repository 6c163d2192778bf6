"""The lowbit checkpoint: ``model.safetensors`` (codes, scales, zeros, float tensors) +
``lowbit.json`` (format version, recipe, per-layer schemes, source model and its SHA-256,
library versions). Written to a temporary directory and renamed; loading never unpickles
and needs no float weights."""

from __future__ import annotations

import contextlib
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, LowbitError
from ..io import atomic_dir, check_replaceable, read_safetensors, write_json, write_safetensors
from ..models import (
    ImagePreprocess,
    Loaded,
    efficientnet_preprocess,
    efficientnet_skeleton,
    hf_image_preprocess,
    read_json,
)
from ..nn import QModule, set_submodule, to_quantized
from ..nn.transposed import conv1d_as_linear, is_conv1d
from ..quantize import QuantizationRecord
from ..recipe import LayerScheme, Recipe, malformed
from ..tensor import QTensor

FORMAT = "lowbit-checkpoint"
FORMAT_VERSION = 2  # 2: quantized layers may share tensors (a tied int8 table); 1 otherwise
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded weights: tensor name -> shard file
MANIFEST = "lowbit.json"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("lowbit", "torch", "transformers", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _architecture(module: nn.Module, arch: dict[str, Any]) -> dict[str, Any]:
    if arch.get("type") in ("hf", "builtin"):
        return {k: v for k, v in arch.items() if k in ("type", "auto_class", "hf_class", "builtin", "kind")}
    if hasattr(module, "config") and hasattr(module, "save_pretrained"):
        from ..models import _AUTO_CLASS, _kind_of

        kind = _kind_of(module.config, module)
        return {"type": "hf", "auto_class": _AUTO_CLASS[kind], "hf_class": type(module).__name__, "kind": kind}
    return {"type": "module", "class": f"{type(module).__module__}.{type(module).__qualname__}"}


def _unique_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with tied tensors stored once; ``tied`` maps each alias to its owner."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, tied


def manifest_version(tied: dict[str, str], layers: dict[str, Any]) -> int:
    """2 when a quantized layer's tensor is stored under another layer's name (lowbit before
    version 2 cannot read that and says to upgrade), else 1 (readable by every version)."""
    prefixes = tuple(f"{name}." for name in layers)
    return 2 if any(alias.startswith(prefixes) for alias in tied) else 1


def layer_entry(layer: QModule, scheme: LayerScheme) -> dict[str, Any]:
    """What lowbit.json records of one quantized layer (enough to rebuild it from its tensors)."""
    return {
        "module": type(layer).__name__,
        "scheme": scheme.to_dict(),
        "weight": layer.qweight.meta(),
        "static_input": layer.input_scale is not None,
        "input_smooth": layer.input_smooth is not None,
        "outliers": layer.outlier_index is not None,
        "bias": layer.bias is not None,
    }


def save(model: nn.Module | Loaded, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a quantized model to ``directory`` atomically (never half-written)."""
    loaded = model if isinstance(model, Loaded) else None
    module = loaded.model if loaded is not None else model
    record: QuantizationRecord | None = getattr(module, "lowbit", None)
    if record is None:
        raise CheckpointError("this model was not quantized by lowbit.quantize(); nothing to save as a checkpoint")
    directory = Path(directory)
    check_replaceable(directory, MANIFEST, "lowbit checkpoint")
    if tokenizer is None and loaded is not None:
        tokenizer = loaded.tokenizer
    tensors, tied = _unique_state(module)
    layers = {}
    for name, scheme in record.schemes.items():
        layer = module.get_submodule(name)
        if not isinstance(layer, QModule):
            raise CheckpointError(f"{name}: recorded as quantized but is {type(layer).__name__}")
        layers[name] = layer_entry(layer, scheme)
    arch = _architecture(module, loaded.meta if loaded is not None and loaded.meta else record.architecture)
    manifest = {
        "format": FORMAT,
        "format_version": manifest_version(tied, layers),
        "kind": loaded.kind if loaded is not None else record.kind,
        "source": record.source,
        "architecture": arch,
        "recipe": record.recipe.to_dict(),
        "layers": layers,
        "tied": tied,
        "versions": _versions(),
    }
    with atomic_dir(directory) as tmp:
        write_safetensors(tmp / WEIGHTS, tensors, {"format": FORMAT})
        if arch["type"] == "hf":
            module.config.save_pretrained(tmp)
        if loaded is not None and isinstance(loaded.preprocess, ImagePreprocess):
            write_json(tmp / "preprocessor_config.json", loaded.preprocess.to_processor_config())
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        write_json(tmp / MANIFEST, manifest)
    if record.journal is not None:  # the run's block journal is not needed once the checkpoint exists
        record.journal.remove()
        record.journal = None
    return directory


def _skeleton(directory: Path, arch: dict[str, Any], module: nn.Module | None) -> nn.Module:
    """The float architecture without its weights (they come from the checkpoint)."""
    if module is not None:
        return module
    if arch.get("type") == "hf":
        from ..models import _quiet_transformers, hf_from_config

        _quiet_transformers()
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{directory}: config.json is missing or invalid ({exc})") from exc
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers 4.x
            from transformers.modeling_utils import no_init_weights
        with no_init_weights():
            # checkpoints from before "hf_class" was recorded were built with the Auto class
            if not arch.get("hf_class"):
                config.architectures = None
            return hf_from_config(arch.get("kind", "encoder"), config)
    if arch.get("type") == "builtin" and arch.get("builtin") == "efficientnet-lite0":
        return efficientnet_skeleton()
    raise CheckpointError(
        f"{directory}: the checkpoint holds a custom module ({arch.get('class')}); load it from Python with "
        "lowbit.load(dir, module=<an instance of that class>)"
    )


def load(directory: str | Path, module: nn.Module | None = None) -> Loaded:
    """Rebuild a quantized model from a lowbit checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; give the folder written by lowbit quantize/save")
    manifest = read_json(directory / MANIFEST)
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("format_version"), int):
        raise CheckpointError(f"{directory / MANIFEST}: not a lowbit checkpoint manifest")
    if manifest["format_version"] > FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format {manifest['format_version']} is newer than this "
            f"lowbit reads ({FORMAT_VERSION}); upgrade lowbit"
        )
    tensors = read_weights(directory)
    with malformed(str(directory / MANIFEST), CheckpointError):
        return _build(directory, manifest, tensors, module)


def weight_files(directory: Path) -> list[str]:
    """Names of the weight files of a checkpoint: one model.safetensors, or the index and its shards."""
    index = directory / WEIGHTS_INDEX
    if not index.exists():
        return [WEIGHTS]
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{index}: shard {shard!r} must be a .safetensors file name inside the checkpoint")
    return [WEIGHTS_INDEX, *shards]


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, from model.safetensors or from the shards its index lists."""
    index = directory / WEIGHTS_INDEX
    if not index.exists():
        return read_safetensors(directory / WEIGHTS)[0]
    weight_map = read_json(index)["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in weight_files(directory)[1:]:
        if not (directory / shard).is_file():
            raise CheckpointError(f"{directory}: shard {shard} listed in {WEIGHTS_INDEX} is missing; re-create it")
        part, _ = read_safetensors(directory / shard)
        wanted = {name for name, file in weight_map.items() if file == shard}
        if set(part) != wanted:
            odd = sorted(set(part) ^ wanted)[:3]
            raise CheckpointError(f"{directory / shard}: holds other tensors than {WEIGHTS_INDEX} lists ({odd})")
        tensors.update(part)
    return tensors


def restore_layer(
    model: nn.Module, name: str, entry: dict, tensors: dict[str, torch.Tensor], where: Path
) -> LayerScheme:
    """Swap ``model``'s float layer ``name`` for the quantized layer that ``entry`` (a lowbit.json
    layer record) and the named ``tensors`` describe; returns its scheme."""
    try:
        float_layer = model.get_submodule(name)
        scheme = LayerScheme.from_dict(entry["scheme"], f"layers.{name}.scheme")
        qweight = QTensor.from_dict(tensors, entry["weight"], f"{name}.")
    except (AttributeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: layer {name!r} does not fit the model ({exc})") from exc
    want = scheme.weight.torch_scale_dtype if scheme.weight is not None else None
    widened = want == torch.float16 and qweight.scale is not None and qweight.scale.dtype == torch.float32
    # fp16 scales fall back to fp32 where a scale leaves fp16's range (primitives._round_scale)
    if want is not None and qweight.scale is not None and qweight.scale.dtype != want and not widened:
        raise CheckpointError(
            f"{name}: scales are stored as {qweight.scale.dtype} but the recipe in lowbit.json says "
            f"{scheme.weight.scale_dtype}; the checkpoint was edited or is corrupt, re-create it"
        )
    if is_conv1d(float_layer):  # GPT-2's Conv1D was quantized as the Linear it is
        float_layer = conv1d_as_linear(float_layer)
    expected = tuple(float_layer.weight.shape)
    if tuple(qweight.shape) != expected:
        raise CheckpointError(
            f"{name}: lowbit.json says shape {tuple(qweight.shape)} but the architecture "
            f"has {expected}; the checkpoint does not match its config"
        )
    qlayer = to_quantized(float_layer, qweight, scheme.activation, name)
    if entry.get("static_input"):
        scale, zero = tensors.get(f"{name}.input_scale"), tensors.get(f"{name}.input_zero_point")
        if scale is None or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise CheckpointError(f"{name}: static activation scale is missing or invalid")
        qlayer.set_input_qparams(scale, zero)
    if entry.get("input_smooth"):
        smooth = tensors.get(f"{name}.input_smooth")
        if (
            smooth is None
            or smooth.shape != (qlayer.qweight.shape[1] * getattr(qlayer, "groups", 1),)
            or not bool(torch.isfinite(smooth).all() and (smooth > 0).all())
        ):
            raise CheckpointError(f"{name}: input_smooth is missing or invalid")
        qlayer.set_input_smooth(smooth)
    if entry.get("outliers"):
        index, weight = tensors.get(f"{name}.outlier_index"), tensors.get(f"{name}.outlier_weight")
        in_features = qlayer.qweight.shape[1]
        if (
            index is None
            or weight is None
            or index.dim() != 1
            or weight.shape != (qlayer.qweight.shape[0], index.numel())
        ):
            raise CheckpointError(f"{name}: outlier channels are missing or inconsistent")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= in_features):
            raise CheckpointError(f"{name}: outlier channel index out of range")
        qlayer.set_outliers(index, weight)
    if entry.get("bias") and qlayer.bias is None:  # bias correction gave a bias-free layer one
        qlayer.bias = torch.nn.Parameter(torch.zeros(qlayer.qweight.shape[0]), requires_grad=False)
    set_submodule(model, name, qlayer)
    return scheme


def _share_tied_buffers(model: nn.Module, tied: dict[str, str]) -> None:
    """Quantized layers saved with one shared weight (a tied embedding and head) share it again
    after loading, instead of holding two equal copies."""
    buffers = dict(model.named_buffers())
    for alias, owner in tied.items():
        if alias in buffers and owner in buffers and buffers[alias].shape == buffers[owner].shape:
            holder, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(holder), attr, buffers[owner])


def _build(directory: Path, manifest: dict, tensors: dict[str, torch.Tensor], module: nn.Module | None) -> Loaded:
    """The model a checked manifest and its tensors describe (see load)."""
    for key in ("architecture", "tied", "source"):
        if not isinstance(manifest.get(key, {}), dict):
            raise CheckpointError(f"{directory / MANIFEST}: '{key}' must be a mapping")
    model = _skeleton(directory, manifest.get("architecture", {}), module)
    record = QuantizationRecord(Recipe.from_dict(manifest["recipe"], f"{directory / MANIFEST}:recipe"))
    layers = manifest.get("layers")
    if not isinstance(layers, dict):
        raise CheckpointError(f"{directory / MANIFEST}: 'layers' must be a mapping")
    tied = manifest.get("tied", {})
    for alias, owner in tied.items():
        if owner not in tensors:
            raise CheckpointError(f"{directory}: tied tensor {alias!r} points to missing {owner!r}")
        tensors[alias] = tensors[owner]
    for name, entry in layers.items():
        record.schemes[name] = restore_layer(model, name, entry, tensors, directory)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: tensors disagree with the model ({str(exc)[:400]})") from exc
    _share_tied_buffers(model, tied)
    model.eval()
    kind = manifest.get("kind", "encoder")
    arch = manifest.get("architecture", {})
    record.source, record.kind, record.architecture = manifest.get("source", {}), kind, arch
    model.lowbit = record
    tokenizer = _tokenizer(directory) if kind != "image-classifier" else None
    preprocess = efficientnet_preprocess if arch.get("builtin") == "efficientnet-lite0" else None
    if kind == "image-classifier" and arch.get("type") == "hf":
        preprocess = hf_image_preprocess(directory, getattr(model, "config", None))
    meta = {**arch, "quantized": True, "source_model": manifest.get("source", {}).get("model")}
    return Loaded(model, kind, str(directory), tokenizer, preprocess, manifest.get("source", {}).get("sha256"), meta)


def _tokenizer(directory: Path) -> Any:
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, LowbitError) as exc:
        raise CheckpointError(f"{directory}: tokenizer files are present but unreadable ({exc})") from exc
