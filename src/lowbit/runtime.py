"""Running quantized models fast: ``compile`` wraps a model in ``torch.compile`` the way lowbit's
kernels need it (their weight layouts built before tracing, graphs that keep the native ops as
single calls, dynamic shapes so a new sequence length does not recompile), and for causal LMs
``generate`` decoding with a static KV cache and a compiled one-token step.

Compilation is optional: every kernel also runs eagerly. It pays off for small batches, where
Python and the float ops between the integer matmuls (layer norms, GELU, attention softmax)
dominate, and Inductor fuses them.
"""

from __future__ import annotations

import copyreg
import weakref
from collections.abc import Callable

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
    frozen: bool = True,
) -> nn.Module:
    """``torch.compile`` for a lowbit-quantized (or float) model; ``example`` (keyword inputs or a
    tensor) is run eagerly first so the kernels' weight layouts exist before tracing.

    ``dynamic=None`` lets torch decide after the first shape change (no recompile per length).
    A causal LM's ``generate`` (on the returned module or on ``model`` itself) is switched to a
    static KV cache and a compiled decode step (``compile_decoding``).

    ``frozen`` (default): the compiled graphs check the model's identity and their inputs, not the
    attributes of every submodule (thousands of guards, evaluated on every call); changes made to
    the model afterwards (its modules, parameters, dtype, hooks, train/eval mode) are then not
    seen: compile again after changing it. ``frozen=False`` keeps all of torch's guards.
    Raises UnsupportedError where torch.compile is unavailable (e.g. Python builds without it)."""
    if not hasattr(torch, "compile"):
        raise UnsupportedError("torch.compile is not available in this torch build; run the model eagerly")
    prepare_kernels(model, example)
    share_equal_input_params(model)
    model.eval()
    _raise_recompile_limits()
    compile_decoding(model, frozen=frozen)
    return torch.compile(model, dynamic=dynamic, mode=mode, options=compile_options(model if frozen else None))


# Per-input parameters of quantized layers that layers reading the same activations may share.
_INPUT_PARAMS = ("input_smooth", "input_scale", "input_zero_point")


def share_equal_input_params(model: nn.Module) -> int:
    """Give quantized layers whose input parameters (SmoothQuant divisor, static scale and zero
    point) are equal one tensor object each, so a compiled graph sees one input and can quantize
    activations that several layers read once (``kernels.shared_input``); checkpoints store a
    copy per layer. Values do not change. Returns how many tensors were replaced."""
    canonical: dict[tuple, torch.Tensor] = {}
    replaced = 0
    for module in model.modules():
        if not isinstance(module, QModule):
            continue
        for attr in _INPUT_PARAMS:
            tensor = getattr(module, attr, None)
            if tensor is None or tensor.device.type != "cpu" or tensor.numel() > 1 << 16:
                continue
            raw = tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            key = (attr, tensor.dtype, tuple(tensor.shape), raw)
            first = canonical.setdefault(key, tensor)
            if first is not tensor:
                setattr(module, attr, first)
                replaced += 1
    return replaced


def _raise_recompile_limits() -> None:
    """Every compiled model instance adds cache entries on the same (transformers) code objects;
    torch's default limit of 8 silently falls back to eager after a few models or shapes."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)


def compile_decoding(model: nn.Module, frozen: bool = False) -> bool:
    """Make ``model.generate`` decode with a static KV cache and a compiled one-token step.

    This is transformers' own auto-compile, which it enables on GPUs only; on CPU the eager
    decode step of a small LM is mostly Python and small float ops around the matmuls, which
    Inductor fuses. The prompt (prefill) still runs eagerly. ``frozen``: as in ``compile``.
    Returns False, changing nothing, for a model without ``generate`` or one that transformers
    does not mark compilable."""
    config = getattr(model, "generation_config", None)
    if config is None or not hasattr(model, "generate") or not getattr(model, "_can_compile_fullgraph", False):
        return False
    from transformers import CompileConfig

    compile_config = CompileConfig(dynamic=None, mode=None, options=compile_options(model if frozen else None) or None)
    compile_config._compile_all_devices = True  # transformers' switch for auto-compile off GPUs
    config.cache_implementation = "static"
    config.compile_config = compile_config
    _raise_recompile_limits()
    return True


def compile_options(frozen: nn.Module | None = None) -> dict:
    """Inductor options for inference: on CPU the C++ wrapper (less Python per call) and one native
    call for W8A8 layers that share their input (``kernels.shared_input``); with a ``frozen``
    model, a guard filter that skips the guards on that model's internals."""
    options = {}
    if not torch.cuda.is_available():
        from .kernels.shared_input import SharedInputLinears

        options = {"cpp_wrapper": True, "post_grad_custom_post_pass": SharedInputLinears()}
    if frozen is not None:
        options["guard_filter_fn"] = freeze_guards(frozen)
    return options


def freeze_guards(model: nn.Module) -> Callable[[list], list[bool]]:
    """A ``guard_filter_fn`` that drops torch.compile's guards on the attributes beneath ``model``
    and keeps the rest (inputs, globals, the model's own type check).

    A SmolLM2-135M decode step carries 14 440 guards, 11 438 of them on the model's internals, all
    checked on every call (w4-g128 decode 87 -> 104 tokens/s with them dropped). The kept check on
    the model's type then identifies the model: ``model`` gets a class of its own (same name,
    module and behaviour; it pickles and copies as the original class), so another model of the
    same class never runs this model's graphs."""
    _own_class(model)
    ref = weakref.ref(model)

    def keep(entries: list) -> list[bool]:
        target = ref()
        roots = tuple(
            f"{e.name}{sep}"
            for e in entries
            if target is not None and e.has_value and e.value is target and not e.is_global
            for sep in (".", "[")
        )
        return [e.is_global or not roots or not _unwrapped(e.name).startswith(roots) for e in entries]

    return keep


_SOURCE_WRAPPERS = ("getattr(", "dict(", "type(", "list(", "len(")


def _unwrapped(name: str) -> str:
    """A guard's source without leading calls: ``getattr(self.layer, 'packed')`` -> ``self.layer, ...``,
    so attributes that torch.compile reads through getattr/type/dict count as beneath the model."""
    while name.startswith(_SOURCE_WRAPPERS):
        name = name[name.index("(") + 1 :]
    return name


def _own_class(model: nn.Module) -> None:
    """Give ``model`` a subclass of its class that no other object has (idempotent)."""
    base = type(model)
    if base.__dict__.get("_lowbit_base") is not None:
        return
    namespace = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__doc__": base.__doc__,
        "_lowbit_base": base,
        "__reduce_ex__": _reduce_as_base,
    }
    model.__class__ = type(base.__name__, (base,), namespace)


def _reduce_as_base(self: nn.Module, protocol: int):
    """Pickle and deepcopy an own-class model as an instance of the original class."""
    own = type(self)
    reduced = super(own, self).__reduce_ex__(max(protocol, 2))
    if not (isinstance(reduced, tuple) and reduced[0] is copyreg.__newobj__ and reduced[1] == (own,)):
        return reduced
    # __newobj__ must name the object's own class; the older reconstructor takes any class
    return (copyreg._reconstructor, (own._lowbit_base, object, None), *reduced[2:])


def quantized_layers(model: nn.Module) -> int:
    """Number of lowbit quantized layers in ``model`` (0 for a float model)."""
    return sum(isinstance(m, QModule) for m in model.modules())
