"""lowbit.data: where data lives, text reading, calibration windows, sentences, word pairs, images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lowbit import data
from lowbit.errors import DataError, LowbitError


class CharTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- data_root / wikitext -------------------------------------------------------------------------


def test_data_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    assert data.data_root() == tmp_path


def test_data_root_env_not_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="LOWBIT_DATA"):
        data.data_root()


def test_data_root_found_beside_a_checkout(tmp_path, monkeypatch):
    """A CI clone at <x>/repo with the data at <x>/shared/data, searched from a subfolder."""
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    (tmp_path / "shared" / "data" / "wikitext-2").mkdir(parents=True)
    work = tmp_path / "repo" / "tests" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "elsewhere" / "lowbit" / "data.py"))
    assert data.data_root() == tmp_path / "shared" / "data"


def test_data_root_found_from_the_package_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    (tmp_path / "ci" / "shared" / "data" / "wikitext-2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "ci" / "clone" / "src" / "lowbit" / "data.py"))
    assert data.data_root() == tmp_path / "ci" / "shared" / "data"


def test_data_root_prefers_the_repository_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    (tmp_path / "repo" / "data" / "wikitext-2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setattr(data, "__file__", str(tmp_path / "repo" / "src" / "lowbit" / "data.py"))
    assert data.data_root() == tmp_path / "repo" / "data"


def test_data_root_missing_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "pkg" / "data.py"))
    if any((p / "shared" / "data").is_dir() for p in (tmp_path, *tmp_path.parents)):
        pytest.fail(f"a shared/data folder above {tmp_path} defeats this test")
    with pytest.raises(DataError, match="set LOWBIT_DATA"):
        data.data_root()


def test_wikitext_paths_and_bad_split():
    assert data.wikitext("test").name == "test.txt"
    assert data.wikitext("valid").name == "valid.txt"
    with pytest.raises(DataError, match="use one of test, valid"):
        data.wikitext("train")


def test_wikitext_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    with pytest.raises(DataError, match=r"wikitext-2.*missing"):
        data.wikitext("test")


# --- read_text -----------------------------------------------------------------------------------


def test_read_text_strips_bom(tmp_path):
    path = write(tmp_path / "a.txt", "\ufeffhello\n".encode())
    assert data.read_text(path) == "hello\n"


def test_wikitext_valid_has_no_bom():
    assert not data.read_text(data.wikitext("valid")).startswith("\ufeff")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "does not exist"),
        ("", "is empty"),
        (" \n\n", "is empty"),
        (b"\xff\xfe\x00a", "not UTF-8"),
        (b"ab\x00cd", "binary"),
    ],
)
def test_read_text_errors(tmp_path, content, problem):
    path = tmp_path / "f.txt"
    if content is not None:
        write(path, content)
    with pytest.raises(DataError, match=problem) as info:
        data.read_text(path)
    assert str(path) in str(info.value)


def test_read_text_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        data.read_text(tmp_path)


# --- lm_calibration ------------------------------------------------------------------------------


def test_lm_calibration_windows_come_from_the_stream(tmp_path):
    text = "".join(chr(65 + i % 26) for i in range(1000))
    path = write(tmp_path / "t.txt", text)
    windows = data.lm_calibration(CharTokenizer(), path, samples=7, seq_len=50, seed=3)
    assert len(windows) == 7
    stream = [ord(c) for c in text]
    for w in windows:
        assert w.shape == (1, 50) and w.dtype == torch.int64
        start = stream.index(w[0, 0].item())  # the alphabet repeats, so check the whole window
        assert any(stream[s : s + 50] == w[0].tolist() for s in range(start, 1000 - 49, 26))


def test_lm_calibration_is_seeded(tmp_path):
    path = write(tmp_path / "t.txt", "".join(chr(32 + i % 90) for i in range(5000)))
    a = data.lm_calibration(CharTokenizer(), path, samples=5, seq_len=64, seed=0)
    b = data.lm_calibration(CharTokenizer(), path, samples=5, seq_len=64, seed=0)
    c = data.lm_calibration(CharTokenizer(), path, samples=5, seq_len=64, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_lm_calibration_defaults_to_wikitext_valid():
    windows = data.lm_calibration(CharTokenizer(), samples=2, seq_len=16)
    assert [w.shape for w in windows] == [(1, 16), (1, 16)]


def test_lm_calibration_exact_length_and_too_short(tmp_path):
    path = write(tmp_path / "t.txt", "abcdefgh")
    assert data.lm_calibration(CharTokenizer(), path, samples=3, seq_len=8)[0].tolist() == [list(b"abcdefgh")]
    with pytest.raises(DataError, match="has 8 tokens, fewer than seq_len=9"):
        data.lm_calibration(CharTokenizer(), path, samples=1, seq_len=9)
    with pytest.raises(DataError, match="samples=0"):
        data.lm_calibration(CharTokenizer(), path, samples=0, seq_len=4)


# --- sentences -----------------------------------------------------------------------------------

PROSE = """\ufeff
 = Heading of the article =

 The first sentence has exactly seven words here . A short one . The third sentence is a longer one \
