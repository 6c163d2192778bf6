"""Perplexity: the sliding windows, exact token counts, and agreement with direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import DataError, ModelError
from lowbit.evaluation.perplexity import perplexity, perplexity_of_ids, windows


def hf_reference_nll(model, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """The Hugging Face guide's loop (labels masked with -100, the model's own shifted loss),
    with the scored tokens counted from the shifted labels."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + seq_len, ids.numel())
        trg_len = end - prev_end
        window = ids[begin:end].unsqueeze(0)
        labels = window.clone()
        labels[:, :-trg_len] = -100
        scored = int((labels[:, 1:] != -100).sum())
        if scored:
            with torch.no_grad():
                loss = model(window, labels=labels, use_cache=False).loss
            total += float(loss) * scored
            count += scored
        prev_end = end
        if end == ids.numel():
            break
    return total, count


def test_windows_disjoint():
    assert windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert windows(9, 4, 4) == [(0, 4, 1), (4, 8, 5)]  # the last window [8, 9) scores nothing
    assert windows(3, 8, 8) == [(0, 3, 1)]


def test_windows_score_each_token_once():
    for total, seq_len, stride in [(100, 16, 5), (97, 32, 32), (50, 7, 1), (33, 8, 3), (64, 8, 8)]:
        spans = windows(total, seq_len, stride)
        scored = [t for _, end, first in spans for t in range(first, end)]
        if stride < seq_len:  # every token but the first, each with >= seq_len - stride tokens of context
            assert scored == list(range(1, total))
            assert all(first - begin >= seq_len - stride for begin, _, first in spans[1:])
        else:  # disjoint windows: the first token of each window has no context and is not scored
            assert scored == [t for t in range(total) if t % seq_len]


@pytest.mark.parametrize(("seq_len", "stride"), [(32, 32), (32, 8), (32, 31), (16, 1), (128, 128)])
def test_matches_the_hugging_face_loop(tiny_llama, seq_len, stride):
    ids = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(1))
    got = perplexity_of_ids(tiny_llama, ids, seq_len, stride)
    total, count = hf_reference_nll(tiny_llama, ids, seq_len, stride)
    assert got["tokens"] == count
    assert got["nll_per_token"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    expected_windows = math.ceil(max(150 - seq_len, 0) / stride) + 1
    assert got["windows"] == expected_windows
    assert (got["seq_len"], got["stride"]) == (seq_len, stride)


def test_token_counts(tiny_llama):
    ids = torch.randint(0, 64, (100,), generator=torch.Generator().manual_seed(2))
    assert perplexity_of_ids(tiny_llama, ids, 32)["tokens"] == 100 - 4  # 4 windows, first token of each unscored
    assert perplexity_of_ids(tiny_llama, ids, 32, stride=16)["tokens"] == 99  # every token but the first


def test_context_free_model_gives_the_bigram_nll():
    """A model that only looks at the current token: perplexity is the mean bigram NLL over the
    scored tokens, whatever the windows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)).eval()
    ids = torch.randint(0, 16, (60,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logp = torch.log_softmax(model(ids), dim=-1)
    per_token = -logp[:-1].gather(1, ids[1:, None]).squeeze(1)  # NLL of token t + 1 given token t
    got = perplexity_of_ids(model, ids, seq_len=10, stride=3)
    assert got["nll_per_token"] == pytest.approx(float(per_token.mean()), rel=1e-6)
    disjoint = perplexity_of_ids(model, ids, seq_len=10)
    unscored = torch.tensor([0, 10, 20, 30, 40, 50])  # first token of each window
    keep = torch.ones(59, dtype=torch.bool)
    keep[unscored[1:] - 1] = False
    assert disjoint["tokens"] == 54
    assert disjoint["nll_per_token"] == pytest.approx(float(per_token[keep].mean()), rel=1e-6)


def test_overlap_never_hurts_much_and_is_deterministic(tiny_llama, char_tokenizer, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    a = perplexity(tiny_llama, char_tokenizer, path, seq_len=64, max_tokens=300)
    b = perplexity(tiny_llama, char_tokenizer, path, seq_len=64, max_tokens=300)
    assert a["perplexity"] == b["perplexity"] and a["tokens"] == 300 - 5
    assert a["data"] == str(path)
    assert set(a) == {"perplexity", "nll_per_token", "tokens", "windows", "seq_len", "stride", "seconds", "data"}


def test_default_data_is_wikitext_test(tiny_llama, char_tokenizer):
    got = perplexity(tiny_llama, char_tokenizer, seq_len=64, max_tokens=128)
    assert got["data"].endswith("test.txt") and got["tokens"] == 126


def test_errors(tiny_llama, char_tokenizer, tmp_path):
    ids = torch.arange(10)
    with pytest.raises(DataError, match="seq_len=1"):
        perplexity_of_ids(tiny_llama, ids, seq_len=1)
    with pytest.raises(DataError, match="stride=9"):
        perplexity_of_ids(tiny_llama, ids, seq_len=8, stride=9)
    with pytest.raises(DataError, match="1 token"):
        perplexity_of_ids(tiny_llama, ids[:1], seq_len=8)
    with pytest.raises(DataError, match="no tokenizer"):
        perplexity(tiny_llama, None)
    with pytest.raises(DataError, match="max_tokens=1"):
        perplexity(tiny_llama, char_tokenizer, max_tokens=1)
    with pytest.raises(ModelError, match="expected logits"):
        perplexity_of_ids(torch.nn.Flatten(), ids, seq_len=8)
    with pytest.raises(ModelError, match="ids up to 63 but the model has 4 logits"):
        perplexity_of_ids(torch.nn.Embedding(64, 4), torch.tensor([0, 63, 1]), seq_len=8)


@pytest.mark.slow
def test_smollm2_wikitext_slice():
    """Real SmolLM2-135M on the first 4,096 WikiText-2 test tokens, windows of 512."""
    from lowbit.models import load_model

    loaded = load_model("builtin:smollm2-135m")
    got = perplexity(loaded.model, loaded.tokenizer, seq_len=512, max_tokens=4096)
    assert got["tokens"] == 4096 - 8 and got["windows"] == 8
    assert got["perplexity"] == pytest.approx(27.61, rel=0.02)  # measured 27.614 on CPU fp32
