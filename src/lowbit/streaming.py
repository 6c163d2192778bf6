"""Quantize a Hugging Face causal LM bigger than memory: one layer at a time.

The architecture is built on the meta device (no weights), each layer's float weight is read
alone from the source safetensors (bf16/fp16 upcast to float32, as ``load_model`` does),
quantized with the same code as ``lowbit.quantize`` and appended to sharded output files, so
peak memory stays near one layer plus one output shard. Only calibration-free recipes
(RTN/HQQ weight-only, dynamic activations) can work this way: calibrated ones need the model
to run on data.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ModelError, SpecError, UnsupportedError
from .io import atomic_dir, check_replaceable, write_json
from .models import _AUTO_CLASS, _check_weight_dtypes, _quiet_transformers, hf_from_config, sha256_of
from .nn import WEIGHT_BUFFERS, QModule, same_weight, set_submodule
from .nn.transposed import is_conv1d
from .primitives import check_finite
from .quantize import QuantizationRecord, _Quantizer
from .recipe import Recipe, resolve_recipe

SOURCE_INDEX = "model.safetensors.index.json"
SHARD_BYTES = 512 << 20  # output shard size: the most output held in memory at once
Progress = Callable[[str, int, int], None]


class SourceWeights:
    """Tensors of a HF model directory, read one at a time (each read maps and unmaps its file,
    so nothing of the source stays resident)."""

    def __init__(self, directory: Path) -> None:
        from .io import _header_check

        self.directory = directory
        self.renamed: dict[str, str] = {}  # model's name -> stored name, where transformers renames
        index = directory / SOURCE_INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {str(k): str(v) for k, v in weight_map.items()}
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc}); re-save the model") from exc
        elif (directory / "model.safetensors").exists():
            files = {}
            single = "model.safetensors"
            files = dict.fromkeys(_header_check(directory / single), single)
            files.pop("__metadata__", None)
        else:
            raise ModelError(
                f"{directory}: no model.safetensors or {SOURCE_INDEX}; streaming reads a Hugging Face "
                "directory saved with save_pretrained (safetensors)"
            )
        self.headers: dict[str, dict] = {}
        for shard in sorted(set(files.values())):
            path = directory / shard
            if Path(shard).name != shard or not path.is_file():
                raise CheckpointError(f"{directory}: shard {shard!r} listed in {SOURCE_INDEX} is missing; copy it back")
            header = _header_check(path)
            header.pop("__metadata__", None)
            missing = sorted(k for k, v in files.items() if v == shard and k not in header)
            if missing:
                raise CheckpointError(f"{path}: lacks tensors its index lists ({missing[:3]}); the shard is stale")
            self.headers[shard] = header
        _check_weight_dtypes(directory, {k: self.headers[v][k] for k, v in files.items()})
        self.files = files
        self.paths = [directory / shard for shard in sorted(self.headers)]

    def find(self, names: list[str]) -> str | None:
        """The first of ``names`` (aliases of one tensor) stored in the files, under its own name
        or the older one transformers renames on loading (``rename_keys``)."""
        return next((self.renamed.get(n, n) for n in names if self.renamed.get(n, n) in self.files), None)

    def rename_keys(self, model: nn.Module) -> None:
        """Learn which stored names transformers renames for ``model`` (e.g. GPT-NeoX's embed_out ->
        lm_head) from its conversion mapping; a mapping that merges or splits tensors cannot be
        streamed tensor by tensor."""
        self.renamed = {}
        try:
            from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
        except ImportError:  # transformers 4.x: no mapping, names are as stored
            return
        rules = []
        for rule in get_model_conversion_mapping(model) or []:
            if type(rule) is not WeightRenaming:
                continue
            targets = list(rule.target_patterns)
            for i, source in enumerate(rule.source_patterns):
                rules.append((re.compile(source), targets[min(i, len(targets) - 1)]))
        for key in self.files:
            name = key
            for pattern, target in rules:
                name = pattern.sub(lambda _m, t=target: t, name)
            if name != key:
                self.renamed[name] = key

    def read(self, key: str) -> torch.Tensor:
        """One tensor as float32 (integer tensors unchanged)."""
        from safetensors import SafetensorError, safe_open

        path = self.directory / self.files[key]
        try:
            with safe_open(str(path), framework="pt") as fh:
                tensor = fh.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot read {key!r} ({exc}); the file is corrupt") from exc
        return tensor.float() if tensor.is_floating_point() else tensor


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a .safetensors file straight from the tensors' memory (safetensors' save_file first
    copies every tensor to bytes, doubling the peak); the layout is the library's own."""
    import sys

    from safetensors.torch import save_file

    if sys.byteorder != "little" or any(t.dtype not in _ST_DTYPES for t in tensors.values()):
        save_file(tensors, str(path), metadata=metadata)
        return
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the library writes it
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for tensor in tensors.values():
            if tensor.numel():
                fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


