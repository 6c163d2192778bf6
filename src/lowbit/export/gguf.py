"""`lowbit export --format gguf`: a quantized Llama, Mistral or Qwen2 checkpoint as a GGUF file
llama.cpp runs (Llama and Mistral as its ``llama`` architecture, Qwen2 as ``qwen2``).

Weights whose lowbit grid is a ggml type are written from lowbit's own integers and scales
(no re-quantization; see ggml_blocks for the mapping). The others are written as ``fallback``
(default F16: lowbit's dequantized values, only rounded to f16). Every quantized tensor is
decoded back with ``gguf.quants`` and compared with what the lowbit model computes, so the
returned report says which tensors are bit-exact and how far the others are.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..errors import CheckpointError, SpecError, UnsupportedError
from ..io import atomic_path
from . import ggml_blocks, gguf_meta
from .ggml_blocks import Encoded
from .gguf_tensors import Weight, model_tensors

OPTIONS = {
    "fallback": ("f16", ggml_blocks.REQUANT_TARGETS),  # weights with no exact ggml grid
    "float_type": ("f16", ("f16", "f32", "bf16")),  # matrices lowbit left in float (embeddings, head)
}
_FILE_TYPES = {
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "F32": gguf.LlamaFileType.ALL_F32,
}


def _options(options: dict[str, Any]) -> dict[str, str]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SpecError(f"GGUF export: unknown option(s) {unknown}; known: {sorted(OPTIONS)}")
    out = {}
    for key, (default, allowed) in OPTIONS.items():
        value = str(options.get(key, default)).lower()
        if value not in allowed:
            raise SpecError(f"GGUF export: {key}={value!r} is not one of {list(allowed)}")
        out[key] = value
    return out


def _encode(name: str, weight: Weight, opts: dict[str, str]) -> Encoded:
    """The ggml form of one tensor: its exact grid, a re-quantized fallback, or a float."""
    if weight.float_type:
        return ggml_blocks.float_tensor(weight.value, weight.float_type)
    if weight.grid is not None and weight.grid.fits_f16():
        return ggml_blocks.pack(weight.grid)
    if weight.grid is not None:
        weight.why = "scales outside fp16's normal range"
    if weight.value.dim() == 1:  # norms and biases: llama.cpp reads them as F32
        return ggml_blocks.float_tensor(weight.value, "f32")
    if weight.source:
        return ggml_blocks.requantize(weight.value, opts["fallback"], f"{weight.source}: {weight.why}")
    return ggml_blocks.float_tensor(weight.value, opts["float_type"])


def _deviation(enc: Encoded, weight: Weight) -> float:
    """Largest |GGUF value - lowbit value| in quantization steps (the block's scale)."""
    decoded = torch.from_numpy(ggml_blocks.decode(enc).reshape(weight.value.shape))
    step = weight.grid.d.abs().repeat_interleave(ggml_blocks.BLOCK, dim=1)
    diff = (decoded - weight.value).abs()
    return float(torch.where(step > 0, diff / step.clamp(min=1e-30), diff).max())


def export(source: Path, out: Path, **options: Any) -> dict[str, Any]:
    """Write the lowbit checkpoint ``source`` (a Llama, Mistral or Qwen2 causal LM) to the GGUF file ``out``.

    Options: ``fallback`` (f16 | f32 | q8_0 | q6_k | q4_k) for weights without an exact ggml
    grid; ``float_type`` (f16 | f32 | bf16) for matrices lowbit kept in float."""
    from .checkpoint import load

    opts = _options(options)
    source, out = Path(source), Path(out)
    loaded = load(source)
    model = loaded.model
    config = getattr(model, "config", None)
    if config is None or not type(model).__name__.endswith("ForCausalLM"):
        raise UnsupportedError(
            f"{source}: GGUF export takes a causal LM checkpoint (Llama, Mistral or Qwen2), not a "
            f"{type(model).__name__}; export it with --format onnx or --format hf instead"
        )
    arch = gguf_meta.check_config(config, str(source))
    tensors, folded = model_tensors(model, arch)
    encoded = {name: _encode(name, weight, opts) for name, weight in tensors.items()}
    report = _report(tensors, encoded)
    report["architecture"] = arch.name
    report["folded_input_divisors"] = folded
    report["activations_ignored"] = sorted(
        name for name, m in model.named_modules() if getattr(getattr(m, "activation", None), "mode", "none") != "none"
    )
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch.name)
        report.update(gguf_meta.add_hparams(writer, config, source.name))
        writer.add_file_type(_FILE_TYPES.get(report["main_type"], gguf.LlamaFileType.GUESSED))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        report["tokenizer"] = gguf_meta.add_tokenizer(writer, source, int(config.vocab_size))
        for name, enc in encoded.items():
            writer.add_tensor(name, enc.data, raw_dtype=enc.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    report["bytes"] = os.path.getsize(out)
    return report


def _report(tensors: dict[str, Weight], encoded: dict[str, Encoded]) -> dict[str, Any]:
    """Counts per ggml type, which quantized tensors are bit-exact, which deviate and why."""
    types = Counter(enc.qtype.name for enc in encoded.values())
    exact, rounded, requantized = 0, [], []
    params = Counter()
    for name, enc in encoded.items():
        weight = tensors[name]
        params[enc.qtype.name] += weight.value.numel()
        if not weight.source:
            continue
        if enc.note or weight.grid is None:
            requantized.append({"tensor": name, "from": weight.source, "to": enc.qtype.name, "why": weight.why})
            continue
        err = _deviation(enc, weight)
        if err == 0.0:
            exact += 1
        else:
            rounded.append({"tensor": name, "type": enc.qtype.name, "max_error_steps": err})
    quantized = [t for t in params if t not in ("F32", "F16", "BF16")]
    main = max(quantized or params, key=lambda t: params[t]) if params else "F32"
    return {
        "tensor_types": dict(sorted(types.items())),
        "main_type": main,
        "exact": exact,
        "rounded": rounded,
        "requantized": requantized,
    }


def read_back(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file dequantized to float32 in numpy's [rows, cols] order."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable GGUF file ({exc})") from exc
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = values.reshape(tuple(int(d) for d in reversed(t.shape)))
    return out
