"""SmolLM2-135M exported to GGUF and run by llama.cpp itself (llama-cpp-python): WikiText-2 test
perplexity from llama.cpp next to lowbit's on the same weights and the same token windows,
file size, ggml tensor types, and decode tokens/s of both. Prints one JSON object.

    .venv/bin/python bench/export_gguf.py --max-tokens 8192 --out bench/results/export_gguf.json

Needs llama-cpp-python (in the dev extra; built from PyPI source by `scripts/setup.sh --dev`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lowbit
from lowbit import data
from lowbit.evaluation.perplexity import perplexity_of_ids, windows
from lowbit.export import gguf as gguf_export

RECIPES = ("w8-weight", "w4-g128", "w4-g128-gptq")


def llama_cpp_perplexity(path: Path, ids: torch.Tensor, seq_len: int, threads: int) -> dict:
    """Perplexity of the GGUF file in llama.cpp over the same disjoint windows lowbit scores."""
    import llama_cpp

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():  # no AMX weight repacking: it segfaults on some machines (ggml-org/llama.cpp#20824)
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(str(path), n_ctx=seq_len, n_batch=seq_len, logits_all=True, verbose=False, n_threads=threads)
    nll, scored, start = 0.0, 0, time.perf_counter()
    for begin, end, first in windows(ids.numel(), seq_len, seq_len):
        window = ids[begin:end].tolist()
        llm.reset()
        llm.eval(window)
        logits = torch.from_numpy(np.array(llm.scores[: len(window)], dtype=np.float32))
        predicting = logits[first - begin - 1 : end - begin - 1]
        targets = torch.tensor(window[first - begin :])
        nll += float(torch.nn.functional.cross_entropy(predicting, targets, reduction="sum"))
        scored += end - first
    seconds = time.perf_counter() - start
    decode = _llama_cpp_decode(llm, ids[:8].tolist(), tokens=64)
    return {"perplexity": math.exp(nll / scored), "tokens": scored, "seconds": seconds, **decode}


def _llama_cpp_decode(llm, prompt: list[int], tokens: int) -> dict:
    """Greedy decode tokens/s in llama.cpp (batch 1), after the prompt is evaluated."""
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([nxt])
    return {"decode_tokens_per_s": tokens / (time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--out", type=Path, help="also write the JSON here after every recipe")
    args = parser.parse_args()
    threads = torch.get_num_threads()

    base = lowbit.load_model("builtin:smollm2-135m")
    tok = base.tokenizer
    ids = data.token_stream(tok, data.wikitext("test"))[: args.max_tokens]
    calib = [{"input_ids": w} for w in data.lm_calibration(tok, samples=args.calib_samples, seq_len=args.seq_len)]
    float_ppl = perplexity_of_ids(base.model, ids, args.seq_len)["perplexity"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            loaded = lowbit.load_model("builtin:smollm2-135m")
            lowbit.quantize(loaded, name, calib=calib)
            ours = perplexity_of_ids(loaded.model, ids, args.seq_len)
            ckpt = lowbit.save(loaded.model, Path(tmp) / name, tokenizer=tok)
            out = Path(tmp) / f"{name}.gguf"
            report = gguf_export.export(ckpt, out)
            theirs = llama_cpp_perplexity(out, ids, args.seq_len, threads)
            rows.append(
                {
                    "recipe": name,
                    "float_perplexity": float_ppl,
                    "lowbit_perplexity": ours["perplexity"],
                    "llama_cpp_perplexity": theirs["perplexity"],
                    "relative_difference": theirs["perplexity"] / ours["perplexity"] - 1,
                    "gguf_bytes": report["bytes"],
                    "tensor_types": report["tensor_types"],
                    "exact_tensors": report["exact"],
                    "requantized_tensors": len(report["requantized"]),
                    "rounded_tensors": len(report["rounded"]),
                    "max_rounding_error_steps": max((r["max_error_steps"] for r in report["rounded"]), default=0.0),
                    "llama_cpp_decode_tokens_per_s": theirs["decode_tokens_per_s"],
                    "llama_cpp_eval_seconds": theirs["seconds"],
                    "lowbit_eval_seconds": ours["seconds"],
                }
            )
            print(f"{name}: lowbit {ours['perplexity']:.3f} llama.cpp {theirs['perplexity']:.3f}", file=sys.stderr)
            result = {
                "model": "builtin:smollm2-135m",
                "eval": {"data": "wikitext-2 test", "tokens": ours["tokens"], "seq_len": args.seq_len},
                "threads": threads,
                "rows": rows,
            }
            if args.out:
                tmp_out = args.out.with_suffix(".tmp")
                tmp_out.write_text(json.dumps(result, indent=2) + "\n")
                tmp_out.replace(args.out)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
