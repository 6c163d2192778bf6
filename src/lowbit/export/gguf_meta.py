"""GGUF metadata for a Llama-architecture model: hyper-parameters from its Hugging Face config,
the GPT-2-style BPE vocabulary from ``tokenizer.json`` (what llama.cpp needs to load it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from ..errors import CheckpointError, UnsupportedError

LLAMA_TYPES = ("llama",)


def check_llama(config: Any, where: str) -> None:
    """Refuse configs llama.cpp's ``llama`` architecture would run differently."""
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_TYPES:
        raise UnsupportedError(
            f"{where}: GGUF export handles Llama-architecture causal LMs (model_type 'llama', e.g. SmolLM2); "
            f"this checkpoint is {model_type!r}. Export it with --format onnx or --format hf instead"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"{where}: hidden_act={act!r}; llama.cpp's llama graph uses silu")
    rope = _rope(config)
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "linear"):
        raise UnsupportedError(f"{where}: rope scaling {kind!r} is not exported; only default and linear are")


def _rope(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(writer: gguf.GGUFWriter, config: Any, name: str) -> None:
    """llama.* keys: sizes, heads, rope, norm epsilon."""
    rope = _rope(config)
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def _pre_tokenizer(spec: dict[str, Any] | None) -> str:
    """llama.cpp's name for the pre-tokenizer: 'gpt-2' for a plain byte-level regex split,
    'smollm' when digits are split one by one first (SmolLM's original tokenizer)."""
    if not spec:
        return "default"
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex")) for p in parts]
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    return "default"


def add_tokenizer(writer: gguf.GGUFWriter, directory: Path, vocab_size: int) -> str:
    """tokenizer.ggml.*: tokens in id order (special added tokens as CONTROL), merges, special
    token ids and chat template (via gguf.SpecialVocab). Returns a one-line description."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedError(
            f"{directory}: GGUF export needs the model's tokenizer.json (a GPT-2-style BPE tokenizer) "
            "in the checkpoint; re-create the checkpoint from a model that has one"
        )
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
        vocab: dict[str, int] = model["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable tokenizer ({exc}); re-save the checkpoint") from exc
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (spec.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise UnsupportedError(
            f"{path}: only GPT-2-style byte-level BPE tokenizers are exported to GGUF (this one is "
            f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''})"
        )
    tokens = {i: t for t, i in vocab.items()}
    types = dict.fromkeys(tokens, gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens, default=-1) >= vocab_size:
        raise UnsupportedError(f"{path}: token ids reach {max(tokens)} but the model has {vocab_size} embeddings")
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)]
    pre = _pre_tokenizer(spec.get("pre_tokenizer"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(names)
    writer.add_token_types(kinds)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    return f"gpt2 BPE, {vocab_size} tokens, {len(special.merges)} merges, pre-tokenizer {pre}"
