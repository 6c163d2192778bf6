"""Range estimators: pick the clipping range [lo, hi] of each quantization group.

An estimator is called on a block of rows (one row = one group) and returns (lo, hi), one
value per row; ``primitives.qparams_from_range`` turns the range into scale and zero point.
The same estimators serve weights (called on the tensor) and activations (called by a
``RangeObserver`` on statistics gathered over calibration batches).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import SpecError
from .formats import Float, Format, Int
from .granularity import Granularity, PerTensor
from .primitives import channel_rows, fake_quantize, qparams_from_range


def _is_symmetric(fmt: Format) -> bool:
    return not (isinstance(fmt, Int) and not fmt.symmetric)


@dataclass(frozen=True)
class MinMax:
    """The full observed range: never clips."""

    name: ClassVar[str] = "minmax"

    def __call__(self, rows: torch.Tensor, fmt: Format, last_dim: int | None = None):
        return rows.amin(dim=1), rows.amax(dim=1)


@dataclass(frozen=True)
class MovingMinMax:
    """Exponential moving average of per-batch min/max (activations); min-max on one tensor."""

    momentum: float = 0.9
    name: ClassVar[str] = "moving_minmax"

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise SpecError(f"MovingMinMax: momentum={self.momentum} must lie in [0, 1)")

    def __call__(self, rows: torch.Tensor, fmt: Format, last_dim: int | None = None):
        return rows.amin(dim=1), rows.amax(dim=1)


def _kth(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row value at quantile ``q`` in [0, 1] (nearest rank; works on any size)."""
    n = rows.shape[1]
    k = min(n, max(1, math.ceil(q * n - 1e-9)))
    return rows.kthvalue(k, dim=1).values


@dataclass(frozen=True)
class Percentile:
    """Clip at the ``percentile`` of |x| (symmetric formats) or of each tail (asymmetric)."""

    percentile: float = 99.99
    name: ClassVar[str] = "percentile"

    def __post_init__(self) -> None:
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 100.0:
            raise SpecError(f"Percentile: percentile={p!r} must lie in (0, 100]")

    def __call__(self, rows: torch.Tensor, fmt: Format, last_dim: int | None = None):
        q = self.percentile / 100.0
        if _is_symmetric(fmt):
            top = _kth(rows.abs(), q)
            return -top, top
        lo, hi = _kth(rows, 1.0 - q) if q < 1.0 else rows.amin(dim=1), _kth(rows, q)
        return lo, hi


def _candidate_error(rows, fmt, lo, hi, power: float) -> torch.Tensor:
    qp = qparams_from_range(fmt, lo, hi)
    err = (fake_quantize(rows, fmt, qp, channel_rows()) - rows).abs().pow(power)
    return err.sum(dim=1)


