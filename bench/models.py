"""End-to-end speed of quantized models next to float in the same run, with quality beside it.

MiniLM (all-MiniLM-L6-v2): latency at batch 1 x 32 and 16 x 128 tokens (real WikiText-2
sentences padded to that length), for PyTorch fp32 eager, fp32 + torch.compile, and each lowbit
recipe eager and with ``lowbit.runtime.compile``; quality = mean cosine of sentence embeddings
to fp32 and top-1 nearest-neighbour agreement on 500 WikiText-2 test sentences.

SmolLM2-135M: greedy decode tokens/s at batch 1 (32-token prompt, 64 new tokens), eager and
under ``lowbit.runtime.compile`` (static KV cache, compiled decode step), prefill tokens/s on 512
tokens, and WikiText-2 test perplexity on the first 8192 tokens.

Each model is compiled after ``torch._dynamo.reset()``, as a deployment runs one compiled model per
process: compiled graphs of models called through the same function share one cache, and a call
first fails the guards of every other model's graphs (measured: SmolLM2 w4-g128 decode 84 tok/s with
a compiled w8-weight model in the process, 109 alone).

    .venv/bin/python bench/models.py [--quick] [--skip-smollm | --skip-minilm] > models.json
"""

from __future__ import annotations

import argparse
import json

import torch

import lowbit
import lowbit.kernels
import lowbit.nn
from lowbit import data
from lowbit.evaluation.embedding import nearest_neighbours, sentence_embeddings
from lowbit.evaluation.latency import latency
from lowbit.evaluation.perplexity import perplexity
from lowbit.evaluation.size import model_size
from lowbit.evaluation.speed import decode_speed
from lowbit.recipe import Recipe
from lowbit.runtime import compile as lowbit_compile

MINILM_RECIPES = ("int8-dynamic", "w8-weight", "w4-g128")
SMOLLM_RECIPES = ("w8-weight", "w4-g128", "nf4-g64", "w4-g128+float-head")
# The weight-only presets store the output head and embeddings in int8 (one shared table when
# tied). This variant keeps them float, as the presets did before: at batch 1 the fp32 head GEMV
# (49152 x 576) reads 113 MB per token, more than all w4 layers together.
EXTRA_RECIPES = {"w4-g128+float-head": {"name": "w4-g128+float-head", "base": "w4-g128", "head": None}}


def _recipe(name: str):
    return Recipe.from_dict(EXTRA_RECIPES[name]) if name in EXTRA_RECIPES else name


SHAPES = ((1, 32), (16, 128))


def _compile_alone(model, example=None):
    """``lowbit.runtime.compile`` with the compiled graphs of earlier models dropped (see above)."""
    torch._dynamo.reset()
    return lowbit_compile(model, example)


def _inputs(tokenizer, texts: list[str], batch: int, length: int) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts[:batch], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return dict(encoded)


def _time(model, inputs: dict, seconds: float) -> float:
    return latency(lambda: model(**inputs), warmup=3, repeat=10, min_seconds=seconds)["median_ms"]


def _quality(model, tokenizer, texts: list[str], reference: torch.Tensor) -> dict:
    emb = sentence_embeddings(model, tokenizer, texts)
    return {
        "mean_cosine": round(float((emb * reference).sum(-1).mean()), 5),
        "top1_agreement": round(float((nearest_neighbours(emb) == nearest_neighbours(reference)).float().mean()), 4),
    }


def minilm(sentences: int, seconds: float, compiled: bool) -> dict:
    texts = data.sentences(count=sentences)
    long_texts = data.sentences(count=16, min_words=40, max_words=120, seed=3)  # fill 128 tokens
    base = lowbit.load_model("builtin:minilm")
    tok = base.tokenizer
    inputs = {(b, n): _inputs(tok, long_texts if n > 64 else texts, b, n) for b, n in SHAPES}
    reference = sentence_embeddings(base.model, tok, texts)
    rows = []

    def measure(label: str, model) -> dict:
        row = {"recipe": label}
        for b, n in SHAPES:
            row[f"ms_{b}x{n}"] = round(_time(model, inputs[(b, n)], seconds), 3)
        return row

    # fp32 eager is timed first and again last (a fresh copy): this machine's speed drifts between
    # minutes, and speed-ups are taken against the faster of the two (the conservative choice)
    fp32 = measure("fp32 eager", base.model)
    fp32.update(mean_cosine=1.0, top1_agreement=1.0)
    rows.append(fp32)
    if compiled:
        model = _compile_alone(base.model, inputs[SHAPES[0]])
        rows.append({**measure("fp32 torch.compile", model), "mean_cosine": 1.0, "top1_agreement": 1.0})
    for recipe in MINILM_RECIPES:
        loaded = lowbit.load_model("builtin:minilm")
        lowbit.quantize(loaded, recipe)
        quality = _quality(loaded.model, tok, texts, reference)
        kernels_used = sorted({lowbit.kernels.select("linear", m, torch.randn(2, m.weight_shape[1])).name
                               for m in loaded.model.modules() if isinstance(m, lowbit.nn.QLinear)})  # fmt: skip
        rows.append({**measure(f"{recipe} eager", loaded.model), **quality, "kernels": kernels_used})
        if compiled:
            model = _compile_alone(loaded.model, inputs[SHAPES[0]])
            row = measure(f"{recipe} lowbit.compile", model)
            rows.append({**row, **_quality(model, tok, texts, reference), "kernels": kernels_used})
    again = measure("fp32 eager (again, last)", lowbit.load_model("builtin:minilm").model)
    baseline = {key: min(fp32[key], again[key]) for key in again if key.startswith("ms_")}
    for row in rows:
        for b, n in SHAPES:
            row[f"speedup_{b}x{n}"] = round(baseline[f"ms_{b}x{n}"] / row[f"ms_{b}x{n}"], 2)
    return {"model": "builtin:minilm", "sentences": len(texts), "rows": rows, "fp32_eager_again": again,
            "speedup_baseline_ms": baseline}  # fmt: skip


