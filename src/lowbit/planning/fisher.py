"""Second-order estimate of a layer's damage from one gradient pass (Fisher / Gauss-Newton diagonal).

Around the float model the planning metrics are at their minimum (KL to the float predictions,
1 - cosine to the float embedding), so changing the weights by dW costs about 0.5 * dW^T H dW,
with H the metric's Hessian there: the Fisher information of the predicted distribution (KL), or
J^T J of the normalised embedding (1 - cosine = 0.5 * |n - n_q|^2). Its diagonal is estimated
without bias from gradients of random targets: labels drawn from the model's own predictions
(E[g g^T] = F), or Gaussian projections v of the embedding (E[(J^T v)^2] = diag J^T J). One
backward pass per batch then prices every candidate of every layer, so fine grids of candidates
(w3..w6 at several group sizes) cost seconds instead of one forward pass each; and the estimate
is additive across layers by construction, which is what the knapsack assumes.

The diagonal ignores how errors of weights in the same row or column correlate; rounding errors
of round-to-nearest are close to independent, so the estimate suits weight-only RTN candidates.
Activation quantization is not a weight change and is refused. Far from float (2-bit grids) the
damage grows faster than quadratically: sensitivity.measure rescales each candidate's estimates
by one real measurement of that candidate on every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError

# Metric kinds whose Hessian at the float model is estimated: predicted distributions (KL) and
# normalised embeddings (1 - cosine).
DISTRIBUTION_KINDS = ("causal-lm", "image-classifier")


def fisher_diagonal(
    kind: str,
    model: nn.Module,
    batches: list[Any],
    layers: dict[str, nn.Module],
    outputs: Callable[[nn.Module, Any], torch.Tensor],
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], int]:
    """Per layer, the sum over batches of squared weight gradients of a random-target objective
    (fp32, the weight's shape), and the number of units it covers (tokens, sentences or images):
    diag(H) per unit = sum / units. ``outputs(model, batch)`` gives the metric's output with grad."""
    generator = torch.Generator().manual_seed(seed)
    weights = {name: layer.weight for name, layer in layers.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    total = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    units = 0
    try:
        for p in flags:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                out = outputs(model, batch).float()
                objective, count = _random_objective(kind, out, batch, generator)
                grads = torch.autograd.grad(objective, list(weights.values()), allow_unused=True)
                for name, grad in zip(weights, grads, strict=True):
                    if grad is not None:
                        total[name] += grad.float().pow(2)
                units += count
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if units == 0:
        raise SpecError("the Fisher estimate got no tokens, sentences or images from the calibration data")
    return total, units


def _random_objective(kind: str, out: torch.Tensor, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """A scalar whose squared gradient estimates the Hessian diagonal without bias, and its unit count."""
    if kind in DISTRIBUTION_KINDS:
        logits = out.flatten(0, -2)
        keep = _valid_positions(kind, batch, logits.shape[0])
        logits = logits[keep]
        with torch.no_grad():
            labels = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
        return F.cross_entropy(logits, labels, reduction="sum"), int(logits.shape[0])
    if kind == "encoder":
        v = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        return (out * v).sum(), int(out.shape[0])
    raise SpecError(f"no Fisher estimate for a {kind} model (supported: causal-lm, encoder, image-classifier)")


def _valid_positions(kind: str, batch: Any, rows: int) -> torch.Tensor:
    """Positions that are real tokens (attention mask of a causal LM batch), all rows otherwise."""
    mask = batch.get("attention_mask") if kind == "causal-lm" and isinstance(batch, dict) else None
    if mask is None:
        return torch.ones(rows, dtype=torch.bool)
    return mask.reshape(-1).bool()


def estimated_damage(diagonal: torch.Tensor, units: int, original: torch.Tensor, replaced: torch.Tensor) -> float:
    """0.5 * sum(diag(H) * dW^2) per unit: the metric's expected change when ``original`` becomes ``replaced``."""
    if replaced.shape != original.shape:
        raise SpecError(f"Fisher estimate: quantized weight {tuple(replaced.shape)} vs {tuple(original.shape)}")
    delta = replaced.float() - original.detach().float()
    return float(0.5 * (diagonal * delta * delta).sum() / units)
