"""Calibration and evaluation data: WikiText-2, sentences, word-similarity sets and images.

Every function is deterministic: random choices take a seed and use their own generator.
Optional data (gensim's word lists, scikit-learn digits, scikit-image photos) is found
lazily, with an error that says which package to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DataError

WIKITEXT_SPLITS = ("test", "valid")
WORD_PAIRS = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}
# The RGB natural photos that ship inside the scikit-image wheel (nothing is downloaded).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_GENSIM_INSTALL = "pip install --no-deps gensim"
_ABBREVIATIONS = {"dr.", "mr.", "mrs.", "ms.", "prof.", "st.", "jr.", "sr.", "vs.", "etc.", "e.g.", "i.e.", "no."}


def data_root() -> Path:
    """The data folder: ``$LOWBIT_DATA``, else the nearest ``data/wikitext-2`` (the copy kept in
    the repository) or ``shared/data`` above the current directory or this package."""
    env = os.environ.get("LOWBIT_DATA")
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"LOWBIT_DATA={env}: not a directory; point it at the folder holding wikitext-2/")
        return root
    seen: set[Path] = set()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for ancestor in (start, *start.parents):
            for candidate in (ancestor / "data", ancestor / "shared" / "data", ancestor.parent / "shared" / "data"):
                if candidate in seen:
                    continue
                seen.add(candidate)
                if (candidate / "wikitext-2").is_dir():
                    return candidate
    raise DataError(
        f"no shared/data folder found above {Path.cwd()} or {Path(__file__).parent}; "
        "set LOWBIT_DATA to the folder holding wikitext-2/"
    )


def wikitext(split: str = "test") -> Path:
    """Path of the WikiText-2 ``split`` ("test" for perplexity, "valid" for calibration)."""
    if split not in WIKITEXT_SPLITS:
        raise DataError(f"wikitext split {split!r} is unknown; use one of {', '.join(WIKITEXT_SPLITS)}")
    path = data_root() / "wikitext-2" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"{path}: WikiText-2 {split} split is missing; put {split}.txt there or set LOWBIT_DATA")
    return path


def read_text(path: str | Path) -> str:
    """The UTF-8 text of ``path`` without a byte-order mark; errors for missing, empty or binary files."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise DataError(f"{path}: {what}; give a UTF-8 text file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); give a UTF-8 text file") from exc
    if "\x00" in text:
        raise DataError(f"{path}: holds NUL bytes, so it is binary, not text; give a UTF-8 text file")
    if not text.strip():
        raise DataError(f"{path}: is empty; give a file with text in it")
    return text


def token_stream(tokenizer: Any, path: str | Path) -> torch.Tensor:
    """The whole file tokenized once, without special tokens: int64 [T]."""
    text = read_text(path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def lm_calibration(
    tokenizer: Any, path: str | Path | None = None, samples: int = 128, seq_len: int = 512, seed: int = 0
) -> list[torch.Tensor]:
    """``samples`` random windows of ``seq_len`` tokens ([1, seq_len] int64 each) from ``path``
    (default: WikiText-2 valid), drawn with ``seed``."""
    if samples < 1 or seq_len < 1:
        raise DataError(f"lm_calibration: samples={samples}, seq_len={seq_len}; both must be at least 1")
    path = Path(path) if path is not None else wikitext("valid")
    ids = token_stream(tokenizer, path)
    if ids.numel() < seq_len:
        raise DataError(
            f"{path}: has {ids.numel()} tokens, fewer than seq_len={seq_len}; use a smaller seq_len or a longer file"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=generator)
    return [ids[s : s + seq_len].unsqueeze(0).clone() for s in starts.tolist()]


def _is_heading(line: str) -> bool:
    return line.startswith("=") and line.endswith("=")


def _detokenize(sentence: str) -> str:
    """Undo WikiText's word-level spacing: ``a @-@ b`` -> ``a-b``, ``word ,`` -> ``word,``."""
    sentence = re.sub(r" @(.)@ ", r"\1", sentence)
    sentence = re.sub(r" ([,.;:!?)])(?=\s|$)", r"\1", sentence)
    sentence = re.sub(r" (n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", sentence)
    return re.sub(r"\( ", "(", sentence).strip()


def _split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph: split after " . " (word-tokenized text such as WikiText) or
    else after ., ! or ? followed by a capital letter."""
    if re.search(r" [.!?] ", paragraph + " "):
        parts = re.split(r"(?<= [.!?]) ", paragraph + " ")
    else:
        parts = []
        for part in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'])", paragraph):
            last = parts[-1].split()[-1] if parts else ""
            if last.lower() in _ABBREVIATIONS or re.fullmatch(r"[A-Z]\.", last):  # "Dr. Smith", "J. Smith"
                parts[-1] += " " + part
            else:
                parts.append(part)
    return [_detokenize(p) for p in parts if p.strip()]


def sentences(
    path: str | Path | None = None, count: int = 1000, seed: int = 0, min_words: int = 6, max_words: int = 60
) -> list[str]:
    """``count`` distinct real sentences of ``min_words``..``max_words`` words from a text file
    (default: WikiText-2 test), sampled with ``seed``, in file order; all of them if fewer.
    Headings and sentences holding WikiText's ``<unk>`` are skipped."""
    if count < 1 or min_words < 1 or max_words < min_words:
        raise DataError(
            f"sentences: count={count}, min_words={min_words}, max_words={max_words}; "
            "need count >= 1 and 1 <= min_words <= max_words"
        )
    path = Path(path) if path is not None else wikitext("test")
    found: dict[str, None] = {}  # ordered set
    for line in read_text(path).splitlines():
        line = line.strip()
        if not line or _is_heading(line):
            continue
        for sentence in _split_sentences(line):
            if "<unk>" not in sentence and min_words <= len(sentence.split()) <= max_words:
                found.setdefault(sentence)
    pool = list(found)
    if not pool:
        raise DataError(f"{path}: no sentence of {min_words}..{max_words} words found; give a file of prose")
    if len(pool) <= count:
        return pool
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(pool), generator=generator)[:count].sort().values
    return [pool[i] for i in chosen.tolist()]


