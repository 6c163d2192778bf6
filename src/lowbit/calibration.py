"""Calibration: run batches through a model and collect, per layer, the input statistics that
quantization needs (activation ranges for static schemes; channel ranges, sampled input rows
and Hessians for data-driven algorithms) with forward hooks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError, LowbitError
from .primitives import check_finite
from .ranges import MinMax, MovingMinMax, RangeObserver, merge_samples
from .recipe import ActivationSpec, LayerScheme
from .reduction import TreeReducer, gathered, owned

STAT_KINDS = ("channels", "mean", "samples", "hessian", "range", "cross")


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """Feed one calibration batch: a dict of keyword tensors, a tuple of positional ones, or a tensor."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_batch(model: nn.Module, batch: Any, index: int) -> None:
    """Run one calibration batch under inference mode; a batch the model cannot take is a DataError."""
    with torch.inference_mode():
        try:
            forward_batch(model, batch)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, LowbitError):
                raise
            raise DataError(
                f"calibration batch {index} does not fit the model ({exc}); give batches shaped like "
                "the model's input (a tensor, a tuple of tensors, or a dict of keyword tensors)"
            ) from exc


@dataclass
class LayerStats:
    """What one layer saw during calibration. ``rows`` views the input as [tokens, in_features]
    (a conv input as [pixels, channels]); the Hessian is over the layer's true reduction axis
    (a conv's unfolded patches)."""

    rows_seen: int = 0
    channel_min: torch.Tensor | None = None
    channel_max: torch.Tensor | None = None
    channel_sum: torch.Tensor | None = None
    samples: torch.Tensor | None = None
    hessian_sum: torch.Tensor | None = None
    hessian_rows: int = 0
    cross_sum: torch.Tensor | None = None  # sum of x_float^T x over the Hessian rows (sequential runs only)
    observer: RangeObserver | None = None
    pool: torch.Tensor | None = None  # a fair sample of the rows seen
    peaks: torch.Tensor | None = None  # the rows of largest magnitude seen

    @property
    def channel_absmax(self) -> torch.Tensor:
        return torch.maximum(self.channel_min.abs(), self.channel_max.abs())

    @property
    def channel_mean(self) -> torch.Tensor:
        return self.channel_sum / max(1, self.rows_seen)

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n (the GPTQ convention)."""
        return 2.0 * self.hessian_sum / max(1, self.hessian_rows)

    @property
    def cross(self) -> torch.Tensor:
        """C = 2 X_float^T X / n: the layer's float-model inputs against the inputs it really sees
        (the quantized blocks before it); H's counterpart for an asymmetric GPTQ target."""
        return 2.0 * self.cross_sum / max(1, self.hessian_rows)

    def input_range(self, act: ActivationSpec, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipping range of the (smoothed) input for a static activation scheme."""
        if smooth is None and self.observer is not None:
            return self.observer.compute(act.format)
        if smooth is not None and isinstance(act.range, (MinMax, MovingMinMax)) and self.channel_min is not None:
            lo, hi = self.channel_min / smooth, self.channel_max / smooth  # exact: s > 0
            if act.resolved_granularity.name == "tensor":
                return lo.min().reshape(1), hi.max().reshape(1)
            return lo, hi
        if self.samples is None:
            raise DataError("static activation ranges of smoothed inputs need sampled inputs; calibrate again")
        observer = RangeObserver(act.range, act.resolved_granularity)
        observer.update(self.samples / (1 if smooth is None else smooth))
        return observer.compute(act.format)


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _hessian_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, nn.Module):
            x = pad(x)
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _node_seed(seed: int, node: tuple[int, int]) -> int:
    """A seed fixed by the run's seed and the reduction-tree node, not by the order of work."""
    return (seed * 1_000_003 + node[0] * 8_191 + node[1] * 131 + 17) % (1 << 62)


def _generator(seed: int, node: tuple[int, int]) -> torch.Generator:
    return torch.Generator().manual_seed(_node_seed(seed, node))


def _top_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    if rows.shape[0] > count:
        rows = rows[rows.abs().amax(dim=1).topk(count).indices]
    return rows.clone()


def _either(a: Any, b: Any, both: Callable[[Any, Any], Any]) -> Any:
    return b if a is None else a if b is None else both(a, b)


class _Collector:
    """Forward pre-hook state for one layer. Each call's statistics become a leaf of an ordered
    reduction over batch indices (lowbit.reduction); the runner brackets every batch with
    ``begin(index)`` / ``end()`` and calls outside a bracket are not counted."""

    def __init__(
        self,
        module: nn.Module,
        kinds: set[str],
        act: ActivationSpec,
        max_samples: int,
        seed: int,
        shared: dict | None = None,
    ):
        self.module, self.kinds, self.act, self.max_samples, self.seed = module, kinds, act, max_samples, seed
        # Hessian products of the current batch by input tensor, shared by the collectors of one run
        # (q/k/v, gate/up read the very same tensor: one product serves all)
        self.shared = {} if shared is None else shared
        self.n_peaks = max(1, max_samples // 32)
        self.tree: TreeReducer[LayerStats] = TreeReducer(self.combine)
        self.index, self.calls = -1, 0
        self.current: LayerStats | None = None
        self.reference: list[torch.Tensor] | None = None  # the float model's inputs of this batch, per call

    def begin(self, index: int) -> None:
        self.index, self.calls, self.current = index, 0, None
        self.shared.clear()

    def end(self) -> None:
        if self.index >= 0:
            self.tree.push(self.index, self.current if self.current is not None else LayerStats())
        self.index, self.current = -1, None
        self.shared.clear()

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if self.index < 0:
            return
        x = args[0].detach().float()
        check_finite(
            x,
            f"calibration input of a {type(module).__name__} {tuple(x.shape)}",
            "check the calibration data and that the float model runs on it without overflow",
        )
        leaf = self.leaf(module, x, (self.index, 1_000 + self.calls))
        key = (self.index, -1 - self.calls)
        self.current = leaf if self.current is None else self.combine(self.current, leaf, key)
        self.calls += 1

    def leaf(self, module: nn.Module, x: torch.Tensor, node: tuple[int, int]) -> LayerStats:
        """The statistics of one call's input."""
        stats = LayerStats()
        rows = _input_rows(module, x)
        gen = _generator(self.seed, node)
        if "range" in self.kinds:
            seed = _node_seed(self.seed + 1, node)
            stats.observer = RangeObserver(self.act.range, self.act.resolved_granularity, seed=seed)
            stats.observer.update(rows)
        if "channels" in self.kinds:
            stats.channel_min, stats.channel_max = rows.amin(dim=0), rows.amax(dim=0)
        if "mean" in self.kinds:
            stats.channel_sum = rows.double().sum(dim=0)
        if "samples" in self.kinds:
            stats.pool = rows[torch.randperm(rows.shape[0], generator=gen)[: self.max_samples]]
            stats.peaks = _top_rows(rows, self.n_peaks)
        if "hessian" in self.kinds:
            stats.hessian_sum, stats.hessian_rows, stats.cross_sum = self.products(module, x)
        stats.rows_seen = rows.shape[0]
        return stats

    def products(self, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """X^T X over this call's Hessian rows (and X_float^T X with the float model's input, for
        "cross"), as float32 products returned in float64 (the batches are summed in float64).
        Layers reading the very same input tensor in one batch share one computation."""
        reference = None
        if "cross" in self.kinds and self.reference is not None:
            reference = self.reference[self.calls].detach().float()
            if reference.shape != x.shape:
                raise DataError(f"float-model input {tuple(reference.shape)} differs from {tuple(x.shape)}")
        key = None
        if not isinstance(module, nn.Conv2d):  # a linear's rows are its input's: the input alone decides them
            key = (x.data_ptr(), tuple(x.shape), x.stride(), None if reference is None else reference.data_ptr())
            if key in self.shared:
                return self.shared[key][-1]
        h_rows = _hessian_rows(module, x)
        cross = None if reference is None else (_hessian_rows(module, reference).T @ h_rows).double()
        result = ((h_rows.T @ h_rows).double(), h_rows.shape[0], cross)
        if key is not None:
            self.shared[key] = (x, reference, result)  # holding the tensors keeps their storage from reuse
        return result

    def combine(self, a: LayerStats, b: LayerStats, node: tuple[int, int]) -> LayerStats:
        """The statistics of ``a``'s rows followed by ``b``'s. Sums, extremes and the peak rows
        are exact; the row sample draws in proportion to the rows each side saw, seeded by the
        tree node, so the result does not depend on which process did the work."""
        gen = _generator(self.seed, node)
        out = LayerStats(rows_seen=a.rows_seen + b.rows_seen, hessian_rows=a.hessian_rows + b.hessian_rows)
        out.channel_min = _either(a.channel_min, b.channel_min, torch.minimum)
        out.channel_max = _either(a.channel_max, b.channel_max, torch.maximum)
        out.channel_sum = _either(a.channel_sum, b.channel_sum, torch.add)
        out.hessian_sum = _either(a.hessian_sum, b.hessian_sum, torch.add)
        out.cross_sum = _either(a.cross_sum, b.cross_sum, torch.add)
        out.observer = _either(a.observer, b.observer, lambda p, q: p.merged(q, gen))
        out.pool = _either(
            a.pool, b.pool, lambda p, q: merge_samples(p, a.rows_seen, q, b.rows_seen, self.max_samples, gen)
        )
        out.peaks = _either(a.peaks, b.peaks, lambda p, q: _top_rows(torch.cat([p, q]), self.n_peaks))
        return out


def finish_statistics(collectors: dict[str, _Collector], count: int) -> dict[str, LayerStats]:
    """Every collector's statistics over all ``count`` batches, gathered from every process
    under torchrun and combined in batch order."""
    stats = gathered({name: c.tree for name, c in collectors.items()}, count)
    for layer in stats.values():
        if layer.pool is not None:
            layer.samples = torch.cat([layer.pool, layer.peaks])
    return stats


def collect_statistics(
    model: nn.Module,
    plan: dict[str, LayerScheme],
    batches: Iterable[Any],
    needs: dict[str, set[str]],
    max_samples: int = 1024,
    seed: int = 0,
) -> dict[str, LayerStats]:
    """Run ``batches`` once and return, per layer named in ``needs``, the statistics asked for
    (a subset of STAT_KINDS). Under torchrun each process runs its share of the batches and
    the statistics are gathered; they equal the single-process ones to the bit."""
    batches = list(batches)
    if not batches:
        raise DataError("calibration data is empty; give at least one batch")
    collectors: dict[str, _Collector] = {}
    handles = []
    shared: dict = {}
    for index, (name, kinds) in enumerate(needs.items()):
        if not kinds:
            continue
        module = model.get_submodule(name)
        collector = _Collector(module, kinds, plan[name].activation, max_samples, seed + index, shared)
        collectors[name] = collector
        handles.append(module.register_forward_pre_hook(collector))
    if not collectors:
        return {}
    try:
        for index in owned(len(batches)):
            for collector in collectors.values():
                collector.begin(index)
            run_batch(model, batches[index], index)
            for collector in collectors.values():
                collector.end()
    finally:
        for handle in handles:
            handle.remove()
    return finish_statistics(collectors, len(batches))


def calibration_data(loaded: Any, path: str | None = None, samples: int = 128, seq_len: int = 512) -> list[Any]:
    """Default calibration batches for a loaded model: random token windows of a text file
    (WikiText-2 valid by default) for language models, sentences for encoders, images
    (a folder, or crops of the bundled sample photos) for image classifiers."""
    from . import data

    if samples < 1 or seq_len < 1:
        raise DataError(f"calibration needs samples >= 1 and seq_len >= 1 (got {samples}, {seq_len})")
    if loaded.kind in ("causal-lm", "encoder") and loaded.tokenizer is None:
        raise DataError(f"{loaded.source}: no tokenizer to build calibration data with; pass calibration batches")
    if loaded.kind == "causal-lm":
        windows = data.lm_calibration(loaded.tokenizer, path, samples=samples, seq_len=seq_len)
        return [{"input_ids": w} for w in windows]
    if loaded.kind == "encoder":
        texts = data.sentences(path or data.wikitext("valid"), count=samples)
        return data.encoder_batches(loaded.tokenizer, texts, batch_size=16, max_length=min(seq_len, 512))
    from .evaluation.classification import image_batches

    pixels = data.images(path or "photo-crops").images
    return list(image_batches(pixels[:samples], loaded.preprocess, 16))