def _grid_search(rows, fmt, ratios: torch.Tensor, score) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink min-max by each ratio; keep, per row, the ratio with the lowest score."""
    lo0, hi0 = rows.amin(dim=1), rows.amax(dim=1)
    if _is_symmetric(fmt):
        top = torch.maximum(lo0.abs(), hi0.abs())
        lo0, hi0 = -top, top
    best = torch.full((rows.shape[0],), float("inf"))
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for r in ratios.tolist():
        lo, hi = lo0 * r, hi0 * r
        err = score(rows, fmt, lo, hi)
        better = err < best
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


@dataclass(frozen=True)
class MSE:
    """Grid search over clipping ratios (1.0 down to 1 - max_shrink) for the least L^p error;
    ratio 1.0 (min-max) is a candidate, so it is never worse than min-max."""

    grid: int = 100
    max_shrink: float = 0.8
    power: float = 2.0
    name: ClassVar[str] = "mse"

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or self.grid < 1:
            raise SpecError(f"MSE: grid={self.grid!r} must be a positive integer")
        if not 0.0 <= self.max_shrink < 1.0:
            raise SpecError(f"MSE: max_shrink={self.max_shrink} must lie in [0, 1)")
        if not self.power > 0:
            raise SpecError(f"MSE: power={self.power} must be positive")

    def __call__(self, rows: torch.Tensor, fmt: Format, last_dim: int | None = None):
        ratios = torch.linspace(1.0, 1.0 - self.max_shrink, self.grid)
        return _grid_search(rows, fmt, ratios, lambda r, f, lo, hi: _candidate_error(r, f, lo, hi, self.power))


def _levels_count(fmt: Format) -> int:
    if isinstance(fmt, Int):
        return fmt.qmax + 1 if fmt.symmetric else 2 ** (fmt.bits - 1)
    if isinstance(fmt, Float):
        return 2 ** (fmt.bits - 1)
    return max(2, 2 ** (fmt.bits - 1))


def _kl_threshold(hist: torch.Tensor, edges_max: float, levels: int, stride: int) -> float:
    """TensorRT-style entropy calibration on a histogram of |x| over [0, edges_max]."""
    bins = hist.numel()
    best_kl, best_i = float("inf"), bins
    start = min(bins, max(levels, 128))
    for i in range(start, bins + 1, stride):
        p = hist[:i].clone()
        p[-1] += hist[i:].sum()
        # Merge the i reference bins into `levels` quantized bins, then spread back.
        idx = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")
        nonzero = (hist[:i] > 0).float()
        merged = torch.zeros(levels).index_add_(0, idx, hist[:i])
        counts = torch.zeros(levels).index_add_(0, idx, nonzero)
        q = torch.where(nonzero > 0, (merged / counts.clamp(min=1))[idx], torch.zeros_like(p))
        p, q = p / p.sum(), q / q.sum().clamp(min=1e-12)
        mask = p > 0
        kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp(min=1e-12))).sum())
        if kl < best_kl:
            best_kl, best_i = kl, i
    return (best_i / bins) * edges_max


@dataclass(frozen=True)
class Entropy:
    """KL-divergence (entropy) calibration: the clip threshold whose quantized histogram of
    |x| is closest to the original (TensorRT's method); clips heavy tails."""

    bins: int = 2048
    stride: int = 16
    name: ClassVar[str] = "entropy"

    def __post_init__(self) -> None:
        if not isinstance(self.bins, int) or self.bins < 128:
            raise SpecError(f"Entropy: bins={self.bins!r} must be an integer >= 128")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise SpecError(f"Entropy: stride={self.stride!r} must be a positive integer")

    def __call__(self, rows: torch.Tensor, fmt: Format, last_dim: int | None = None):
        lo0, hi0 = rows.amin(dim=1), rows.amax(dim=1)
        out = torch.empty(rows.shape[0])
        for g, row in enumerate(rows.abs()):
            top = float(row.max())
            if top == 0.0:
                out[g] = 0.0
                continue
            hist = torch.histc(row, bins=self.bins, min=0.0, max=top)
            out[g] = _kl_threshold(hist, top, _levels_count(fmt), self.stride)
        if _is_symmetric(fmt):
            return -out, out
        return torch.maximum(lo0, -out), torch.minimum(hi0, out)


@dataclass(frozen=True)
class SoftmaxCE:
    """For logits: the clipping ratio whose quantized softmax has the least cross-entropy to
    the float softmax, which keeps the largest logits (and their order) intact. Each row is
    cut into vectors of the tensor's last dimension (one logits vector each)."""

    grid: int = 50
    max_shrink: float = 0.8
    name: ClassVar[str] = "softmax_ce"

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or self.grid < 1:
            raise SpecError(f"SoftmaxCE: grid={self.grid!r} must be a positive integer")
        if not 0.0 <= self.max_shrink < 1.0:
            raise SpecError(f"SoftmaxCE: max_shrink={self.max_shrink} must lie in [0, 1)")

    def __call__(self, rows: torch.Tensor, fmt: Format, last_dim: int | None = None):
        width = last_dim if last_dim and rows.shape[1] % last_dim == 0 else rows.shape[1]

        def score(r, f, lo, hi):
            qp = qparams_from_range(f, lo, hi)
            fq = fake_quantize(r, f, qp, channel_rows())
            ref = torch.log_softmax(r.reshape(r.shape[0], -1, width), dim=-1)
            got = torch.log_softmax(fq.reshape(r.shape[0], -1, width), dim=-1)
            return -(ref.exp() * got).sum(dim=-1).mean(dim=-1)

        return _grid_search(rows, fmt, torch.linspace(1.0, 1.0 - self.max_shrink, self.grid), score)


RangeEstimator = MinMax | MovingMinMax | Percentile | MSE | Entropy | SoftmaxCE
ESTIMATORS: dict[str, type] = {cls.name: cls for cls in (MinMax, MovingMinMax, Percentile, MSE, Entropy, SoftmaxCE)}


def estimator_to_dict(est: RangeEstimator) -> dict[str, Any]:
    """Plain-JSON description, inverse of ``estimator_from_dict``."""
    return {"type": est.name, **{f.name: getattr(est, f.name) for f in dataclasses.fields(est)}}


def estimator_from_dict(data: dict[str, Any] | str) -> RangeEstimator:
    """Build an estimator from a name ('mse') or a mapping ({'type': 'percentile', ...})."""
    if isinstance(data, str):
        data = {"type": data}
    if not isinstance(data, dict) or data.get("type") not in ESTIMATORS:
        raise SpecError(f"range estimator {data!r} is unknown; allowed: {sorted(ESTIMATORS)}")
    cls = ESTIMATORS[data["type"]]
    fields = {k: v for k, v in data.items() if k != "type"}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise SpecError(f"range estimator {data['type']!r}: unknown key(s) {unknown}")
    return cls(**fields)


def merge_samples(
    first: torch.Tensor, first_seen: int, second: torch.Tensor, second_seen: int, cap: int, gen: torch.Generator
) -> torch.Tensor:
    """At most ``cap`` rows drawn from two row samples, each side in proportion to the rows it
    stands for (``*_seen``), so the result stays a fair sample of both streams."""
    if first.shape[0] + second.shape[0] <= cap:
        return torch.cat([first, second])
    keep = round(cap * first_seen / max(1, first_seen + second_seen))
    keep = min(first.shape[0], cap, max(keep, cap - second.shape[0]))
    old = first[torch.randperm(first.shape[0], generator=gen)[:keep]]
    new = second[torch.randperm(second.shape[0], generator=gen)[: cap - keep]]
    return torch.cat([old, new])


class RangeObserver:
    """Accumulates activation statistics over calibration batches for one tensor.

    Keeps the exact running min/max (and its moving average) per group, plus a bounded,
    seeded sample of whole token rows ([..., last_dim] vectors) for estimators that need the
    distribution (percentile, MSE, entropy, softmax CE)."""

    def __init__(
        self,
        estimator: RangeEstimator | None = None,
        granularity: Granularity | None = None,
        max_samples: int = 1 << 20,
        seed: int = 0,
    ) -> None:
        self.estimator = estimator or MinMax()
        self.granularity = granularity or PerTensor()
        self.max_samples = max_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None
        self.rows_seen = 0
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []  # per-update ranges (moving average)

    def update(self, x: torch.Tensor) -> None:
        """Add one batch (any shape whose last dimension is the feature dimension)."""
        from .primitives import check_finite

        check_finite(x, "activation")
        x = x.detach().float()
        rows = x.reshape(-1, x.shape[-1] if x.dim() else 1)
        lo, hi = self.granularity.reduce(rows, lambda r: (r.amin(dim=1), r.amax(dim=1)))
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif isinstance(self.estimator, MovingMinMax):
            m = self.estimator.momentum
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        if isinstance(self.estimator, MovingMinMax):
            self.history.append((lo, hi))
        if not isinstance(self.estimator, (MinMax, MovingMinMax)):
            self._keep(rows)
        else:
            self.rows_seen += rows.shape[0]

    def merged(self, later: RangeObserver, gen: torch.Generator) -> RangeObserver:
        """One observer for this one's batches followed by ``later``'s (the moving average is
        replayed in batch order; the row samples are merged in proportion to the rows each saw,
        drawing with ``gen``), so calibration split across processes equals one pass."""
        out = RangeObserver(self.estimator, self.granularity, self.max_samples)
        out.rows_seen = self.rows_seen + later.rows_seen
        out.history = self.history + later.history
        if isinstance(self.estimator, MovingMinMax):
            m = self.estimator.momentum
            out.lo, out.hi = out.history[0]
            for lo, hi in out.history[1:]:
                out.lo, out.hi = m * out.lo + (1 - m) * lo, m * out.hi + (1 - m) * hi
        else:
            out.lo, out.hi = torch.minimum(self.lo, later.lo), torch.maximum(self.hi, later.hi)
        if self.sample is not None and later.sample is not None:
            cap = max(1, self.max_samples // self.sample.shape[1])
            out.sample = merge_samples(self.sample, self.rows_seen, later.sample, later.rows_seen, cap, gen)
        return out

    def _keep(self, rows: torch.Tensor) -> None:
        cap = max(1, self.max_samples // rows.shape[1])
        seen, new = self.rows_seen, rows.shape[0]
        self.rows_seen += new
        if self.sample is None:
            self.sample = rows[torch.randperm(new, generator=self.gen)[:cap]]
            return
        total = self.sample.shape[0] + new
        if total <= cap:
            self.sample = torch.cat([self.sample, rows])
            return
        keep_old = min(self.sample.shape[0], round(cap * seen / (seen + new)))
        old = self.sample[torch.randperm(self.sample.shape[0], generator=self.gen)[:keep_old]]
        fresh = rows[torch.randperm(new, generator=self.gen)[: cap - keep_old]]
        self.sample = torch.cat([old, fresh])

    def compute(self, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range (lo, hi), parameter-shaped for the observer's granularity."""
        if self.lo is None:
            raise SpecError("RangeObserver.compute: no batch was observed; run calibration data first")
        if self.sample is None:
            return self.lo, self.hi
        last = self.sample.shape[1]
        lo, hi = self.granularity.reduce(self.sample, lambda r: self.estimator(r, fmt, last_dim=last))
        return torch.maximum(lo, self.lo), torch.minimum(hi, self.hi)
