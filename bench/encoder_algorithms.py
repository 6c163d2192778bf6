"""all-MiniLM-L6-v2 at 4 bits: RTN vs GPTQ / AWQ / HQQ, embedding fidelity to the float model.

Calibration: 128 WikiText-2 valid sentences (lowbit's default encoder calibration).
Evaluation: 1000 WikiText-2 test sentences: mean / min cosine of sentence embeddings to
float, and top-1 nearest-neighbour agreement. Prints one JSON object.

    .venv/bin/python bench/encoder_algorithms.py > bench/results/encoder_algorithms.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

import lowbit
from lowbit import data
from lowbit.calibration import calibration_data
from lowbit.evaluation.embedding import embedding_fidelity
from lowbit.recipe import Recipe

FORMATS = {
    "w4-g128": {"format": "int4-asym", "granularity": "group:128"},
    "w4-channel": {"format": "int4-asym", "granularity": "channel"},
    "w3-g128": {"format": "int3-asym", "granularity": "group:128"},
}
METHODS = ("rtn", "gptq", "awq", "hqq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--formats", nargs="*", default=list(FORMATS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    torch.manual_seed(0)
    base = lowbit.load_model("builtin:minilm")
    texts = data.sentences(count=args.sentences)
    calib = calibration_data(base, samples=args.calib_samples)
    rows = []
    for fmt in args.formats:
        for method in args.methods:
            rule = {"types": ["Linear"], "weight": {**FORMATS[fmt], "scale_dtype": "float16"}, "algorithm": method}
            model = copy.deepcopy(base.model)
            start = time.perf_counter()
            lowbit.quantize(model, Recipe.from_dict({"name": f"{fmt}-{method}", "rules": [rule]}), calib=calib)
            seconds = time.perf_counter() - start
            fid = embedding_fidelity(model, base.model, base.tokenizer, texts)
            rows.append({"scheme": fmt, "method": method, **fid, "quantize_seconds": seconds})
            print(f"{fmt} {method} cos {fid['mean_cosine']:.5f} top1 {fid['top1_agreement']:.4f}", file=sys.stderr)
    out = {
        "model": "builtin:minilm",
        "eval": {"data": "wikitext-2 test sentences", "sentences": len(texts)},
        "calibration": {"data": "wikitext-2 valid sentences", "samples": args.calib_samples},
        "rows": rows,
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
