"""Every lowbit linear kernel on this CPU next to fp32/bf16 ``F.linear`` and torch's integer ops, as JSON.

GEMV (M=1) and GEMM (M=256) at N x K = 4096 x 4096 and 11008 x 4096. Each row: median ms,
GOP/s, weight GB/s (bytes the kernel reads), and fractions of this machine's rooflines measured
in the same run: DRAM read bandwidth (``x.sum()`` or fp32 GEMV over 1 GiB, the faster) for M=1 and peak GEMM throughput
(``torch._int_mm`` at 4096^3 for int8, fp32 ``mm`` for float) for M=256. M=1 rows are "cold":
the bench rotates through copies of the layer totalling > 3x L3 so each call streams its
weight from DRAM, as in a real model. W8A8 rows include quantizing the activations.

    .venv/bin/python bench/kernel_speed.py [--quick] > kernels.json

(Not named ``kernels.py``: scripts run from bench/ would shadow the ``kernels`` package that
transformers >= 5.25 imports.)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernels_weightonly as wo
from lowbit import kernels
from lowbit.evaluation.latency import latency
from lowbit.nn import QLinear
from lowbit.presets import get_preset
from lowbit.tensor import QTensor

W8A8_KERNELS = ("cpu-int8", "cpu-avx2-w8a8", "cpu-int8-portable")
SLOW_CALL_S = 1.0  # a call slower than this is timed once (torch._int_mm at M=256 takes ~12 s on an AVX2-only Zen 3)


def _time_or_once(fns: list, repeat: int) -> tuple[float, bool]:
    """Median ms over ``repeat`` rounds, or the one call's ms where a call takes over SLOW_CALL_S."""
    start = time.perf_counter()
    fns[0]()
    once = time.perf_counter() - start
    if once > SLOW_CALL_S:
        return once * 1e3, True
    return wo._time(fns, repeat), False


def peak_gops(repeat: int) -> dict:
    """Compute rooflines: int8 ``_int_mm`` and fp32 ``mm`` at 4096^3 (hot, all threads). Where one
    int8 call at 1024^3 already takes over SLOW_CALL_S (no fast integer GEMM: AVX2-only CPUs, where
    4096^3 takes minutes), that call's rate stands in and ``int8_int_mm_size`` says so."""
    out = {}
    probe = torch.randint(-127, 128, (1024, 1024), dtype=torch.int8)
    ms, once = _time_or_once([lambda: torch._int_mm(probe, probe)], 1)
    size = 1024 if once else 4096
    a8, b8 = (torch.randint(-127, 128, (size, size), dtype=torch.int8) for _ in range(2))
    af, bf = torch.randn(4096, 4096), torch.randn(4096, 4096)
    for name, fn, n in (("int8_int_mm", lambda: torch._int_mm(a8, b8), size), ("fp32_mm", lambda: af @ bf, 4096)):
        if not (once and name == "int8_int_mm"):
            ms = latency(fn, warmup=1, repeat=repeat, min_seconds=1.0)["median_ms"]
        out[name] = round(2 * n**3 / (ms / 1e3) / 1e9, 1)
    out["int8_int_mm_size"] = size
    return out


def w8a8_peak(peak: dict) -> float:
    """The W8A8 kernels' compute roofline: the faster of int8 ``_int_mm`` and fp32 ``mm`` (on AVX2-only
    CPUs torch has no fast int8 GEMM and lowbit's W8A8 kernel multiplies in fp32 for many tokens)."""
    return max(peak["int8_int_mm"], peak["fp32_mm"])


