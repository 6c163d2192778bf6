"""lowbit.evaluation.evaluate: the CLI contract, task dispatch, options and error messages."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import DataError, ModelError
from lowbit.evaluation import evaluate
from lowbit.evaluation.perplexity import perplexity
from lowbit.models import Loaded

CONTRACT = {"task", "metrics", "size_bytes", "bits_per_weight", "model", "data"}


def test_perplexity_task(tiny_llama, char_tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some text to score, " * 30)
    got = evaluate(tiny_llama, "perplexity", data=path, tokenizer=char_tokenizer, seq_len=64, stride=32)
    assert set(got) == CONTRACT and got["task"] == "perplexity" and got["model"] == "LlamaForCausalLM"
    direct = perplexity(tiny_llama, char_tokenizer, path, seq_len=64, stride=32)
    assert got["metrics"]["perplexity"] == direct["perplexity"] and got["data"] == str(path)
    params = sum(p.numel() for p in tiny_llama.parameters())
    assert got["size_bytes"] >= params * 4 and got["bits_per_weight"] == 32.0
    with_ref = evaluate(tiny_llama, "perplexity", path, reference=tiny_llama, tokenizer=char_tokenizer, seq_len=64)
    assert with_ref["metrics"]["reference_perplexity"] == with_ref["metrics"]["perplexity"]


def test_embedding_task_with_and_without_reference(tiny_bert, word_tokenizer):
    loaded = Loaded(tiny_bert, "encoder", "tiny-bert", tokenizer=word_tokenizer, meta={"type": "hf"})
    got = evaluate(loaded, "embedding", reference=tiny_bert, count=40)
    assert set(got) == CONTRACT and got["model"] == "tiny-bert"
    metrics = got["metrics"]
    assert metrics["mean_cosine"] == pytest.approx(1.0) and metrics["top1_agreement"] == 1.0
    assert metrics["sentences"] == 40
    assert metrics["wordsim353_spearman"] == metrics["reference_wordsim353_spearman"]
    assert "simlex999_spearman" in metrics
    alone = evaluate(loaded, "embedding", word_sets=("wordsim353",))["metrics"]
    assert "mean_cosine" not in alone and set(alone) == {"wordsim353_spearman", "seconds"}


def test_classification_on_digits():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    got = evaluate(model, "classification", data="digits", reference=model)
    assert got["metrics"]["images"] == 1797 and 0 <= got["metrics"]["accuracy"] <= 1
    assert got["metrics"]["top1_agreement"] == 1.0 and got["data"] == "digits"


def test_errors(tiny_bert, word_tokenizer):
    with pytest.raises(DataError, match="use one of perplexity, embedding, classification"):
        evaluate(tiny_bert, "translation")
    with pytest.raises(DataError, match=r"\['seq_len'\] do not apply to 'embedding'"):
        evaluate(tiny_bert, "embedding", tokenizer=word_tokenizer, seq_len=3)
    with pytest.raises(DataError, match="needs a tokenizer"):
        evaluate(tiny_bert, "embedding")
    encoder = Loaded(tiny_bert, "encoder", "tiny-bert", tokenizer=word_tokenizer, meta={"type": "hf"})
    with pytest.raises(ModelError, match="tiny-bert is a 'encoder' model but task 'perplexity' needs a 'causal-lm'"):
        evaluate(encoder, "perplexity")
    with pytest.raises(ModelError, match=r"pass a lowbit Loaded or an nn\.Module"):
        evaluate("builtin:minilm", "embedding")


@pytest.mark.slow
def test_efficientnet_photo_agreement_with_itself():
    from lowbit.models import load_model

    loaded = load_model("builtin:efficientnet-lite0")
    got = evaluate(loaded, "classification", data="photos", reference=loaded)
    assert got["data"] == "photos" and got["metrics"]["images"] == 7
    assert got["metrics"]["top1_agreement"] == 1.0
    assert got["model"] == "builtin:efficientnet-lite0" and got["bits_per_weight"] == 32.0
