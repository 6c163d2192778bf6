"""Calibration: run batches through a model and collect, per layer, the input statistics that
quantization needs (activation ranges for static schemes; channel ranges, sampled input rows
and Hessians for data-driven algorithms) with forward hooks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError, LowbitError
from .primitives import check_finite
from .ranges import MinMax, MovingMinMax, RangeObserver
from .recipe import ActivationSpec, LayerScheme

STAT_KINDS = ("channels", "mean", "samples", "hessian", "range")


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """Feed one calibration batch: a dict of keyword tensors, a tuple of positional ones, or a tensor."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def run_batches(model: nn.Module, batches: Iterable[Any]) -> int:
    """Run every batch under inference mode; returns how many ran."""
    count = 0
    with torch.inference_mode():
        for batch in batches:
            try:
                forward_batch(model, batch)
            except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                if isinstance(exc, LowbitError):
                    raise
                raise DataError(
                    f"calibration batch {count} does not fit the model ({exc}); give batches shaped like "
                    "the model's input (a tensor, a tuple of tensors, or a dict of keyword tensors)"
                ) from exc
            count += 1
    if count == 0:
        raise DataError("calibration data is empty; give at least one batch")
    return count


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
    observer: RangeObserver | None = None

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


class _Collector:
    """Forward pre-hook state for one layer."""

    def __init__(self, module: nn.Module, kinds: set[str], act: ActivationSpec, max_samples: int, seed: int):
        self.module, self.kinds, self.max_samples = module, kinds, max_samples
        self.stats = LayerStats()
        self.gen = torch.Generator().manual_seed(seed)
        self._reservoir: torch.Tensor | None = None
        self._peaks: torch.Tensor | None = None
        if "range" in kinds:
            self.stats.observer = RangeObserver(act.range, act.resolved_granularity, seed=seed)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        check_finite(
            x,
            f"calibration input of a {type(module).__name__} {tuple(x.shape)}",
            "check the calibration data and that the float model runs on it without overflow",
        )
        stats = self.stats
        rows = _input_rows(module, x)
        if stats.observer is not None:
            stats.observer.update(rows)
        if "channels" in self.kinds:
            lo, hi = rows.amin(dim=0), rows.amax(dim=0)
            stats.channel_min = lo if stats.channel_min is None else torch.minimum(stats.channel_min, lo)
            stats.channel_max = hi if stats.channel_max is None else torch.maximum(stats.channel_max, hi)
        if "mean" in self.kinds:
            total = rows.double().sum(dim=0)
            stats.channel_sum = total if stats.channel_sum is None else stats.channel_sum + total
        if "samples" in self.kinds:
            self._sample(rows)
        if "hessian" in self.kinds:
            h_rows = _hessian_rows(module, x).double()
            step = h_rows.T @ h_rows
            stats.hessian_sum = step if stats.hessian_sum is None else stats.hessian_sum + step
            stats.hessian_rows += h_rows.shape[0]
        stats.rows_seen += rows.shape[0]

    def _sample(self, rows: torch.Tensor) -> None:
        """Reservoir-style: keep at most ``max_samples`` rows, each seen row equally likely, plus
        the ``max_samples // 32`` rows of largest magnitude seen (attention-sink tokens and
        other rare massive activations dominate output error yet are easily missed by chance)."""
        cap, seen, new = self.max_samples, self.stats.rows_seen, rows.shape[0]
        pool = self._reservoir
        if pool is None or pool.shape[0] + new <= cap:
            pick = rows[torch.randperm(new, generator=self.gen)[:cap]]
            pool = pick if pool is None else torch.cat([pool, pick])
        else:
            keep_old = min(pool.shape[0], round(cap * seen / (seen + new)))
            old = pool[torch.randperm(pool.shape[0], generator=self.gen)[:keep_old]]
            fresh = rows[torch.randperm(new, generator=self.gen)[: cap - keep_old]]
            pool = torch.cat([old, fresh])
        self._reservoir = pool
        peaks = rows if self._peaks is None else torch.cat([self._peaks, rows])
        n_peaks = max(1, cap // 32)
        if peaks.shape[0] > n_peaks:
            peaks = peaks[peaks.abs().amax(dim=1).topk(n_peaks).indices]
        self._peaks = peaks.clone()
        self.stats.samples = torch.cat([pool, self._peaks])


def collect_statistics(
    model: nn.Module,
    plan: dict[str, LayerScheme],
    batches: Iterable[Any],
    needs: dict[str, set[str]],
    max_samples: int = 1024,
    seed: int = 0,
) -> dict[str, LayerStats]:
    """Run ``batches`` once and return, per layer named in ``needs``, the statistics asked for
    (a subset of STAT_KINDS)."""
    collectors: dict[str, _Collector] = {}
    handles = []
    for index, (name, kinds) in enumerate(needs.items()):
        if not kinds:
            continue
        module = model.get_submodule(name)
        collector = _Collector(module, kinds, plan[name].activation, max_samples, seed + index)
        collectors[name] = collector
        handles.append(module.register_forward_pre_hook(collector))
    if not collectors:
        return {}
    try:
        run_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return {name: c.stats for name, c in collectors.items()}


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
    pixels = data.images(path or "photo-crops").images
    batch = loaded.preprocess(pixels) if loaded.preprocess is not None else pixels
    return [batch[i : i + 16] for i in range(0, min(len(batch), samples), 16)]
