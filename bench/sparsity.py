"""SmolLM2-135M 2:4 sparsity + 4-bit weights: magnitude pruning vs SparseGPT (pruned and quantized
jointly, Hessian-aware), next to dense w4-g128 (RTN and GPTQ). WikiText-2 test perplexity, size
and bits per weight, quantization wall time. Prints one JSON object.

    .venv/bin/python bench/sparsity.py --max-tokens 16384 > results/sparsity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

import lowbit
from lowbit import data
from lowbit.evaluation.perplexity import perplexity
from lowbit.evaluation.size import model_size

PRESETS = ("w4-g128", "w4-g128-gptq", "w4-g128-2of4", "w4-g128-2of4-sparsegpt")


def sparsity_rows(source: str, presets, max_tokens: int, calib: list | None, log=None) -> list[dict[str, Any]]:
    """One row per preset: perplexity, size, bits per weight and quantization seconds."""
    rows = []
    for preset in presets:
        model = lowbit.load_model(source)
        start = time.perf_counter()
        lowbit.quantize(model, preset, calib=calib)
        seconds = time.perf_counter() - start
        ppl = perplexity(model.model, model.tokenizer, max_tokens=max_tokens)["perplexity"]
        size = model_size(model.model)
        rows.append(
            {"recipe": preset, "perplexity": ppl, "size_mb": size["bytes"] / 1e6,
             "bits_per_weight": size["quantized_bits_per_weight"], "quantize_seconds": round(seconds, 1)}
        )  # fmt: skip
        if log is not None:
            log(f"  {preset}: {ppl:.3f}, {size['bytes'] / 1e6:.1f} MB, {seconds:.0f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=16384, help="WikiText-2 test tokens for perplexity")
    parser.add_argument("--calib-samples", type=int, default=32, help="512-token WikiText-2 valid windows")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = parser.parse_args()
    torch.manual_seed(0)
    source = "builtin:smollm2-135m"
    base = lowbit.load_model(source)
    calib = [{"input_ids": w} for w in data.lm_calibration(base.tokenizer, samples=args.calib_samples, seq_len=512)]
    float_ppl = perplexity(base.model, base.tokenizer, max_tokens=args.max_tokens)["perplexity"]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"float32 {float_ppl:.3f}")
    rows = sparsity_rows(source, args.presets, args.max_tokens, calib, log)
    result = {
        "model": source,
        "eval": {"data": "wikitext-2 test", "max_tokens": args.max_tokens},
        "calibration": {"data": "wikitext-2 valid", "samples": args.calib_samples, "seq_len": 512},
        "float_perplexity": float_ppl,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
