"""SmolLM2-135M greedy decode tokens/s at batch 1 (32-token WikiText-2 prompt, 32 new tokens): fp32
eager (and compiled with ``fp32c``), then per recipe eager and under ``lowbit.runtime.compile``
(static KV cache, compiled decode step), two runs each, with the compile time. Prints one JSON object.

A shorter companion of ``bench/models.py`` for slow machines (no prefill, perplexity or MiniLM):

    .venv/bin/python bench/decode.py fp32c w4-g128 w8-weight > results/decode.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import lowbit
from lowbit import data
from lowbit.evaluation.speed import decode_speed
from models import _compile_alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=["fp32c", "w4-g128", "w8-weight"])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    base = lowbit.load_model("builtin:smollm2-135m")
    prompt = data.token_stream(base.tokenizer, data.wikitext("valid"))[:32].unsqueeze(0)

    def tokens_per_s(model) -> float:
        return round(decode_speed(model, prompt, args.new_tokens)["decode_tokens_per_s"], 2)

    def row(name: str, model, compiled: bool) -> dict:
        out = {"recipe": name, "eager": [tokens_per_s(model) for _ in range(2)]}
        if compiled:
            start = time.perf_counter()
            _compile_alone(model)
            out["compiled"] = [tokens_per_s(model)]
            out["compile_and_first_s"] = round(time.perf_counter() - start, 1)
            out["compiled"].append(tokens_per_s(model))
        print(json.dumps(out), file=sys.stderr, flush=True)
        return out

    rows = [row("fp32", base.model, "fp32c" in args.recipes)]
    for recipe in (r for r in args.recipes if r != "fp32c"):
        loaded = lowbit.load_model("builtin:smollm2-135m")
        lowbit.quantize(loaded, recipe)
        rows.append(row(recipe, loaded.model, True))
    print(json.dumps({"threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
