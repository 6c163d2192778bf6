"""Tiny models and tokenizers built in the test: a Llama LM, a BERT encoder, a char tokenizer."""

from __future__ import annotations

import pytest
import torch

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "fast", "slow", "big", "small", "red", "blue", ".", ","]


class CharTokenizer:
    """Maps each character to an id below ``vocab`` (what perplexity needs from a tokenizer)."""

    def __init__(self, vocab: int = 64) -> None:
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % self.vocab for c in text]}


@pytest.fixture(scope="session")
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer(64)


@pytest.fixture(scope="session")
def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def word_tokenizer():
    """A whitespace word-level tokenizer with BERT's special tokens ([CLS] x [SEP], padding)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def make_bert(seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


@pytest.fixture(scope="session")
def tiny_bert() -> torch.nn.Module:
    return make_bert(0)


@pytest.fixture(scope="session")
def bert_factory():
    """``make_bert(seed)``: a fresh tiny BERT for tests that change weights."""
    return make_bert
