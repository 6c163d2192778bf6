"""Weight fidelity of number formats: bits per weight, SQNR and relative error on real weights."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from ..spec import QuantSpec
from ..tensor import QTensor


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when the two are equal)."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approx.double()).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(signal / noise))


def linear_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 2-D ``*.weight`` matrices of Linear layers (embeddings and norms excluded)."""
    return {
        k: v
        for k, v in state.items()
        if k.endswith(".weight") and v.dim() == 2 and v.is_floating_point() and "embed" not in k
    }


def format_study(weights: dict[str, torch.Tensor], specs: Iterable[QuantSpec]) -> list[dict]:
    """Quantize every weight with every spec; aggregate storage and error over all weights."""
    rows = []
    for spec in specs:
        start = time.perf_counter()
        signal = noise = 0.0
        nbytes = numel = 0
        worst = float("inf")
        for name, w in weights.items():
            qt = QTensor.quantize(w, spec, name=name)
            approx = qt.dequantize(torch.float32)
            s, n = float(w.double().pow(2).sum()), float((w.double() - approx.double()).pow(2).sum())
            signal, noise = signal + s, noise + n
            worst = min(worst, sqnr_db(w, approx))
            nbytes, numel = nbytes + qt.nbytes, numel + w.numel()
        rows.append(
            {
                "format": spec.format.name,
                "granularity": spec.granularity.name,
                "range": spec.range.name,
                "bits_per_weight": 8.0 * nbytes / max(numel, 1),
                "sqnr_db": float("inf") if noise == 0 else 10 * torch.log10(torch.tensor(signal / noise)).item(),
                "worst_layer_sqnr_db": worst,
                "relative_error": (noise / signal) ** 0.5 if signal else 0.0,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows
