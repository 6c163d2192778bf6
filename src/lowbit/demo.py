"""`lowbit demo`: quantize the bundled real models with several recipes and show the cost.

MiniLM (sentence encoder): embedding cosine and nearest-neighbour agreement with float.
SmolLM2-135M (causal LM): WikiText-2 test perplexity on a slice. Plus size, bits/weight and
latency for every row, float included, measured in the same run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import data
from .errors import ModelError
from .evaluation.embedding import nearest_neighbours, sentence_embeddings
from .evaluation.latency import latency
from .evaluation.perplexity import perplexity
from .evaluation.size import model_size
from .evaluation.weights import format_study, linear_weights
from .formats import Binary, Codebook, Float, Int, Log2, NormalFloat, Ternary
from .granularity import PerChannel, PerGroup, PerTensor
from .io import read_safetensors
from .models import builtin_path, load_model
from .quantize import quantize
from .ranges import MSE
from .spec import QuantSpec

MINILM_RECIPES = ("int8-dynamic", "w8-weight", "w4-g128", "nf4-g64")
SMOLLM_RECIPES = ("w8-weight", "w4-g128")


def _row(model: str, recipe: str, loaded_model, quality: dict, latency_ms: float, seconds: float) -> dict:
    size = model_size(loaded_model)
    return {
        "model": model,
        "recipe": recipe,
        "size_mb": size["bytes"] / 1e6,
        "bits_per_weight": size["quantized_bits_per_weight"] or size["bits_per_weight"],
        **quality,
        "latency_ms": latency_ms,
        "quantize_seconds": seconds,
    }


def _minilm_rows(count: int, log: Callable[[str], None]) -> list[dict]:
    sentences = data.sentences(count=count)
    ref = load_model("builtin:minilm")
    tok = ref.tokenizer
    batch = dict(tok(sentences[:16], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))

    def measure(model) -> tuple[torch.Tensor, float]:
        emb = sentence_embeddings(model, tok, sentences)
        timing = latency(lambda: model(**batch), warmup=2, repeat=5, min_seconds=0.5)
        return emb, timing["median_ms"]

    log("MiniLM float")
    ref_emb, ref_ms = measure(ref.model)
    ref_nn = nearest_neighbours(ref_emb)
    rows = [
        _row(
            "builtin:minilm",
            "float32",
            ref.model,
            {"metric": "cosine / top-1", "cosine": 1.0, "top1": 1.0},
            ref_ms,
            0.0,
        )
    ]
    for recipe in MINILM_RECIPES:
        log(f"MiniLM {recipe}")
        loaded = load_model("builtin:minilm")
        start = time.perf_counter()
        quantize(loaded, recipe)
        seconds = time.perf_counter() - start
        emb, ms = measure(loaded.model)
        quality = {
            "metric": "cosine / top-1",
            "cosine": float((emb * ref_emb).sum(dim=1).mean()),
            "top1": float((nearest_neighbours(emb) == ref_nn).float().mean()),
        }
        rows.append(_row("builtin:minilm", recipe, loaded.model, quality, ms, seconds))
    return rows


def _smollm_rows(max_tokens: int, log: Callable[[str], None]) -> list[dict]:
    rows = []
    ids = torch.arange(128).unsqueeze(0) + 1000
    for recipe in ("float32", *SMOLLM_RECIPES):
        log(f"SmolLM2 {recipe}")
        loaded = load_model("builtin:smollm2-135m")
        start = time.perf_counter()
        if recipe != "float32":
            quantize(loaded, recipe)
        seconds = time.perf_counter() - start
        ppl = perplexity(loaded.model, loaded.tokenizer, max_tokens=max_tokens)
        timing = latency(lambda m=loaded.model: m(input_ids=ids), warmup=1, repeat=3, min_seconds=0.5)
        quality = {"metric": "perplexity", "perplexity": ppl["perplexity"], "tokens": ppl["tokens"]}
        rows.append(_row("builtin:smollm2-135m", recipe, loaded.model, quality, timing["median_ms"], seconds))
    return rows


def run_demo(sentences: int = 500, max_tokens: int = 4096, log: Callable[[str], None] | None = None) -> dict:
    """The README's main job: both real models, every recipe, measured in one run."""
    log = log or (lambda msg: None)
    start = time.perf_counter()
    rows = _minilm_rows(sentences, log) + _smollm_rows(max_tokens, log)
    return {
        "rows": rows,
        "sentences": sentences,
        "perplexity_tokens": max_tokens,
        "latency_inputs": {"builtin:minilm": "16 x 128 tokens", "builtin:smollm2-135m": "1 x 128 tokens"},
        "kernels": "reference (dequantize + float matmul)",
        "seconds": time.perf_counter() - start,
    }


def study_specs() -> list[QuantSpec]:
    """Formats x granularities compared on real weights (scales stored as fp16, like peers)."""
    half = "float16"
    return [
        QuantSpec(Int(8), PerTensor(), scale_dtype=half),
        QuantSpec(Int(8), PerChannel(), scale_dtype=half),
        QuantSpec(Int(8), PerGroup(128), scale_dtype=half),
        QuantSpec(Int(4), PerChannel(), scale_dtype=half),
        QuantSpec(Int(4), PerChannel(), MSE(), scale_dtype=half),
        QuantSpec(Int(4), PerGroup(128), scale_dtype=half),
        QuantSpec(Int(4, symmetric=False), PerGroup(128), scale_dtype=half),
        QuantSpec(Int(4), PerGroup(32), scale_dtype=half),
        QuantSpec(Int(3), PerGroup(128), scale_dtype=half),
        QuantSpec(Int(2, symmetric=False), PerGroup(64), scale_dtype=half),
        QuantSpec(NormalFloat(4), PerGroup(64), scale_dtype=half),
        QuantSpec(NormalFloat(4), PerChannel(), scale_dtype=half),
        QuantSpec(NormalFloat(3), PerGroup(64), scale_dtype=half),
        QuantSpec(NormalFloat(2), PerGroup(64), scale_dtype=half),
        QuantSpec(Log2(4), PerChannel(), scale_dtype=half),
        QuantSpec(Ternary(), PerChannel(), scale_dtype=half),
        QuantSpec(Binary(), PerChannel(), scale_dtype=half),
        QuantSpec(Float("fp16"), PerTensor()),
        QuantSpec(Float("bf16"), PerTensor()),
        QuantSpec(Float("fp8_e4m3"), PerChannel(), scale_dtype=half),
        QuantSpec(Float("fp8_e5m2"), PerChannel(), scale_dtype=half),
        QuantSpec(Codebook(256, 4), PerTensor()),
    ]


def weights_file(spec: str) -> Path:
    """The safetensors file behind MODEL (builtin:NAME, a directory or a .safetensors file)."""
    path = builtin_path(spec.removeprefix("builtin:")) if spec.startswith("builtin:") else Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{path}: directory holds no .safetensors weights; point at a model directory")
        return files[0]
    if not path.exists():
        raise ModelError(f"{spec}: no such file or directory; check the path")
    return path


def format_study_of(spec: str, specs: list[QuantSpec] | None = None) -> dict:
    """Every format of the core on the Linear weights of MODEL."""
    tensors, _ = read_safetensors(weights_file(spec))
    weights = linear_weights(tensors)
    if not weights:
        raise ModelError(f"{spec}: no 2-D Linear weights found to study")
    return {
        "model": spec,
        "weights": len(weights),
        "parameters": sum(w.numel() for w in weights.values()),
        "rows": format_study(weights, specs or study_specs()),
    }
