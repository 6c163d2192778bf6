"""`lowbit report`: one self-contained HTML file from saved results (eval, bench, sensitivity,
plan, demo JSON) and optionally a checkpoint (weight histograms with the grid, SQNR by depth)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from ..io import atomic_path
from . import charts
from . import page as P
from .collect import load_results


def _quality(row: dict) -> tuple[str, float] | None:
    for key, label in (("perplexity", "perplexity"), ("cosine", "cosine"), ("accuracy", "accuracy")):
        if isinstance(row.get(key), (int, float)):
            return label, float(row[key])
    return None


def _recipes(results: list[tuple[str, str, dict]]) -> list[str]:
    """The recipe table and the Pareto charts of demo / accuracy / eval results."""
    rows, size_pts, speed_pts = [], {}, {}
    for kind, name, data in results:
        if kind == "demo":
            floats = {r["model"]: r for r in data["rows"] if r.get("recipe") == "float32"}
            for r in data["rows"]:
                base, q = floats.get(r["model"], {}), _quality(r)
                bq = _quality(base) if base else None
                speed = base.get("latency_ms", 0) / r["latency_ms"] if base and r.get("latency_ms") else None
                model = str(r["model"]).removeprefix("builtin:")
                rows.append([
                    model, r["recipe"], r["size_mb"], r["bits_per_weight"],
                    f"{q[0]} {q[1]:.4g}" if q else "-", f"{bq[1]:.4g}" if bq else "-",
                    speed if speed is not None else "-", name,
                ])  # fmt: skip
                if q:
                    size_pts.setdefault(f"{model} ({q[0]})", []).append((r["size_mb"], q[1], r["recipe"]))
                    if r.get("latency_ms"):
                        speed_pts.setdefault(f"{model} ({q[0]})", []).append((r["latency_ms"], q[1], r["recipe"]))
        elif kind == "accuracy":
            base = next((r for r in data["rows"] if r.get("method") == "-"), None)
            for r in data["rows"]:
                rows.append([
                    str(data.get("model", "")).removeprefix("builtin:"), f"{r['scheme']} {r['method']}", "-", "-",
                    f"perplexity {r['perplexity']:.4g}", f"{base['perplexity']:.4g}" if base else "-", "-", name,
                ])  # fmt: skip
        elif kind == "eval":
            metrics = ", ".join(f"{k} {P.number(v)}" for k, v in data["metrics"].items() if isinstance(v, (int, float)))
            rows.append([
                data.get("model", ""), data["task"], data["size_bytes"] / 1e6, data["bits_per_weight"],
                metrics, "-", "-", name,
            ])  # fmt: skip
    out = []
    if rows:
        headers = ["model", "recipe", "size MB", "bits/weight", "quality", "float", "speed vs float", "file"]
        body = P.table(headers, rows)
        if size_pts:
            body += '<div class="grid">' + P.figure(
                charts.scatter(size_pts, "size (MB)", "quality", "Size vs quality"),
                "Pareto view: smaller and better is up-left for cosine, down-left for perplexity.",
            )
            if speed_pts:
                body += P.figure(
                    charts.scatter(speed_pts, "latency (ms)", "quality", "Speed vs quality"),
                    "Latency as measured in the same run as float.",
                )
            body += "</div>"
        out.append(P.section("Recipes", body))
    return out


def _plans(results: list[tuple[str, str, dict]]) -> list[str]:
    out = []
    for kind, name, data in results:
        if kind != "plan":
            continue
        front = sorted(data["front"], key=lambda p: p["size_mb"])
        series = {"Pareto front (plans)": ([p["size_mb"] for p in front], [p["predicted_damage"] for p in front])}
        presets = sorted(data.get("presets", []), key=lambda p: p["size_mb"])
        if presets:
            series["uniform presets"] = ([p["size_mb"] for p in presets], [p["predicted_damage"] for p in presets])
        plan = data["plan"]
        series["this plan"] = ([plan["size_mb"]], [plan["predicted_damage"]])
        rows = [["plan", plan["size_mb"], plan["bits_per_weight"], plan["predicted_damage"]]]
        rows += [[p["label"], p["size_mb"], p["bits_per_weight"], p["predicted_damage"]] for p in presets]
        verified = data.get("verification")
        body = P.figure(
            charts.lines(series, "size (MB)", f"predicted damage ({data.get('metric', '')})", "Plan: size vs damage"),
            f"{name}: exact knapsack front over the measured options, next to uniform presets.",
        ) + P.table(["", "size MB", "bits/weight", "predicted damage"], rows)
        if data.get("latency_front"):
            body += _latency_figure(name, data, presets)
        if isinstance(verified, dict):
            body += P.table(["verification", "value"], [[k, v] for k, v in verified.items() if not isinstance(v, dict)])
        out.append(P.section(f"Mixed-precision plan ({name})", body))
    return out


def _latency_figure(name: str, data: dict, presets: list[dict]) -> str:
    """Estimated latency of the planned layers vs predicted damage: the front, presets, float."""
    front = sorted(data["latency_front"], key=lambda p: p["latency_ms"])
    series = {"Pareto front (plans)": ([p["latency_ms"] for p in front], [p["predicted_damage"] for p in front])}
    timed = [p for p in presets if "latency_ms" in p]
    if timed:
        series["uniform presets"] = ([p["latency_ms"] for p in timed], [p["predicted_damage"] for p in timed])
    if "latency_ms" in data["plan"]:
        series["this plan"] = ([data["plan"]["latency_ms"]], [data["plan"]["predicted_damage"]])
    if data.get("float_latency_ms"):
        series["float"] = ([data["float_latency_ms"]], [0.0])
    return P.figure(
        charts.lines(series, "estimated latency of the layers (ms)", "predicted damage", "Plan: latency vs damage"),
        f"{name}: each layer's kernel timed on {data.get('latency_input') or 'a planning batch'}, summed over "
        "the planned layers (attention, norms and the head are not included).",
    )


def _sensitivity(results: list[tuple[str, str, dict]]) -> list[str]:
    out = []
    for kind, name, data in results:
        if kind != "sensitivity":
            continue
        layers = list(data["layers"])
        series = {c: [data["layers"][n]["options"][c]["damage"] for n in layers] for c in data["candidates"]}
        labels = [n.replace("model.", "").replace("encoder.layer.", "L") for n in layers]
        svg = charts.bars(
            labels, series, f"damage ({data.get('metric', '')})", "Damage when only this layer is quantized"
        )
        out.append(P.section(f"Per-layer sensitivity ({name})", P.figure(svg, f"{data.get('model', '')}, log scale.")))
    return out


def _speed(results: list[tuple[str, str, dict]]) -> list[str]:
    rows = []
    for kind, name, data in results:
        if kind == "bench":
            for r in data["rows"]:
                rows.append(
                    [data["model"], f"{r['batch']}x{r['length']}", r["median_ms"], r["throughput"], r["unit"], name]
                )
            if "decode" in data:
                d = data["decode"]
                rows.append(
                    [data["model"], "decode", d["decode_ms_per_token"], d["decode_tokens_per_s"], "tokens/s", name]
                )
    if not rows:
        return []
    return [P.section("Speed", P.table(["model", "shape", "median ms", "throughput", "unit", "file"], rows))]


def _weights(checkpoint: Path | None) -> list[str]:
    if checkpoint is None:
        return [P.section("Weights", P.note("No checkpoint given (--model): weight histograms and SQNR omitted."))]
    from .weights import weight_views

    views = weight_views(checkpoint)
    body = ""
    if views["sqnr"]:
        names = [n for n, _ in views["sqnr"]]
        curve = {"SQNR": (list(range(len(names))), [v for _, v in views["sqnr"]])}
        plot = charts.lines(curve, "layer (depth order)", "SQNR (dB)", "Per-layer weight SQNR by depth")
        body += P.figure(plot, f"Against the source model {views['reference']}.")
    else:
        body += P.note("The source model named in lowbit.json could not be loaded: SQNR omitted.")
    figs = [
        P.figure(charts.histogram(values, grid, f"{name} ({fmt})"), f"{name}: red lines: its first group's levels.")
        for name, values, grid, fmt in views["histograms"]
    ]
    body += '<div class="grid">' + "".join(figs) + "</div>"
    return [P.section(f"Weights ({checkpoint.name})", body), _targets(checkpoint)]


def _targets(checkpoint: Path) -> str:
    """Per hardware target, how many of the checkpoint's layers its kernels run and which fall back."""
    from ..planning.targets import checkpoint_schemes, fallbacks_by_target

    schemes = checkpoint_schemes(json.loads((checkpoint / "lowbit.json").read_text()))
    rows = []
    for target, fallbacks in fallbacks_by_target(schemes).items():
        example = next(iter(fallbacks.items()), None)
        rows.append([
            target, len(schemes) - len(fallbacks), len(fallbacks),
            "-" if example is None else f"{example[0]}: {example[1]}",
        ])  # fmt: skip
    return P.section(
        f"Hardware targets ({checkpoint.name})",
        P.table(["target", "layers its kernels run", "layers that fall back", "example"], rows)
        + P.note("A layer that falls back runs on a slower path (or in float) on that target."),
    )


