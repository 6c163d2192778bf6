"""lowbit: quantize PyTorch models, run them on integer kernels, and measure what it costs.

Public API: ``load_model``, ``quantize``, ``save``, ``load``, ``evaluate``, ``Recipe``, and the
number formats in ``lowbit.formats``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import formats
from .errors import LowbitError
from .export.checkpoint import load, save
from .models import Loaded, load_model
from .quantize import quantize
from .recipe import LayerScheme, Recipe


def evaluate(target, task: str, data=None, **options) -> dict:
    """Evaluate a model (``Loaded`` or ``nn.Module``) on ``task``; see ``lowbit.evaluate``."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(target, task, data, **options)


__all__ = [
    "LayerScheme",
    "Loaded",
    "LowbitError",
    "Recipe",
    "evaluate",
    "formats",
    "load",
    "load_model",
    "quantize",
    "save",
]