def _prefill(model, ids: torch.Tensor, seconds: float) -> dict:
    ms = latency(lambda: model(input_ids=ids, use_cache=False), warmup=1, repeat=3, min_seconds=seconds)["median_ms"]
    return {"prefill_ms_512": round(ms, 1), "prefill_tokens_per_s": round(ids.shape[1] / ms * 1e3, 1)}


def _decode(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    speed = decode_speed(model, prompt, new_tokens)
    return {
        "tokens_per_s": round(speed["decode_tokens_per_s"], 1),
        "ms_per_token": round(speed["decode_ms_per_token"], 2),
    }


def smollm(ppl_tokens: int, seconds: float, new_tokens: int, compiled: bool, recipes: list[str]) -> dict:
    """Per recipe: eager decode and prefill, decode under ``lowbit.runtime.compile`` (static KV cache,
    compiled step), and perplexity; speed-ups are against fp32 eager (the compiled fp32 row is a peer)."""
    base = lowbit.load_model("builtin:smollm2-135m")
    stream = data.token_stream(base.tokenizer, data.wikitext("valid"))
    prompt, prefill_ids = stream[:32].unsqueeze(0), stream[1000:1512].unsqueeze(0)

    def measure(recipe: str, loaded) -> dict:
        row = {"recipe": recipe, "size_mb": round(model_size(loaded.model)["bytes"] / 1e6, 1)}
        row["decode"] = _decode(loaded.model, prompt, new_tokens)
        row.update(_prefill(loaded.model, prefill_ids, seconds))
        row["perplexity"] = round(perplexity(loaded.model, loaded.tokenizer, max_tokens=ppl_tokens)["perplexity"], 3)
        if compiled:
            _compile_alone(loaded.model)
            row["decode_compiled"] = _decode(loaded.model, prompt, new_tokens)
        return row

    fp32 = measure("fp32", base)
    rows = [fp32]
    for recipe in recipes:
        loaded = lowbit.load_model("builtin:smollm2-135m")
        lowbit.quantize(loaded, _recipe(recipe))
        row = measure(recipe, loaded)
        row["decode_speedup"] = round(row["decode"]["tokens_per_s"] / fp32["decode"]["tokens_per_s"], 2)
        if compiled:
            speedup = row["decode_compiled"]["tokens_per_s"] / fp32["decode"]["tokens_per_s"]
            row["decode_compiled_speedup_vs_fp32_eager"] = round(speedup, 2)
            speedup = row["decode_compiled"]["tokens_per_s"] / fp32["decode_compiled"]["tokens_per_s"]
            row["decode_compiled_speedup_vs_fp32_compiled"] = round(speedup, 2)
        row["prefill_speedup"] = round(row["prefill_tokens_per_s"] / fp32["prefill_tokens_per_s"], 2)
        rows.append(row)
    return {"model": "builtin:smollm2-135m", "perplexity_tokens": ppl_tokens, "new_tokens": new_tokens, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences and tokens, shorter timings")
    parser.add_argument("--skip-smollm", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--smollm-recipes", nargs="+", default=list(SMOLLM_RECIPES), help="SmolLM2 rows next to fp32")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 2.0
    from lowbit.kernels.build import load_avx2

    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "native_kernels": lowbit.kernels.native_available(), "avx2_kernels": load_avx2()}  # fmt: skip
    if not args.skip_minilm:
        result["minilm"] = minilm(100 if args.quick else 500, seconds, not args.no_compile)
    if not args.skip_smollm:
        tokens, new = (2048, 16) if args.quick else (8192, 64)
        result["smollm2"] = smollm(tokens, seconds, new, not args.no_compile, args.smollm_recipes)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