def encoder_batches(
    tokenizer: Any, texts: list[str], batch_size: int = 16, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches (padded, truncated to ``max_length``) for running an encoder."""
    if not texts:
        raise DataError("encoder_batches: no sentences given; pass at least one")
    if batch_size < 1:
        raise DataError(f"encoder_batches: batch_size={batch_size}; use 1 or more")
    batches = []
    for i in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batches.append(dict(encoded))
    return batches


def _package_dir(package: str) -> Path | None:
    """Where ``package`` is installed, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def word_pairs(name: str) -> list[tuple[str, str, float]]:
    """Human-rated word pairs (word1, word2, score) of ``"wordsim353"`` or ``"simlex999"``,
    read from the files that ship in the gensim wheel (gensim itself is never imported)."""
    if name not in WORD_PAIRS:
        raise DataError(f"word-pair set {name!r} is unknown; use one of {', '.join(WORD_PAIRS)}")
    package = _package_dir("gensim")
    if package is None:
        raise DataError(
            f"word-pair set {name} ships in the gensim wheel, which is not installed; run `{_GENSIM_INSTALL}`"
        )
    path = package / "test" / "test_data" / WORD_PAIRS[name]
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed gensim; reinstall with `{_GENSIM_INSTALL}`")
    pairs = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            pairs.append((fields[0].strip(), fields[1].strip(), float(fields[2])))
        except (IndexError, ValueError) as exc:
            raise DataError(f"{path}:{number}: expected 'word1<TAB>word2<TAB>score', got {line!r}") from exc
    return pairs


@dataclass
class ImageSet:
    """Images for classification: a batch [N, C, H, W] or a list of [C, H, W] of different
    sizes; ``labels`` int64 [N] when known; ``names`` one per image."""

    images: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor | None
    names: list[str]

    def __len__(self) -> int:
        return len(self.images)


def _import(module: str, install: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DataError(f"{what} needs {module.split('.')[0]}, which is not installed; run `{install}`") from exc


def _digits() -> ImageSet:
    datasets = _import("sklearn.datasets", "pip install scikit-learn", "images('digits')")
    digits = datasets.load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # 0..16 -> [0, 1]
    labels = torch.from_numpy(digits.target).long()
    return ImageSet(images, labels, [f"digit-{i}" for i in range(len(labels))])


def _hwc_to_chw(array: Any) -> torch.Tensor:
    image = torch.from_numpy(array.copy())
    if image.dim() == 2:
        image = image.unsqueeze(-1).expand(-1, -1, 3)
    return image[..., :3].permute(2, 0, 1).contiguous()


def _photos() -> ImageSet:
    skdata = _import("skimage.data", "pip install scikit-image", "images('photos')")
    images = [_hwc_to_chw(getattr(skdata, name)()) for name in PHOTOS]
    return ImageSet(images, None, list(PHOTOS))


def photo_crops(count: int = 64, seed: int = 0, min_fraction: float = 0.4) -> ImageSet:
    """``count`` seeded random square crops (side ``min_fraction``..1 of the shorter side, half of
    them mirrored) of the sample photos: more, varied inputs for top-1 agreement."""
    if count < 1 or not 0 < min_fraction <= 1:
        raise DataError(f"photo_crops: count={count}, min_fraction={min_fraction}; need count >= 1, 0 < fraction <= 1")
    photos = _photos()
    generator = torch.Generator().manual_seed(seed)
    crops, names = [], []
    for k in range(count):
        index = k % len(photos)
        photo = photos.images[index]
        _, height, width = photo.shape
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        side = max(1, round(min(height, width) * (min_fraction + (1 - min_fraction) * u[0])))
        top, left = int(u[1] * (height - side + 1)), int(u[2] * (width - side + 1))
        crop = photo[:, top : top + side, left : left + side]
        crops.append(crop.flip(-1).contiguous() if u[3] < 0.5 else crop.contiguous())
        names.append(
            f"{photos.names[index]}[{top}:{top + side},{left}:{left + side}]{'-mirrored' if u[3] < 0.5 else ''}"
        )
    return ImageSet(crops, None, names)


def _folder(folder: Path) -> ImageSet:
    image_module = _import("PIL.Image", "pip install pillow", f"images({str(folder)!r})")
    import numpy as np

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}); give a folder of images")
    images = []
    for file in files:
        try:
            with image_module.open(file) as img:
                images.append(_hwc_to_chw(np.asarray(img.convert("RGB"))))
        except OSError as exc:
            raise DataError(f"{file}: cannot be read as an image ({exc}); remove it or replace it") from exc
    return ImageSet(images, None, [f.name for f in files])


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx(path: Path) -> torch.Tensor:
    """An IDX file (gzip or raw): the MNIST family's format, big-endian dims, uint8 data."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim :]
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08 or len(body) != math.prod(dims):
        raise DataError(f"{path}: not a uint8 IDX file of the declared size; the file is corrupt")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def fashion_mnist(split: str = "train", root: Path | None = None) -> ImageSet:
    """Fashion-MNIST (Debian's dataset-fashion-mnist): uint8 images [N, 1, 28, 28] + labels."""
    root = Path(os.environ.get("LOWBIT_FASHION_MNIST", root or FASHION_MNIST))
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"fashion-mnist split {split!r} is unknown; use train or test")
    files = [root / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    if not all(f.is_file() for f in files):
        raise DataError(f"Fashion-MNIST not found in {root}; install it: apt-get install -y dataset-fashion-mnist")
    images, labels = _idx(files[0]).unsqueeze(1), _idx(files[1]).long()
    return ImageSet(images, labels, [f"{split}-{i}" for i in range(len(labels))])


def images(name: str | Path) -> ImageSet:
    """``"digits"`` (scikit-learn 8x8 digits, float [N, 1, 8, 8] in [0, 1], with labels),
    ``"photos"`` (scikit-image sample photos, uint8 [3, H, W] each), ``"photo-crops"`` (64
    seeded crops of them) or a folder of images (uint8 [3, H, W] each, in name order)."""
    if name == "digits":
        return _digits()
    if name == "photos":
        return _photos()
    if name == "photo-crops":
        return photo_crops()
    folder = Path(name)
    if folder.is_dir():
        return _folder(folder)
    raise DataError(
        f"image set {str(name)!r} is unknown; use 'digits', 'photos', 'photo-crops' or a folder of PNG/JPEG images"
    )
