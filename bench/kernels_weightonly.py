"""Weight-only linear kernels on this CPU: lowbit native vs torch, printed as JSON.

For each preset format and shape (N x K) and M in {1, 256}: median ms, GOP/s, weight bytes
actually read (codes + scales + zeros [+ codebook]) per second, and that as a fraction of the
DRAM read roofline measured in the same run (``x.sum()`` over 1 GiB of fp32). "cold" rotates
through copies of the layer totalling > 3x L3 so every call streams its weight from DRAM;
"hot" repeats one copy. Baselines: fp32/bf16 F.linear, ``aten._weight_int8pack_mm`` and
``aten._weight_int4pack_mm_for_cpu`` (bf16 activations). Then the GEMV/prefill crossover in M,
and SmolLM2-135M greedy decode tokens/s (batch 1, eager) for fp32, w8-weight and w4-g128.

    PYTHONPATH=src python bench/kernels_weightonly.py [--quick] > results.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit import kernels, packing
from lowbit.evaluation.latency import latency
from lowbit.formats import Codebook
from lowbit.granularity import PerTensor
from lowbit.kernels import cpu_weightonly
from lowbit.nn import QLinear
from lowbit.presets import get_preset
from lowbit.recipe import ActivationSpec
from lowbit.tensor import QTensor


def l3_bytes(default: int = 32 << 20) -> int:
    """This machine's last-level cache size (sysfs); ``default`` where it cannot be read. A VM may
    report a whole host's L3 (480 MiB on a 2-vCPU Xeon): rotating through less would leave
    "cold" weights in L3 and measure its bandwidth instead of DRAM's."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        try:
            size = (index / "size").read_text().strip()
            if (index / "level").read_text().strip() == "3" and size.endswith("K"):
                return int(size[:-1]) << 10
        except (OSError, ValueError):
            continue
    return default


L3_BYTES = l3_bytes()
PRESETS = ("w8-weight", "w4-g128", "nf4-g64", "w3-g128", "w2-g64", "vq-2bit")
SHAPES = ((4096, 4096), (11008, 4096))  # (N, K)


def dram_roofline_gbs(repeat: int = 5) -> float:
    """DRAM read bandwidth, GB/s: the faster of ``x.sum()`` and an fp32 matrix-vector product, each
    over 1 GiB of fp32 (all threads, median). Either alone can fall short: on a 2-vCPU Xeon VM
    ``x.sum()`` read 24-28 GB/s while a cold fp32 GEMV streamed its weight at 49 GB/s."""
    x = torch.ones(1 << 28)
    t_sum = latency(lambda: x.sum(), warmup=1, repeat=repeat, min_seconds=0)["median_ms"] / 1e3
    a, v = x.view(1 << 14, 1 << 14), torch.ones(1 << 14)
    t_mv = latency(lambda: torch.mv(a, v), warmup=1, repeat=repeat, min_seconds=0)["median_ms"] / 1e3
    return x.numel() * 4 / min(t_sum, t_mv) / 1e9


def _weight(preset: str, n: int, k: int, seed: int) -> QTensor:
    spec = get_preset(preset).rules[0].scheme.weight
    gen = torch.Generator().manual_seed(seed)
    if isinstance(spec.format, Codebook):  # random codes and codebook: k-means would take minutes, speed is the same
        fmt = spec.format
        codes = torch.randint(0, fmt.entries, (n * math.ceil(k / fmt.dim),), dtype=torch.uint8, generator=gen)
        book = torch.randn(1, fmt.entries, fmt.dim, generator=gen) * 0.02
        return QTensor(packing.pack(codes, fmt.bits), fmt, PerTensor(), (n, k), torch.float32, codebook=book)
    return QTensor.quantize(torch.randn(n, k, generator=gen) * 0.02, spec)


def _count(bytes_each: int, cold: bool) -> int:
    """Copies of a weight to rotate through: > 3x L3 in total when cold."""
    return max(2, math.ceil(3 * L3_BYTES / bytes_each)) if cold else 1