with a guest @-@ starring role , yes .
 The first sentence has exactly seven words here . This one holds an <unk> word so it is skipped .

 = = Sub heading = =
 Last sentence of the file comes right here , at the end .
"""


def test_sentences_split_filter_dedupe(tmp_path):
    path = write(tmp_path / "p.txt", PROSE)
    got = data.sentences(path, count=100, min_words=6)
    assert got == [
        "The first sentence has exactly seven words here.",
        "The third sentence is a longer one with a guest-starring role, yes.",
        "Last sentence of the file comes right here, at the end.",
    ]
    assert data.sentences(path, count=100, min_words=6, max_words=9) == got[:1]


def test_sentences_plain_prose(tmp_path):
    path = write(tmp_path / "p.txt", "Dr. J. Smith went home early today. Then he cooked a big dinner for all!\n")
    assert data.sentences(path, min_words=3) == [
        "Dr. J. Smith went home early today.",
        "Then he cooked a big dinner for all!",
    ]


def test_sentences_sample_is_seeded_and_in_file_order():
    a = data.sentences(count=50, seed=0)
    assert a == data.sentences(count=50, seed=0)
    assert a != data.sentences(count=50, seed=1)
    everything = data.sentences(count=10**6)
    assert len(everything) > 1000 and len(set(everything)) == len(everything)
    positions = [everything.index(s) for s in a]
    assert positions == sorted(positions)
    assert all(6 <= len(s.split()) <= 60 and "<unk>" not in s and "@" not in s for s in everything)


def test_sentences_errors(tmp_path):
    path = write(tmp_path / "p.txt", " = Only a heading =\n")
    with pytest.raises(DataError, match=r"no sentence of 6\.\.60 words"):
        data.sentences(path)
    with pytest.raises(DataError, match="min_words"):
        data.sentences(path, min_words=10, max_words=5)


# --- encoder_batches -----------------------------------------------------------------------------


def test_encoder_batches(tmp_path):
    from transformers import AutoTokenizer

    from lowbit.models import builtin_path

    tokenizer = AutoTokenizer.from_pretrained(builtin_path("minilm"))
    texts = ["a b", "a much longer sentence than the first one", "c", "word " * 300]
    batches = data.encoder_batches(tokenizer, texts, batch_size=3, max_length=32)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    assert batches[1]["input_ids"].shape[1] == 32  # truncated
    assert batches[0]["attention_mask"].sum(1).tolist()[2] == 3  # [CLS] c [SEP], then padding
    assert all(isinstance(b, dict) for b in batches)
    with pytest.raises(DataError, match="no sentences"):
        data.encoder_batches(tokenizer, [])


# --- word pairs ----------------------------------------------------------------------------------


def test_word_pairs():
    ws = data.word_pairs("wordsim353")
    sl = data.word_pairs("simlex999")
    assert len(ws) == 353 and len(sl) == 999
    assert ws[0] == ("love", "sex", 6.77)
    assert sl[0] == ("old", "new", 1.58)
    assert all(isinstance(s, float) and 0 <= s <= 10 for _, _, s in ws + sl)


def test_word_pairs_errors(monkeypatch):
    with pytest.raises(DataError, match="use one of wordsim353, simlex999"):
        data.word_pairs("men3000")
    monkeypatch.setattr(data, "_package_dir", lambda package: None)
    with pytest.raises(DataError, match="pip install --no-deps gensim"):
        data.word_pairs("wordsim353")


# --- images --------------------------------------------------------------------------------------


def test_digits():
    digits = data.images("digits")
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.float32
    assert digits.images.min() == 0 and digits.images.max() == 1
    assert digits.labels.shape == (1797,) and set(digits.labels.tolist()) == set(range(10))


def test_photos_and_crops():
    photos = data.images("photos")
    assert len(photos) == len(data.PHOTOS) >= 5 and photos.labels is None
    assert all(p.dtype == torch.uint8 and p.dim() == 3 and p.shape[0] == 3 for p in photos.images)
    crops = data.images("photo-crops")
    assert len(crops) == 64 and crops.names == data.photo_crops().names
    assert all(c.shape[0] == 3 and c.shape[1] == c.shape[2] >= 100 for c in crops.images)
    assert crops.names != data.photo_crops(seed=1).names


def test_image_folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (10, 6), (255, 0, 0)).save(tmp_path / "b.png")
    Image.new("L", (4, 4), 7).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = data.images(tmp_path)
    assert folder.names == ["a.jpg", "b.png"]
    assert folder.images[1].shape == (3, 6, 10) and folder.images[1][0].eq(255).all()
    assert folder.images[0].shape == (3, 4, 4)


def test_image_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no image files"):
        data.images(tmp_path)
    with pytest.raises(DataError, match="'digits', 'photos'"):
        data.images("imagenet")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        data.images("digits")


def test_errors_are_lowbit_errors():
    assert issubclass(DataError, LowbitError)
