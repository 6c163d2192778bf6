"""Sentence embeddings, fidelity to a reference, Spearman correlation and word similarity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.errors import DataError, ModelError
from lowbit.evaluation.embedding import (
    average_ranks,
    embedding_fidelity,
    nearest_neighbours,
    sentence_embeddings,
    spearman,
    word_similarity,
)

SENTENCES = [
    "the cat sat on a mat .",
    "a dog ran fast",
    "the big red dog sat on the small blue mat , slow",
    "cat",
    "the slow cat ran on a big mat",
    "a small dog , a big cat .",
]


def test_embeddings_match_unpadded_one_by_one(tiny_bert, word_tokenizer):
    """Batched with padding equals each sentence alone: padding is masked out of the mean."""
    got = sentence_embeddings(tiny_bert, word_tokenizer, SENTENCES, batch_size=4)
    assert got.shape == (len(SENTENCES), 32) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(SENTENCES)))
    for i, sentence in enumerate(SENTENCES):
        with torch.no_grad():
            hidden = tiny_bert(**word_tokenizer(sentence, return_tensors="pt")).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.mean(0), dim=0)
        torch.testing.assert_close(got[i], expected, atol=1e-5, rtol=1e-5)


def test_embeddings_reject_a_non_encoder(word_tokenizer):
    class Scalar(torch.nn.Module):
        def forward(self, **batch):
            return {"pooled": torch.zeros(1)}

    with pytest.raises(ModelError, match="last_hidden_state"):
        sentence_embeddings(Scalar(), word_tokenizer, SENTENCES)


def test_nearest_neighbours_hand_example():
    vectors = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.2, 1.0]]), dim=1)
    assert nearest_neighbours(vectors).tolist() == [1, 0, 3, 2]


def test_fidelity_against_itself_and_a_perturbed_copy(tiny_bert, word_tokenizer, bert_factory):
    same = embedding_fidelity(tiny_bert, tiny_bert, word_tokenizer, SENTENCES)
    assert same == {
        "mean_cosine": pytest.approx(1.0, abs=1e-12),
        "min_cosine": pytest.approx(1.0, abs=1e-12),
        "top1_agreement": 1.0,
        "sentences": len(SENTENCES),
    }
    noisy = bert_factory(0)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = embedding_fidelity(noisy, tiny_bert, word_tokenizer, SENTENCES)
    ours = sentence_embeddings(noisy, word_tokenizer, SENTENCES)
    theirs = sentence_embeddings(tiny_bert, word_tokenizer, SENTENCES)
    cosine = (ours * theirs).sum(1)
    assert got["mean_cosine"] == pytest.approx(float(cosine.mean()), abs=1e-6) and got["mean_cosine"] < 0.9999
    assert got["min_cosine"] == pytest.approx(float(cosine.min()), abs=1e-6)
    agree = (nearest_neighbours(ours) == nearest_neighbours(theirs)).float().mean()
    assert got["top1_agreement"] == pytest.approx(float(agree))


def test_fidelity_needs_two_sentences(tiny_bert, word_tokenizer):
    with pytest.raises(DataError, match="need at least 2"):
        embedding_fidelity(tiny_bert, tiny_bert, word_tokenizer, ["one"])


def test_average_ranks():
    assert average_ranks(np.array([10, 20, 20, 20, 5])).tolist() == [2, 4, 4, 4, 1]
    assert average_ranks(np.array([3.0, 1.0, 2.0])).tolist() == [3, 1, 2]


def test_spearman_hand_example_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], ranks y = [1, 3, 2, 4]: sum(dx*dy) = 4.5, sum(dx^2) = 4.5,
    # sum(dy^2) = 5, so rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), abs=1e-12)


def test_spearman_without_ties_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    d = average_ranks(x) - average_ranks(y)
    assert spearman(x, y) == pytest.approx(1 - 6 * (d**2).sum() / (50 * (50**2 - 1)), abs=1e-12)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones(50)))
    assert math.isnan(spearman([1.0, float("nan"), 3.0], [1, 2, 3]))


def test_spearman_errors():
    with pytest.raises(DataError, match="equal length"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(DataError, match="equal length >= 2"):
        spearman([1], [1])


def test_word_similarity(tiny_bert, word_tokenizer):
    pairs = [("cat", "dog", 7.0), ("cat", "mat", 2.0), ("big", "small", 5.0), ("red", "blue", 6.5)]
    got = word_similarity(tiny_bert, word_tokenizer, pairs)
    vectors = sentence_embeddings(tiny_bert, word_tokenizer, ["cat", "dog", "mat", "big", "small", "red", "blue"])
    cos = [float(vectors[a] @ vectors[b]) for a, b in [(0, 1), (0, 2), (3, 4), (5, 6)]]
    assert got == {"spearman": pytest.approx(spearman(cos, [7.0, 2.0, 5.0, 6.5])), "pairs": 4}
    with pytest.raises(DataError, match="need at least 2"):
        word_similarity(tiny_bert, word_tokenizer, pairs[:1])


@pytest.fixture(scope="module")
def minilm():
    from lowbit.models import load_model

    return load_model("builtin:minilm")


@pytest.mark.slow
def test_minilm_fidelity_against_itself(minilm):
    from lowbit.data import sentences

    got = embedding_fidelity(minilm.model, minilm.model, minilm.tokenizer, sentences(count=200))
    assert got["mean_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert got["min_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert got["top1_agreement"] == 1.0 and got["sentences"] == 200


@pytest.mark.slow
@pytest.mark.parametrize(("name", "floor"), [("wordsim353", 0.70), ("simlex999", 0.42)])
def test_minilm_word_similarity(minilm, name, floor):
    """Measured on CPU fp32: WordSim353 0.729, SimLex999 0.446."""
    from lowbit.data import word_pairs

    got = word_similarity(minilm.model, minilm.tokenizer, word_pairs(name))
    assert got["spearman"] > floor