def _copies(make, bytes_each: int, cold: bool) -> list:
    return [make(i) for i in range(_count(bytes_each, cold))]


def _time(fns: list, repeat: int) -> float:
    cycle = itertools.cycle(fns)
    return latency(lambda: next(cycle)(), warmup=len(fns), repeat=repeat, min_seconds=0.3)["median_ms"]


def _row(name: str, ms: float, m: int, n: int, k: int, nbytes: int, roofline: float) -> dict:
    gbs = nbytes / (ms / 1e3) / 1e9
    return {"kernel": name, "ms": round(ms, 4), "gops": round(2 * m * n * k / (ms / 1e3) / 1e9, 1),
            "weight_gbs": round(gbs, 2), "roofline_frac": round(gbs / roofline, 3)}  # fmt: skip


def _packed_bytes(module: QLinear) -> int:
    """Bytes the native kernel reads per call: its packed codes, scales, zeros (and codebook)."""
    (_, packed), *_ = module._kernel_cache.values()
    parts = [getattr(packed, f, None) for f in ("codes", "scales", "zeros", "scale", "zero", "codebook")]
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def bench_layer(n: int, k: int, m: int, roofline: float, repeat: int) -> list[dict]:
    rows = []
    x = torch.randn(m, k)
    for preset in PRESETS:
        qt = _weight(preset, n, k, 0)
        first = QLinear(qt, ActivationSpec())
        kernel = kernels.select("linear", first, x)
        kernel.fn(first, x)
        nbytes = _packed_bytes(first) if kernel.name.startswith("cpu-") else qt.nbytes
        for cold in (True, False):
            if m > 1 and cold:
                continue  # compute-bound: cold and hot agree
            mods = [first] + [QLinear(_clone(qt), ActivationSpec()) for _ in range(_count(nbytes, cold) - 1)]
            ms = _time([functools.partial(kernel.fn, mod, x) for mod in mods], repeat)
            row = _row(f"{preset}:{kernel.name}", ms, m, n, k, nbytes, roofline)
            rows.append({**row, "cold": cold})
    for dtype in (torch.float32, torch.bfloat16):
        nbytes = n * k * dtype.itemsize
        xd = x.to(dtype)
        for cold in (True, False) if m == 1 else (False,):
            ws = _copies(lambda i, d=dtype: torch.randn(n, k).to(d), nbytes, cold)
            ms = _time([functools.partial(F.linear, xd, w) for w in ws], repeat)
            rows.append({**_row(f"F.linear:{str(dtype)[6:]}", ms, m, n, k, nbytes, roofline), "cold": cold})
    xb = x.to(torch.bfloat16)
    for cold in (True, False) if m == 1 else (False,):
        w8 = _copies(lambda i: torch.randint(-127, 128, (n, k), dtype=torch.int8), n * k, cold)
        s8 = torch.rand(n, dtype=torch.bfloat16)
        ms = _time([functools.partial(torch.ops.aten._weight_int8pack_mm, xb, w, s8) for w in w8], repeat)
        rows.append({**_row("torch:_weight_int8pack_mm:bf16", ms, m, n, k, n * k + 2 * n, roofline), "cold": cold})
        nbytes4 = n * k // 2 + (k // 128) * n * 2 * 2
        w4 = _copies(lambda i: torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.randint(0, 16, (n, k), dtype=torch.int32), 1), nbytes4, cold)  # fmt: skip
        sz = torch.rand(k // 128, n, 2, dtype=torch.bfloat16)
        int4mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        ms = _time([functools.partial(int4mm, xb, w, 128, sz) for w in w4], repeat)
        rows.append({**_row("torch:_weight_int4pack_mm_for_cpu:bf16:g128", ms, m, n, k, nbytes4, roofline),
                     "cold": cold})  # fmt: skip
    return rows


def _clone(qt: QTensor) -> QTensor:
    return QTensor(qt.data.clone(), qt.fmt, qt.granularity, qt.shape, qt.dtype, qt.scale, qt.zero_point, qt.codebook)


def crossover(repeat: int) -> list[dict] | dict:
    """w4-g128 4096x4096: the GEMV vs dequantize + matmul, by M (hot), on the native (AVX-512)
    kernel, else the AVX2 one."""
    from lowbit.kernels import cpu_avx2

    module = QLinear(_weight("w4-g128", 4096, 4096, 0), ActivationSpec())
    if kernels.native_available():
        fn, arg = cpu_weightonly.blocks_linear, "prefill_from"
    elif cpu_avx2._ready():
        fn, arg = cpu_avx2.avx2_linear, "dequant_from"
    else:
        return {"skipped": "no lowbit weight-only kernel on this machine"}
    out = []
    for m in (1, 2, 4, 8, 12, 16, 24, 32, 64):
        x = torch.randn(m, 4096)
        run = functools.partial(fn, module, x)
        gemv = _time([functools.partial(run, **{arg: 10**9})], repeat)
        prefill = _time([functools.partial(run, **{arg: 1})], repeat)
        out.append({"m": m, "kernel": fn.__name__, "gemv_ms": round(gemv, 3), "prefill_ms": round(prefill, 3)})
    return out


def _start_clock(module, args) -> None:
    module._clock = time.perf_counter()


def _stop_clock(spent: dict, key: str, module, args, result) -> None:
    spent[key] += time.perf_counter() - module._clock


def decode(new_tokens: int = 64, prompt_tokens: int = 32) -> dict:
    """SmolLM2-135M greedy decode at batch 1: tokens/s, and where a token's time goes."""
    import lowbit

    out = {}
    for recipe in ("fp32", "w8-weight", "w4-g128"):
        loaded = lowbit.load_model("builtin:smollm2-135m")
        model = loaded.model if recipe == "fp32" else lowbit.quantize(loaded, recipe)
        ids = torch.arange(1000, 1000 + prompt_tokens).unsqueeze(0)
        spent = {"qlinear": 0.0, "lm_head": 0.0}
        hooks = []
        for name, mod in model.named_modules():
            key = "lm_head" if name.endswith("lm_head") else "qlinear" if isinstance(mod, QLinear) else None
            if key is None and recipe == "fp32" and isinstance(mod, torch.nn.Linear):
                key = "qlinear"  # the same layers in float
            if key:
                hooks += [mod.register_forward_pre_hook(_start_clock),
                          mod.register_forward_hook(functools.partial(_stop_clock, spent, key))]  # fmt: skip
        gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up, builds prepacked layouts
            prefill_start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - prefill_start
            spent.update(qlinear=0.0, lm_head=0.0)
            start = time.perf_counter()
            model.generate(ids, **gen)
            total = time.perf_counter() - start
        for h in hooks:
            h.remove()
        per_token = (total - prefill) / (new_tokens - 1)
        out[recipe] = {"tokens_per_s": round(1 / per_token, 1), "ms_per_token": round(per_token * 1e3, 2),
                       "share_linear_layers": round(spent["qlinear"] / total, 3),
                       "share_lm_head_fp32": round(spent["lm_head"] / total, 3),
                       "prefill_ms": round(prefill * 1e3, 1)}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096x4096 only, fewer repeats, no decode")
    args = parser.parse_args()
    repeat = 5 if args.quick else 15
    roofline = dram_roofline_gbs()
    result = {"threads": torch.get_num_threads(), "dram_roofline_gbs": round(roofline, 2),
              "prefill_from": cpu_weightonly.PREFILL_FROM, "layers": []}  # fmt: skip
    for n, k in SHAPES[:1] if args.quick else SHAPES:
        for m in (1, 256):
            result["layers"].append({"n": n, "k": k, "m": m, "rows": bench_layer(n, k, m, roofline, repeat)})
    result["crossover_w4_4096"] = crossover(repeat)
    result["dram_roofline_gbs_end"] = round(dram_roofline_gbs(), 2)
    if not args.quick:
        result["smollm2_decode"] = decode()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