def w8a8_rows(n: int, k: int, m: int, roofline: float, peak: dict, repeat: int) -> list[dict]:
    scheme = get_preset("int8-dynamic-rtn").rules[0].scheme
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=gen) * 0.02
    qt = QTensor.quantize(weight, scheme.weight)
    x = torch.randn(m, k, generator=gen)
    nbytes = n * k + 4 * n
    rows = []
    for name in W8A8_KERNELS:
        first = QLinear(qt, scheme.activation)
        chosen = [kn for kn in kernels.kernels_for("linear") if kn.name == name]
        if not chosen or not chosen[0].applies(first.layout, "dynamic", "cpu", first, x):
            rows.append({"kernel": f"w8a8-dynamic:{name}", "skipped": "not available on this machine"})
            continue
        fn = chosen[0].fn
        fn(first, x)
        count = wo._count(nbytes, True) if m == 1 else 1
        mods = [first] + [QLinear(wo._clone(qt), scheme.activation) for _ in range(count - 1)]
        ms, once = _time_or_once([functools.partial(fn, mod, x) for mod in mods], repeat)
        row = wo._row(f"w8a8-dynamic:{name}", ms, m, n, k, nbytes, roofline)
        row["peak_frac"] = round(row["gops"] / w8a8_peak(peak), 3)
        rows.append({**row, "cold": m == 1, **({"timed_once": True} if once else {})})
    # torch._int_mm on codes alone (no activation quantization or rescale): the raw integer matmul
    w8 = [torch.randint(-127, 128, (k, n), dtype=torch.int8) for _ in range(wo._count(n * k, True) if m == 1 else 1)]
    x8 = torch.randint(-127, 128, (max(m, 17), k), dtype=torch.int8)  # _int_mm needs M > 16
    ms, once = _time_or_once([functools.partial(torch._int_mm, x8, w) for w in w8], repeat)
    row = wo._row("torch._int_mm (codes only, M padded to 17)" if m == 1 else "torch._int_mm (codes only)", ms, m, n,
                  k, n * k, roofline)  # fmt: skip
    row["peak_frac"] = round(row["gops"] / peak["int8_int_mm"], 3)
    rows.append({**row, "cold": m == 1, **({"timed_once": True} if once else {})})
    return rows


def float_rows(n: int, k: int, m: int, roofline: float, peak: dict, repeat: int) -> list[dict]:
    rows = []
    x = torch.randn(m, k)
    for dtype in (torch.float32, torch.bfloat16):
        nbytes = n * k * dtype.itemsize
        xd = x.to(dtype)
        ws = [torch.randn(n, k).to(dtype) for _ in range(wo._count(nbytes, True) if m == 1 else 1)]
        ms = wo._time([functools.partial(F.linear, xd, w) for w in ws], repeat)
        row = wo._row(f"F.linear:{str(dtype)[6:]}", ms, m, n, k, nbytes, roofline)
        row["peak_frac"] = round(row["gops"] / peak["fp32_mm"], 3)
        rows.append({**row, "cold": m == 1})
    return rows


def weight_only_rows(n: int, k: int, m: int, roofline: float, repeat: int) -> list[dict]:
    rows = [r for r in wo.bench_layer(n, k, m, roofline, repeat) if not r["kernel"].startswith("F.linear")]
    return [r for r in rows if r.get("cold", True) == (m == 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4096 x 4096 only, fewer repeats")
    args = parser.parse_args()
    repeat = 5 if args.quick else 15
    roofline = wo.dram_roofline_gbs()
    peak = peak_gops(3 if args.quick else 5)
    from lowbit.kernels.build import load_avx2

    result = {"threads": torch.get_num_threads(), "native_kernels": kernels.native_available(),
              "avx2_kernels": load_avx2(), "dram_roofline_gbs": round(roofline, 2), "peak_gops": peak,
              "layers": []}  # fmt: skip
    shapes = wo.SHAPES[:1] if args.quick else wo.SHAPES
    for n, k in shapes:
        for m in (1, 256):
            rows = float_rows(n, k, m, roofline, peak, repeat)
            fp32_ms = rows[0]["ms"]
            rows += w8a8_rows(n, k, m, roofline, peak, repeat) + weight_only_rows(n, k, m, roofline, repeat)
            for row in rows:
                if "ms" in row:
                    row["vs_fp32"] = round(fp32_ms / row["ms"], 2)
            result["layers"].append({"n": n, "k": k, "m": m, "rows": rows})
    result["dram_roofline_gbs_end"] = round(wo.dram_roofline_gbs(), 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
