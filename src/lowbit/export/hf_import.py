"""Read a quantized Hugging Face directory (compressed-tensors int, or GPTQ) into a lowbit model
whose QLinear layers carry the file's integers and scales exactly (no re-quantization)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedError
from ..io import _header_check, read_safetensors
from ..models import Loaded, _kind_of, read_json, sha256_of
from ..nn import set_submodule, to_quantized
from ..quantize import QuantizationRecord
from ..recipe import ActivationSpec, LayerScheme, Recipe, Rule
from ..spec import QuantSpec
from ..tensor import QTensor
from . import ct_codec, gptq_layout

METHODS = ("compressed-tensors", "gptq")


def quant_method(path: Path) -> str | None:
    """The quantization method a HF directory declares (config.json or quantize_config.json), if any."""
    config = path / "config.json"
    if config.is_file():
        method = read_json(config).get("quantization_config", {}).get("quant_method")
        if method:
            return str(method)
    return "gptq" if (path / "quantize_config.json").is_file() else None


def _skeleton(path: Path) -> tuple[nn.Module, str]:
    from ..models import _quiet_transformers, hf_from_config

    _quiet_transformers()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: config.json is missing or invalid ({exc})") from exc
    if hasattr(config, "quantization_config"):  # lowbit holds the quantization now
        del config.quantization_config
    kind = _kind_of(config)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = hf_from_config(kind, config, dtype=torch.float32)
    return model, kind


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weights; a quantized HF directory needs them")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        _header_check(file)
        tensors.update(read_safetensors(file)[0])
    return tensors, files


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Pop every tensor under ``prefix`` (a module name + '.'), keyed without it."""
    keys = [k for k in tensors if k.startswith(prefix) and "." not in k[len(prefix) :]]
    return {k[len(prefix) :]: tensors.pop(k) for k in keys}


def _ct_layers(model: nn.Module, qconfig: dict[str, Any], tensors, path: Path):
    """(name, QTensor, ActivationSpec, leftover tensors) for each compressed-tensors layer."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import is_match

    try:
        config = QuantizationConfig.model_validate(
            {k: v for k, v in qconfig.items() if k in QuantizationConfig.model_fields}
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}/config.json: quantization_config is invalid ({str(exc)[:300]})") from exc
    if config.quantization_status != "compressed":
        raise UnsupportedError(f"{path}: quantization_status {config.quantization_status!r}; only compressed is read")
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        scheme = next(
            (s for s in config.config_groups.values() if is_match(name, module, s.targets, config.ignore or [])), None
        )
        if scheme is None or scheme.weights is None:
            continue
        if scheme.output_activations is not None:
            raise UnsupportedError(f"{name}: output activation quantization is not imported")
        own = _take(tensors, f"{name}.")
        fmt = scheme.format or config.format
        qt = ct_codec.decode(own, scheme.weights, fmt, name, torch.float32)
        act = ct_codec.activation_from_args(scheme.input_activations, name)
        yield name, qt, act, own


def _gptq_layers(model: nn.Module, qconfig: dict[str, Any], tensors, path: Path):
    try:
        bits, group_size = int(qconfig.get("bits", 4)), int(qconfig.get("group_size", 128))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: GPTQ bits/group_size are not integers ({exc})") from exc
    sym, v2 = bool(qconfig.get("sym", True)), qconfig.get("checkpoint_format", "gptq") == "gptq_v2"
    found = False
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.qweight" in tensors:
            found = True
            own = _take(tensors, f"{name}.")
            qt = gptq_layout.decode(own, bits, group_size, sym, v2, name)
            yield name, qt, ActivationSpec(), own
    if not found:
        raise CheckpointError(f"{path}: GPTQ config but no '<layer>.qweight' tensors match the architecture")


def _quantization_config(path: Path, method: str) -> dict[str, Any]:
    qconfig = read_json(path / "config.json").get("quantization_config")
    if qconfig is None and method == "gptq":
        qconfig = read_json(path / "quantize_config.json")
    if not isinstance(qconfig, dict):
        raise CheckpointError(f"{path}: no quantization_config in config.json")
    return qconfig


def _set_quantized(model, name, qt: QTensor, act: ActivationSpec, own: dict[str, torch.Tensor]) -> None:
    layer = to_quantized(model.get_submodule(name), qt, act, name)
    if "bias" in own:
        layer.bias = nn.Parameter(own.pop("bias").float(), requires_grad=False)
    if act.mode == "static":
        scale, zero = own.get("input_scale"), own.get("input_zero_point")
        if scale is None:
            raise CheckpointError(f"{name}: static activations without input_scale")
        zero = None if act.format.symmetric or zero is None else (zero.to(torch.int16) + 128).to(torch.uint8)
        layer.set_input_qparams(scale.float().reshape(1), None if zero is None else zero.reshape(1))
    set_submodule(model, name, layer)


def load(path: str | Path) -> Loaded:
    """A compressed-tensors (int, pack- or int-quantized) or GPTQ (2/4/8-bit) HF directory as lowbit."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; give a Hugging Face model folder")
    method = quant_method(path)
    if method not in METHODS:
        raise UnsupportedError(
            f"{path}: quantization method {method!r} is not imported; lowbit reads {', '.join(METHODS)}"
        )
    qconfig = _quantization_config(path, method)
    tensors, files = _read_weights(path)
    model, kind = _skeleton(path)
    layers = _ct_layers if method == "compressed-tensors" else _gptq_layers
    rules, schemes = [], {}
    for name, qt, act, own in list(layers(model, qconfig, tensors, path)):
        _set_quantized(model, name, qt, act, own)
        scheme = LayerScheme(QuantSpec(qt.fmt, qt.granularity, scale_dtype=str(qt.scale.dtype)[6:]), act)
        schemes[name] = scheme
        rules.append(Rule(scheme, match=name))
    _load_float(model, tensors, path, tuple(f"{n}." for n in schemes))
    record = QuantizationRecord(
        Recipe(f"imported-{method}", tuple(rules), f"read from {path}", include_head=True, include_embeddings=True)
    )
    record.schemes = schemes
    record.kind = kind
    digest = sha256_of(files)
    record.source = {"model": str(path), "sha256": digest}
    from ..models import _AUTO_CLASS

    record.architecture = {
        "type": "hf",
        "auto_class": _AUTO_CLASS[kind],
        "hf_class": type(model).__name__,
        "kind": kind,
    }
    model.lowbit = record
    model.eval()
    tokenizer = None
    if kind != "image-classifier":
        from .checkpoint import _tokenizer

        tokenizer = _tokenizer(path)
    return Loaded(model, kind, str(path), tokenizer, sha256=digest, meta={**record.architecture, "quantized": True})


def _load_float(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, quantized: tuple[str, ...]) -> None:
    """The remaining (float) tensors; tied weights may be absent, anything else missing is an error."""
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    result = model.load_state_dict(tensors, strict=False)
    state = model.state_dict()
    loaded = {(t.untyped_storage().data_ptr(), t.shape) for k, t in state.items() if k in tensors}
    missing = [
        k
        for k in result.missing_keys
        if not k.startswith(quantized) and (state[k].untyped_storage().data_ptr(), state[k].shape) not in loaded
    ]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: tensors do not fit the architecture: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}; the directory is incomplete or its config.json is wrong"
        )
