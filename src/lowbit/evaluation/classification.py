"""Image classification: accuracy against labels and agreement of predictions with a reference model."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import DataError, ModelError
from .perplexity import model_device

Images = torch.Tensor | list[torch.Tensor]
Preprocess = Callable[[torch.Tensor], torch.Tensor]


def image_batches(images: Images, preprocess: Preprocess | None, batch_size: int):
    """Model-ready batches: a tensor is sliced; a list of differently sized images is preprocessed
    one by one (preprocess must bring them to one size) and then stacked."""
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        if torch.is_tensor(chunk):
            yield preprocess(chunk) if preprocess else chunk
            continue
        parts = [preprocess(img.unsqueeze(0)) if preprocess else img.unsqueeze(0) for img in chunk]
        try:
            yield torch.cat(parts)
        except RuntimeError as exc:
            shapes = sorted({tuple(p.shape[1:]) for p in parts})
            raise DataError(
                f"classify: images of different sizes {shapes[:3]} cannot form a batch; "
                "pass a preprocess that resizes them (Loaded.preprocess)"
            ) from exc


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    logits = getattr(out, "logits", out)
    if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != batch.shape[0]:
        raise ModelError(
            f"{type(model).__name__}: expected logits [batch, classes] for input {tuple(batch.shape)}, "
            f"got {getattr(logits, 'shape', type(logits).__name__)}; pass an image classifier"
        )
    return logits.float()


def model_batches(images: Images, preprocess: Preprocess | None = None, batch_size: int = 32) -> list[torch.Tensor]:
    """The model inputs for ``images``, batched (made once, fed to the model and its reference)."""
    if len(images) == 0:
        raise DataError("classify: no images given; pass at least one")
    if batch_size < 1:
        raise DataError(f"classify: batch_size={batch_size}; use 1 or more")
    return list(image_batches(images, preprocess, batch_size))


@torch.inference_mode()
def predict_logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """Logits [N, classes] (float32, CPU) of ``model`` over ``batches``."""
    device = model_device(model)
    return torch.cat([_logits(model, b.to(device)).cpu() for b in batches])


def classify(
    model: nn.Module,
    images: Images,
    labels: torch.Tensor | None = None,
    reference: nn.Module | None = None,
    preprocess: Preprocess | None = None,
    batch_size: int = 32,
) -> dict:
    """Top-1 ``accuracy`` against ``labels`` and, with a ``reference`` model, ``top1_agreement``
    (same top class) and ``top5_overlap`` (shared share of the two top-5 sets). Without either,
    the top-1 ``predictions`` are returned."""
    start = time.perf_counter()
    with torch.inference_mode():
        batches = model_batches(images, preprocess, batch_size)
    logits = predict_logits(model, batches)
    top1 = logits.argmax(dim=1)
    result: dict = {"images": len(images)}
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != top1.shape:
            raise DataError(f"classify: {labels.numel()} labels for {len(images)} images; give one label per image")
        result["accuracy"] = float((top1 == labels).double().mean())
    if reference is not None:
        ref_logits = predict_logits(reference, batches)
        if ref_logits.shape != logits.shape:
            raise ModelError(
                f"classify: model gives {tuple(logits.shape)} logits, reference {tuple(ref_logits.shape)}; "
                "compare models with the same classes"
            )
        k = min(5, logits.shape[1])
        ours, theirs = logits.topk(k).indices, ref_logits.topk(k).indices
        overlap = (ours.unsqueeze(2) == theirs.unsqueeze(1)).any(dim=2).sum(dim=1).double() / k
        result["top1_agreement"] = float((top1 == ref_logits.argmax(dim=1)).double().mean())
        result["top5_overlap"] = float(overlap.mean())
        if labels is not None:
            result["reference_accuracy"] = float((ref_logits.argmax(dim=1) == labels).double().mean())
    if labels is None and reference is None:
        result["predictions"] = top1.tolist()
    result["seconds"] = time.perf_counter() - start
    return result