class ShardWriter:
    """Appends tensors to numbered safetensors shards of at most ``limit`` bytes (a bigger
    tensor gets a shard of its own), then writes the index."""

    def __init__(self, directory: Path, limit: int = SHARD_BYTES) -> None:
        self.directory, self.limit = directory, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.weight_map: dict[str, str] = {}
        self.shards: list[str] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.limit:
                self.flush()
            self.pending[name] = tensor.detach().contiguous()
            self.pending_bytes += size
            self.total += size

    def flush(self) -> None:
        if not self.pending:
            return
        shard = f"model-{len(self.shards) + 1:05d}.safetensors"
        write_shard(self.directory / shard, self.pending, {"format": "lowbit-checkpoint"})
        self.weight_map.update(dict.fromkeys(self.pending, shard))
        self.shards.append(shard)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard; a single shard becomes model.safetensors (no index needed)."""
        from .export.checkpoint import WEIGHTS, WEIGHTS_INDEX

        self.flush()
        if len(self.shards) == 1:
            (self.directory / self.shards[0]).rename(self.directory / WEIGHTS)
            return
        index = {"metadata": {"format": "lowbit-checkpoint", "total_size": self.total}, "weight_map": self.weight_map}
        write_json(self.directory / WEIGHTS_INDEX, index)


def _skeleton(source_dir: Path) -> nn.Module:
    """The causal LM built from config.json on the meta device (no memory for weights)."""
    _quiet_transformers()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{source_dir}: config.json is missing or invalid ({exc})") from exc
    config.dtype = torch.float32  # the checkpoint holds float32 tensors, as load_model gives
    try:
        with torch.device("meta"):
            model = hf_from_config("causal-lm", config)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"{source_dir}: config.json does not describe a causal LM ({exc})") from exc
    return model.eval()


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """State-dict name -> every name of the same (tied) parameter, owner first."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for name, buf in model.named_buffers(remove_duplicate=False):
        groups.setdefault(id(buf), []).append(name)
    out: dict[str, list[str]] = {}
    for names in groups.values():
        for name in names:
            out[name] = names
    return out


def _plan_check(recipe: Recipe, plan: dict, model: nn.Module) -> None:
    if recipe.needs_calibration:
        raise SpecError(
            f"recipe {recipe.name!r} needs calibration data; streaming supports calibration-free recipes "
            "(RTN/HQQ weight-only such as w4-g128, w8-weight, w2-g64-hqq): quantize in memory without "
            "--stream, or pick a calibration-free recipe"
        )
    if not plan:
        raise SpecError(f"recipe {recipe.name!r} matches no Linear/Conv2d/Embedding layer of this model")
    for name, scheme in plan.items():
        if scheme.weight is None:
            raise SpecError(f"{name}: the scheme has no weight spec; use fp16/bf16 to keep weights in float")
        if scheme.sparsity is not None and scheme.sparsity.scope == "global":
            raise SpecError(f"{name}: global sparsity ranks all weights at once; streaming supports per-layer only")
        if any(p.numel() == 0 for p in model.get_submodule(name).parameters()):
            raise SpecError(f"{name}: the weight has zero elements; exclude it from the recipe")