def environment() -> dict[str, Any]:
    """Versions, CPU/GPU and the kernels lowbit registered on this machine."""
    import os

    import torch

    from .. import __version__
    from ..kernels import kernels_for

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "lowbit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "kernels (linear)": ", ".join(k.name for k in kernels_for("linear")) or "reference",
        "LOWBIT_KERNEL": os.environ.get("LOWBIT_KERNEL", "(auto)"),
    }


def build(results: list[tuple[str, str, dict]], checkpoint: Path | None = None, title: str = "lowbit report") -> str:
    """The HTML text of a report over loaded results (see collect.load_results)."""
    sections = _recipes(results) + _plans(results) + _sensitivity(results) + _speed(results) + _weights(checkpoint)
    kinds = {kind for kind, _, _ in results}
    missing = [k for k in ("sensitivity", "plan", "bench") if k not in kinds]
    if missing:
        sections.append(P.section("Not in this report", P.note(f"No {', '.join(missing)} results were given.")))
    env = environment()
    sections.append(P.section("Environment", P.table(["", ""], [[k, v] for k, v in env.items()])))
    return P.document(title, sections)


def write_report(paths: list[Path], out: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    """Build the report from result files and write it atomically to ``out``."""
    results = load_results(paths)
    text = build(results, checkpoint)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return {
        "out": str(out),
        "bytes": out.stat().st_size,
        "inputs": [f"{k}:{n}" for k, n, _ in results],
        "plots": text.count("<svg"),
    }
