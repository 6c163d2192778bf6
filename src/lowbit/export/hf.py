"""`lowbit export --format hf`: a lowbit checkpoint as a Hugging Face model directory in the
compressed-tensors format (what transformers, vLLM and llm-compressor read).

The integers and scales are written as they are (no re-quantization); layers whose scheme
compressed-tensors cannot express are refused with the reason. ``load`` reads such a
directory (or a GPTQ one) back into a lowbit model: see ``hf_import``.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnsupportedError
from ..formats import Float
from ..io import atomic_dir, check_replaceable, write_safetensors
from ..models import Loaded
from ..nn import QEmbedding, QLinear, QModule
from ..recipe import output_head_name
from . import ct_codec
from .checkpoint import MANIFEST, WEIGHTS, _unique_state, weight_files
from .checkpoint import load as load_checkpoint

# Files of a lowbit checkpoint that the export rewrites instead of copying.
_REWRITTEN = {WEIGHTS, MANIFEST, "config.json"}


def _quantized_layers(model: torch.nn.Module) -> dict[str, QModule]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QModule)}


def _plan(layers: dict[str, QModule], head: str | None) -> tuple[dict[str, ct_codec.LayerLayout], list[str]]:
    """Layout per exported layer, and the layers written dense: fp16/bf16 "quantization", and
    the output head and embeddings (the int8 ones of the weight-only presets), which loaders of
    compressed-tensors checkpoints expect in float and tie by name."""
    plan, dense = {}, []
    for name, layer in layers.items():
        if isinstance(layer, QEmbedding) or name == head:
            dense.append(name)  # the embedding tables and the output head are written as float values
            continue
        if not isinstance(layer, QLinear):
            raise UnsupportedError(
                f"{name}: quantized {type(layer).__name__} layers are not exported to compressed-tensors (Linear "
                "only); re-quantize with a recipe that keeps them float"
            )
        fmt = layer.weight_format
        if isinstance(fmt, Float) and not fmt.scaled and layer.activation.mode == "none":
            dense.append(name)
        else:
            plan[name] = ct_codec.layout_of(layer, name)
    if not plan:
        raise UnsupportedError("no layer holds integer weights; nothing for compressed-tensors to describe")
    return plan, dense


def quantization_config(model: torch.nn.Module, plan: dict[str, ct_codec.LayerLayout]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json, built and validated by compressed-tensors itself."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[ct_codec.LayerLayout, list[str]] = defaultdict(list)
    for name, layout in plan.items():
        groups[layout].append(name)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | QLinear)]
    ignore = [n for n in linears if n not in plan]
    single = len(groups) == 1
    schemes = {}
    for i, (layout, names) in enumerate(groups.items()):
        inputs = None if layout.input_activations is None else QuantizationArgs(**dict(layout.input_activations))
        schemes[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if single else sorted(names),
            weights=QuantizationArgs(**dict(layout.weights)),
            input_activations=inputs,
            format=layout.format,
        )
    formats = {layout.format for layout in groups}
    config = QuantizationConfig(
        config_groups=schemes,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=ignore,
    )
    body = config.model_dump(exclude={"quant_method"})
    return {
        "version": metadata.version("compressed-tensors"),
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **json.loads(json.dumps(body, default=str)),
    }


def _tensors(model: torch.nn.Module, layers: dict[str, QModule], plan, dense) -> dict[str, torch.Tensor]:
    """Float tensors of the model (tied ones once) plus every quantized layer in CT layout."""
    state, _ = _unique_state(model)
    prefixes = tuple(f"{name}." for name in layers)
    out = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    tables = [layer for layer in layers.values() if isinstance(layer, QEmbedding)]
    for name in dense:
        layer = layers[name]
        if not isinstance(layer, QEmbedding) and any(layer.qdata is t.qdata for t in tables):
            continue  # a head tied to an embedding table: transformers ties it again on loading
        out[f"{name}.weight"] = layer.qweight.dequantize()
        if layer.bias is not None:
            out[f"{name}.bias"] = layer.bias.detach()
    for name, layout in plan.items():
        for key, tensor in ct_codec.encode(layers[name], layout).items():
            out[f"{name}.{key}"] = tensor.contiguous()
    return out


def refuse_transposed_layers(source: Path, kind: str, names: list[str]) -> None:
    """GPT-2 style Conv1D layers (weight [in, out]) come back wrong from a compressed-tensors
    directory (transformers reads the codes as a Linear's): refuse rather than write that."""
    from transformers import AutoConfig

    from ..models import hf_from_config
    from ..nn.transposed import is_conv1d

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    with torch.device("meta"):
        skeleton = hf_from_config(kind, config)
    transposed = [name for name in names if is_conv1d(skeleton.get_submodule(name))]
    if transposed:
        raise UnsupportedError(
            f"{source}: {transposed[0]} is a GPT-2 style Conv1D layer, which transformers' compressed-tensors "
            "loader would read transposed; keep the lowbit checkpoint or export it with --format onnx"
        )


def check_hf_out(out: Path, source: Path) -> None:
    """Refuse an output that would replace anything but an earlier export: the source checkpoint,
    a file, or a directory of other files (a float model's config.json has no quantization_config)."""
    if out.exists() and out.resolve() == source.resolve():
        raise CheckpointError(f"{out}: the output would replace the checkpoint it is made from; choose a new path")
    check_replaceable(out, "config.json", "Hugging Face export")
    config = out / "config.json"
    if config.is_file():
        try:
            earlier = "quantization_config" in json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = False
        if not earlier:
            raise CheckpointError(
                f"{out} holds a model that is not a quantized export (its config.json has no quantization_config); "
                "refusing to replace it, choose a new output path"
            )


def export(source: Path, out: Path, **options: Any) -> dict[str, Any]:
    """Write the lowbit checkpoint ``source`` as a compressed-tensors HF directory ``out``."""
    source, out = Path(source), Path(out)
    if not (source / MANIFEST).is_file():
        raise CheckpointError(
            f"{source}: not a lowbit checkpoint (no {MANIFEST}); make one with "
            "`lowbit quantize MODEL --recipe w4-g128 --out DIR`"
        )
    check_hf_out(out, source)
    loaded = load_checkpoint(source)
    if loaded.meta.get("type") != "hf" or not (source / "config.json").is_file():
        raise UnsupportedError(
            f"{source}: the model is not a Hugging Face architecture (no config.json); export it with "
            "--format onnx instead"
        )
    layers = _quantized_layers(loaded.model)
    refuse_transposed_layers(source, loaded.kind, list(layers))
    head = output_head_name(loaded.model)
    plan, dense = _plan(layers, head)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config(loaded.model, plan)
    if not config.get("architectures"):  # e.g. a model converted from GGUF: name the class for Auto* loaders
        config["architectures"] = [type(loaded.model).__name__]
    tensors = _tensors(loaded.model, layers, plan, dense)
    if config.get("tie_word_embeddings") and head is not None and f"{head}.weight" in tensors:
        config["tie_word_embeddings"] = False  # the head came out different from the table: keep its own
    with atomic_dir(out) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copied = []
        skip = _REWRITTEN | set(weight_files(source))
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in skip and not path.name.startswith("."):
                shutil.copy2(path, tmp / path.name)
                copied.append(path.name)
    size = (out / "model.safetensors").stat().st_size
    return {
        "layers": len(plan),
        "dense_layers": len(dense),
        "config_groups": len(config["quantization_config"]["config_groups"]),
        "quantization_format": config["quantization_config"]["format"],
        "size_bytes": size,
        "files": len(copied) + 2,
    }


def load(path: str | Path) -> Loaded:
    """A compressed-tensors or GPTQ Hugging Face directory as a lowbit model (exact integers)."""
    from .hf_import import load as load_quantized_hf

    return load_quantized_hf(path)
