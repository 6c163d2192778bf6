"""Running quantized models fast: ``compile`` wraps a model in ``torch.compile`` the way lowbit's
kernels need it (their weight layouts built before tracing, graphs that keep the native ops as
single calls, dynamic shapes so a new sequence length does not recompile), and for causal LMs
``generate`` decoding with a static KV cache and a compiled one-token step.

Compilation is optional: every kernel also runs eagerly. It pays off for small batches, where
Python and the float ops between the integer matmuls (layer norms, GELU, attention softmax)
dominate, and Inductor fuses them.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UnsupportedError
from .nn import QModule


def prepare_kernels(model: nn.Module, example: dict | torch.Tensor | None = None) -> None:
    """Build every quantized layer's kernel layout now (otherwise the first call does it), by one
    eager forward pass on ``example`` when given."""
    if example is None:
        return
    with torch.inference_mode():
        if isinstance(example, dict):
            model(**example)
        else:
            model(example)


def compile(
    model: nn.Module,
    example: dict | torch.Tensor | None = None,
    *,
    dynamic: bool | None = None,
    mode: str | None = None,
) -> nn.Module:
    """``torch.compile`` for a lowbit-quantized (or float) model; ``example`` (keyword inputs or a
    tensor) is run eagerly first so the kernels' weight layouts exist before tracing.

    ``dynamic=None`` lets torch decide after the first shape change (no recompile per length).
    A causal LM's ``generate`` (on the returned module or on ``model`` itself) is switched to a
    static KV cache and a compiled decode step (``compile_decoding``).
    Raises UnsupportedError where torch.compile is unavailable (e.g. Python builds without it)."""
    if not hasattr(torch, "compile"):
        raise UnsupportedError("torch.compile is not available in this torch build; run the model eagerly")
    prepare_kernels(model, example)
    model.eval()
    _raise_recompile_limits()
    compile_decoding(model)
    return torch.compile(model, dynamic=dynamic, mode=mode, options=compile_options())


def _raise_recompile_limits() -> None:
    """Every compiled model instance adds cache entries on the same (transformers) code objects;
    torch's default limit of 8 silently falls back to eager after a few models or shapes."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)


def compile_decoding(model: nn.Module) -> bool:
    """Make ``model.generate`` decode with a static KV cache and a compiled one-token step.

    This is transformers' own auto-compile, which it enables on GPUs only; on CPU the eager
    decode step of a small LM is mostly Python and small float ops around the matmuls, which
    Inductor fuses. The prompt (prefill) still runs eagerly. Returns False, changing nothing,
    for a model without ``generate`` or one that transformers does not mark compilable."""
    config = getattr(model, "generation_config", None)
    if config is None or not hasattr(model, "generate") or not getattr(model, "_can_compile_fullgraph", False):
        return False
    from transformers import CompileConfig

    compile_config = CompileConfig(dynamic=None, mode=None, options=compile_options() or None)
    compile_config._compile_all_devices = True  # transformers' switch for auto-compile off GPUs
    config.cache_implementation = "static"
    config.compile_config = compile_config
    _raise_recompile_limits()
    return True


def compile_options() -> dict:
    """Inductor options for inference on CPU: the C++ wrapper (less Python per call).

    Module-attribute guards are kept: dropping them (``skip_guard_on_all_nn_modules_unsafe``)
    saves about 0.7 ms per MiniLM call but lets a second model of the same class reuse the first
    one's graph, which gives wrong results."""
    return {} if torch.cuda.is_available() else {"cpp_wrapper": True}


def quantized_layers(model: nn.Module) -> int:
    """Number of lowbit quantized layers in ``model`` (0 for a float model)."""
    return sum(isinstance(m, QModule) for m in model.modules())
