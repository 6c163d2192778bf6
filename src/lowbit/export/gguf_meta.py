"""GGUF metadata for the causal LMs llama.cpp runs as its ``llama`` graph (Llama, Mistral) or its
``qwen2`` graph (Qwen2): which graph a Hugging Face ``model_type`` maps to, hyper-parameters from its
config, the GPT-2-style BPE vocabulary from ``tokenizer.json`` (what llama.cpp needs to load it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from ..errors import CheckpointError, UnsupportedError


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face ``model_type`` is written: llama.cpp's graph for it, and whether q/k rows
    are permuted (llama.cpp's ``llama`` rope rotates adjacent pairs; ``qwen2`` rotates halves, as HF)."""

    graph: gguf.MODEL_ARCH
    permute_qk: bool

    @property
    def name(self) -> str:
        """llama.cpp's name for the graph: ``general.architecture`` and the prefix of its keys."""
        return gguf.MODEL_ARCH_NAMES[self.graph]


# llama.cpp's convert_hf_to_gguf.py runs Mistral as llama and Qwen2 as qwen2 (NEOX rope, q/k/v biases)
ARCHS = {
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}


def check_config(config: Any, where: str) -> Arch:
    """The llama.cpp graph for ``config``; refuses configs that graph would run differently."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UnsupportedError(
            f"{where}: GGUF export handles the causal LMs llama.cpp runs as llama or qwen2 (model_type "
            f"{', '.join(repr(t) for t in ARCHS)}: Llama/SmolLM2, Mistral, Qwen2/Qwen2.5); this checkpoint is "
            f"{model_type!r}. Export it with --format onnx or --format hf instead"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedError(f"{where}: hidden_act={act!r}; llama.cpp's {ARCHS[model_type].name} graph uses silu")
    rope = _rope(config)
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ("default", "linear"):
        raise UnsupportedError(f"{where}: rope scaling {kind!r} is not exported; only default and linear are")
    return ARCHS[model_type]


def _rope(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)


def head_dim(config: Any) -> int:
    """Width of one attention head: ``config.head_dim`` where set (Mistral Nemo: not hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window(config: Any) -> int | None:
    """The attention window transformers applies to at least one layer (Mistral, Qwen2 with
    ``use_sliding_window``), or None where every layer attends to the whole context."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def context_length(config: Any) -> tuple[int, bool]:
    """The context length to write and whether a sliding window cut it: llama.cpp's llama and qwen2
    graphs attend to everything, so they agree with transformers only within the window."""
    longest = int(config.max_position_embeddings)
    window = sliding_window(config)
    if window is not None and window < longest:
        return window, True
    return longest, False


def add_hparams(writer: gguf.GGUFWriter, config: Any, name: str) -> dict[str, Any]:
    """{arch}.* keys (the writer's architecture): sizes, heads, rope, norm epsilon. Returns the
    context length written and whether a sliding window limited it, for the report."""
    rope = _rope(config)
    context, limited = context_length(config)
    writer.add_name(name)
    writer.add_context_length(context)
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
    return {"context_length": context, "context_length_limited_to_sliding_window": limited}


_CONTRACTIONS_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_CASED_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
)
# tokenizer.json Split regexes (then ByteLevel without its own regex) -> llama.cpp's pre-tokenizer of
# the same split; llama-vocab.cpp quotes each original beside the rewrite it runs
_SPLIT_REGEXES = {
    _CONTRACTIONS_WORDS + r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    _CONTRACTIONS_WORDS + r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    _CASED_WORDS + r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "tekken",
}


def _pre_tokenizer(spec: dict[str, Any] | None) -> str:
    """llama.cpp's name for the pre-tokenizer: 'gpt-2' for a plain byte-level regex split,
    'smollm' when digits are split one by one first (SmolLM's original tokenizer), 'qwen2' /
    'llama-bpe' / 'tekken' for Qwen2's / Llama 3's / Mistral Nemo's regex split, else 'default'."""
    if not spec:
        return "default"
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    parts = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else []
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex")) for p in parts]
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    if kinds == [("Split", None, None), ("ByteLevel", None, False)]:
        split = parts[0]
        if split.get("behavior") == "Isolated" and not split.get("invert"):
            return _SPLIT_REGEXES.get((split.get("pattern") or {}).get("Regex"), "default")
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
