"""The tensors of a quantized Llama, Mistral or Qwen2 model in llama.cpp's naming and layout: each
weight keeps its lowbit grid where ggml has the same one (see ggml_blocks), q/k rows are permuted
where llama.cpp's rope pairs them differently from HF (its llama graph, not qwen2), and per-input
divisors (AWQ/SmoothQuant ``input_smooth``) are folded into the layer that produces the input where
that keeps the grid."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gguf
import torch
from torch import nn

from ..errors import UnsupportedError
from ..formats import Float
from ..nn import QModule, same_weight
from . import ggml_blocks
from .ggml_blocks import Grid
from .gguf_meta import Arch


@dataclass
class Weight:
    """One tensor on its way to GGUF: ``value`` is what it must decode to (float32), ``grid``
    the exact ggml grid when there is one, ``why`` the reason when there is none."""

    value: torch.Tensor
    grid: Grid | None = None
    why: str = ""
    source: str = ""  # lowbit layout, e.g. 'int4/group' ('' for float tensors)
    float_type: str = ""  # 'f16' / 'bf16' for weights lowbit stores as that float type

    def permute_rows(self, order: torch.Tensor) -> Weight:
        grid = None if self.grid is None else self.grid.permute_rows(order)
        return Weight(self.value[order], grid, self.why, self.source, self.float_type)

    def scale_rows(self, factor: torch.Tensor) -> None:
        self.value = self.value * factor.float().reshape(-1, *([1] * (self.value.dim() - 1)))
        if self.grid is not None:
            self.grid = self.grid.scale_rows(factor)

    def divide_columns(self, divisor: torch.Tensor, why: str) -> None:
        self.value = self.value / divisor.float()
        self.grid, self.why = None, why


def rope_order(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's rope expects: per head, the two halves interleaved (HF's q/k rows
    hold the halves one after the other)."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _weight_of(module: nn.Module, folded: bool = False) -> Weight:
    """The float value of a module's weight as the module applies it (input divisor and outlier
    columns included unless ``folded`` moved the divisor elsewhere) and its ggml grid."""
    if not isinstance(module, QModule):
        return Weight(module.weight.detach().float())
    qt = module.qweight
    if isinstance(qt.fmt, Float) and not qt.fmt.scaled and module.input_smooth is None and module.outlier_index is None:
        return Weight(qt.dequantize(torch.float32), float_type=qt.fmt.dtype)
    weight = Weight(qt.dequantize(torch.float32), source=f"{module.layout}")
    weight.grid, weight.why = ggml_blocks.grid_of(qt)
    if module.input_smooth is not None and not folded:
        weight.divide_columns(module.input_smooth, "an input divisor (AWQ/SmoothQuant) that cannot be folded")
    if module.outlier_index is not None:
        weight.value[:, module.outlier_index] = module.outlier_weight.float()
        weight.grid, weight.why = None, "LLM.int8 outlier columns kept in float"
    return weight


_PRODUCERS = {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"}


def _foldable(layers: dict[str, nn.Module], config) -> dict[str, tuple[str, torch.Tensor]]:
    """consumer -> (producer, row divisor): o_proj/down_proj whose ``input_smooth`` can move into
    the rows of v_proj/up_proj, which produce their input linearly (per kv head for o_proj:
    every query head of a group must share the divisor)."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    out = {}
    for name, module in layers.items():
        smooth = getattr(module, "input_smooth", None)
        prefix, _, tail = name.partition(".layers.")
        block, _, role = tail.partition(".")
        producer = f"{prefix}.layers.{block}.{_PRODUCERS.get(role, '')}"
        if smooth is None or module.outlier_index is not None or role not in _PRODUCERS or producer not in layers:
            continue
        if role == "self_attn.o_proj":
            grouped = smooth.reshape(kv, heads // kv, -1)
            if not bool((grouped == grouped[:, :1]).all()):
                continue
            smooth = grouped[:, 0].reshape(-1)
        out[name] = (producer, smooth.float())
    return out


def model_tensors(model: nn.Module, arch: Arch) -> tuple[dict[str, Weight], list[str]]:
    """GGUF name -> Weight for every tensor llama.cpp's ``arch`` graph reads, plus the layers whose
    input divisor was folded. Refuses tensors it does not know."""
    config = model.config
    tmap = gguf.get_tensor_name_map(arch.graph, config.num_hidden_layers)
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    layers = dict(_leaves(model))
    folds = _foldable(layers, config)
    weights: dict[str, Weight] = {}
    for name, module in layers.items():
        weights[name] = _weight_of(module, folded=name in folds)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            weights[f"{name}.bias"] = Weight(bias.detach().float())
    for producer, divisor in folds.values():
        for key in (producer, f"{producer}.bias"):
            if key in weights:
                weights[key].scale_rows(1.0 / divisor)
    out: dict[str, Weight] = {}
    tied = _is_tied(model)
    for key, weight in weights.items():
        hf = key if key.endswith(".bias") else f"{key}.weight"
        if tied and hf == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedError(
                f"{hf}: llama.cpp's {arch.name} graph has no tensor for it; this is not a plain "
                f"{config.model_type} model. Export it with --format onnx or --format hf instead"
            )
        if arch.permute_qk and (".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf):
            weight = weight.permute_rows(rope_order(weight.value.shape[0], heads if "q_proj" in hf else kv))
        out[name] = weight
    return out, sorted(folds)


def _leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules that own a weight (linear, embedding, norm layers)."""
    for name, module in model.named_modules():
        if isinstance(module, QModule) or isinstance(getattr(module, "weight", None), nn.Parameter):
            if not any(True for _ in module.children()):
                yield name, module
        elif any(p is not None for p in module._parameters.values()):
            raise UnsupportedError(f"{name} ({type(module).__name__}) holds parameters llama.cpp has no place for")


def _is_tied(model: nn.Module) -> bool:
    """Whether lm_head equals the embedding table (then GGUF stores it once; a checkpoint holds
    tied tensors once but loads them as two equal ones)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head, QModule) and isinstance(embed, QModule):
        plain = head.input_smooth is None and head.outlier_index is None
        return plain and same_weight(head, embed)  # one table quantized once (the weight-only presets)
    if isinstance(head, QModule) or isinstance(embed, QModule):
        return False
    return head.weight.shape == embed.weight.shape and torch.equal(head.weight, embed.weight)
