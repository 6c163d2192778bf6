"""The report's plots as inline SVG (matplotlib, Agg backend): no files, no network."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")


def svg(fig) -> str:
    """The figure as an <svg> element (XML prolog dropped), then closed."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def scatter(
    series: dict[str, list[tuple[float, float, str]]], xlabel: str, ylabel: str, title: str, logx: bool = False
) -> str:
    """Labelled points per series (e.g. recipes per model): size or speed against quality."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for color, (name, points) in zip(COLORS * 4, series.items(), strict=False):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(xs, ys, color=color, label=name, zorder=3)
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return svg(fig)


def lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, title: str) -> str:
    """Curves with markers: a Pareto front, per-layer error by depth."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for color, (name, (xs, ys)) in zip(COLORS * 4, series.items(), strict=False):
        ax.plot(xs, ys, marker="o", markersize=3, color=color, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return svg(fig)


def bars(labels: list[str], series: dict[str, list[float]], ylabel: str, title: str, log: bool = True) -> str:
    """Grouped bars per label (per-layer sensitivity per candidate scheme)."""
    fig, ax = plt.subplots(figsize=(max(6.4, 0.28 * len(labels) * max(1, len(series))), 4.2))
    width = 0.8 / max(1, len(series))
    for k, (color, (name, values)) in enumerate(zip(COLORS * 4, series.items(), strict=False)):
        xs = [i + k * width for i in range(len(labels))]
        ax.bar(xs, [max(v, 1e-12) for v in values], width=width, color=color, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=6)
    if log:
        ax.set_yscale("log")
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return svg(fig)


def histogram(values, grid: Sequence[float], title: str) -> str:
    """Weight histogram with the quantization grid (the values codes stand for) drawn over it."""
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.hist(values, bins=120, color="#94a3b8")
    for level in grid:
        ax.axvline(level, color="#dc2626", linewidth=0.8, alpha=0.8)
    ax.set(xlabel="weight", ylabel="count", title=title)
    return svg(fig)
