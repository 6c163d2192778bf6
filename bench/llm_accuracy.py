"""SmolLM2-135M WikiText-2 test perplexity: float vs RTN / GPTQ / AWQ / HQQ at w4-g128, w3-g128,
w2-g64 (and the variants gptq-asym, awq-asym, awq+gptq with --methods), and W8A8 static/dynamic with and
without SmoothQuant. Prints one JSON object.

Calibration: 128 x 512 tokens of WikiText-2 valid (random windows, seed 0). Perplexity:
the first --max-tokens tokens of WikiText-2 test, windows of 512, stride 512.

    .venv/bin/python bench/llm_accuracy.py --max-tokens 32768 > results/llm_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit import data
from lowbit.evaluation.perplexity import perplexity
from lowbit.recipe import Recipe

WEIGHT_FORMATS = {
    "w4-g128": {"format": "int4-asym", "granularity": "group:128"},
    "w3-g128": {"format": "int3-asym", "granularity": "group:128"},
    "w2-g64": {"format": "int2-asym", "granularity": "group:64"},
}
METHODS = ("rtn", "gptq", "awq", "hqq")
# Variants: (algorithm, options). gptq-asym and awq-asym round the float-output target (option
# asymmetric); awq+gptq rounds AWQ's scaled weight with GPTQ.
VARIANTS = {
    "gptq-asym": ("gptq", {"asymmetric": True}),
    "awq-asym": ("awq", {"asymmetric": True}),
    "awq+gptq": ("awq", {"gptq": True}),
}
W8A8 = {
    "w8a8-dynamic": ("rtn", {"mode": "dynamic", "format": "int8"}),
    "w8a8-dynamic+smoothquant": ("smoothquant", {"mode": "dynamic", "format": "int8"}),
    "w8a8-static": ("rtn", {"mode": "static", "format": "int8-asym"}),
    "w8a8-static+smoothquant": ("smoothquant", {"mode": "static", "format": "int8-asym"}),
}


def recipe(
    name: str,
    weight: dict,
    algorithm: str,
    activation: dict | None = None,
    alpha: str = "auto",
    act_range: str = "minmax",
) -> Recipe:
    algorithm, options = VARIANTS.get(algorithm, (algorithm, {}))
    rule = {"types": ["Linear"], "weight": {**weight, "scale_dtype": "float16"}, "algorithm": algorithm}
    if options:
        rule["options"] = options
    if activation is not None:
        rule["activation"] = activation if activation["mode"] != "static" else {**activation, "range": act_range}
    if algorithm == "smoothquant":
        rule["options"] = {"alpha": alpha if alpha == "auto" else float(alpha)}
    return Recipe.from_dict({"name": name, "rules": [rule]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--formats", nargs="*", default=list(WEIGHT_FORMATS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=[*METHODS, *VARIANTS])
    parser.add_argument("--w8a8", nargs="*", default=list(W8A8))
    parser.add_argument("--alpha", default="auto", help="SmoothQuant strength: 'auto' (searched per layer) or a number")
    parser.add_argument(
        "--act-range", default="minmax", help="range estimator of static activations (minmax, mse, percentile, ...)"
    )
    parser.add_argument(
        "--out", type=Path, help="also write the JSON here after every scheme (partial results survive)"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    base = lowbit.load_model("builtin:smollm2-135m")
    tok = base.tokenizer
    calib = [{"input_ids": w} for w in data.lm_calibration(tok, samples=args.calib_samples, seq_len=args.seq_len)]

    def evaluate(model) -> dict:
        return perplexity(model, tok, max_tokens=args.max_tokens, seq_len=args.seq_len)

    rows = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = evaluate(base.model)
    rows.append({"scheme": "float32", "method": "-", "perplexity": result["perplexity"], "quantize_seconds": 0.0})
    log(f"float32 {result['perplexity']:.3f}")
    jobs = [(f, m, recipe(f"{f}-{m}", WEIGHT_FORMATS[f], m)) for f in args.formats for m in args.methods]
    jobs += [
        (
            name,
            W8A8[name][0],
            recipe(name, {"format": "int8", "granularity": "channel"}, *W8A8[name], args.alpha, args.act_range),
        )
        for name in args.w8a8
    ]
    for scheme, method, rec in jobs:
        loaded = lowbit.load_model("builtin:smollm2-135m")
        start = time.perf_counter()
        lowbit.quantize(loaded, rec, calib=calib)
        seconds = time.perf_counter() - start
        result = evaluate(loaded.model)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append(
            {
                "scheme": scheme,
                "method": method,
                "perplexity": result["perplexity"],
                "quantize_seconds": seconds,
                "process_peak_rss_mb": round(peak_mb),
            }
        )
        log(f"{scheme} {method} {result['perplexity']:.3f} ({seconds:.0f} s, peak RSS so far {peak_mb:.0f} MB)")
        if args.out is not None:
            write(args.out, summary(rows, result, args))
    json.dump(summary(rows, result, args), sys.stdout, indent=2)
    sys.stdout.write("\n")


def summary(rows: list[dict], result: dict, args) -> dict:
    """The JSON object: rows so far plus the settings they were measured with."""
    return {
        "model": "builtin:smollm2-135m",
        "eval": {"data": "wikitext-2 test", "tokens": result["tokens"], "seq_len": args.seq_len},
        "calibration": {"data": "wikitext-2 valid", "samples": args.calib_samples, "seq_len": args.seq_len},
        "smoothquant_alpha": args.alpha,
        "static_activation_range": args.act_range,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
        "note": "process_peak_rss_mb is the whole process's peak up to that row (ru_maxrss), an upper bound",
    }


def write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