def quantize_streaming(
    source_dir: str | Path,
    recipe: str | Path | Recipe,
    out_dir: str | Path,
    progress: Progress | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Quantize the HF causal LM in ``source_dir`` layer by layer into the lowbit checkpoint
    ``out_dir`` (shards of at most ``shard_bytes``, bigger tensors alone), never holding the
    whole model; the tensors equal those of load_model + quantize + save."""
    from .export.checkpoint import FORMAT, MANIFEST, _tokenizer, _versions, layer_entry, manifest_version

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not (source_dir / "config.json").is_file():
        raise ModelError(f"{source_dir}: not a Hugging Face model directory (no config.json)")
    check_replaceable(out_dir, MANIFEST, "lowbit checkpoint")
    recipe = resolve_recipe(recipe)
    source = SourceWeights(source_dir)
    model = _skeleton(source_dir)
    plan = recipe.resolve(model)
    _plan_check(recipe, plan, model)
    transposed = [name for name in plan if is_conv1d(model.get_submodule(name))]
    if transposed:
        raise UnsupportedError(
            f"{source_dir}: {transposed[0]} is a GPT-2 style Conv1D layer, which --stream does not quantize; "
            "run without --stream (the model is loaded whole)"
        )
    source.rename_keys(model)
    aliases = _aliases(model)
    record = QuantizationRecord(recipe)
    quantizer = _Quantizer(model, plan, record)

    def fetch(name: str) -> torch.Tensor:
        key = source.find(aliases.get(name, [name]))
        if key is None:
            raise CheckpointError(f"{source_dir}: tensor {name!r} is in the architecture but in no weight file")
        return source.read(key)

    layers: dict[str, Any] = {}
    tied: dict[str, str] = {}
    shared: dict[tuple[str, ...], tuple[str, QModule]] = {}  # tied float weight -> its first quantized user
    with atomic_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        for index, name in enumerate(plan):
            if progress is not None:
                progress(name, index, len(plan))
            meta_layer = model.get_submodule(name)
            layer = copy.deepcopy(meta_layer)
            state = {key: fetch(f"{name}.{key}") for key in meta_layer.state_dict()}
            check_finite(state["weight"], f"{name}.weight")
            layer.load_state_dict(state, assign=True)
            set_submodule(model, name, layer)
            quantizer.layer(name, None)
            qlayer = model.get_submodule(name)
            tensors = qlayer.state_dict(prefix=f"{name}.")
            group = tuple(aliases.get(f"{name}.weight", ()))
            if len(group) > 1 and group in shared and same_weight(shared[group][1], qlayer):
                owner = shared[group][0]  # a tied head quantized like its table: stored once (as in memory)
                for key in WEIGHT_BUFFERS:
                    if f"{name}.{key}" in tensors:
                        tied[f"{name}.{key}"] = f"{owner}.{key}"
                        del tensors[f"{name}.{key}"]
            elif len(group) > 1:
                shared.setdefault(group, (name, qlayer))
            writer.add(tensors)
            layers[name] = layer_entry(qlayer, plan[name])
            set_submodule(model, name, meta_layer)  # drop the quantized copy: it is on disk now
            del layer, qlayer, state
        shared.clear()
        quantized = {f"{name}." for name in plan}
        for name in model.state_dict():
            if any(name.startswith(prefix) for prefix in quantized):
                continue
            owner = next(n for n in aliases.get(name, [name]) if not any(n.startswith(p) for p in quantized))
            if owner != name:
                tied[name] = owner
                continue
            writer.add({name: fetch(name)})
        writer.close()
        model.config.save_pretrained(tmp)
        tokenizer = _tokenizer(source_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {
            "format": FORMAT,
            "format_version": manifest_version(tied, layers),
            "kind": "causal-lm",
            "source": {"model": str(source_dir), "sha256": sha256_of(source.paths)},
            "architecture": {
                "type": "hf",
                "auto_class": _AUTO_CLASS["causal-lm"],
                "hf_class": type(model).__name__,
                "kind": "causal-lm",
            },
            "recipe": recipe.to_dict(),
            "layers": layers,
            "tied": tied,
            "versions": _versions(),
        }
        write_json(tmp / MANIFEST, manifest)
    return out_dir
