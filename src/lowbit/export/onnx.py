"""`lowbit export --format onnx`: a lowbit checkpoint as one ONNX file that ONNX Runtime runs.

Integer weights keep lowbit's exact codes and scales: int8 per-channel weights as
DequantizeLinear (QDQ; MatMulInteger when activations are dynamic int8), int2/3/4 (and int8)
group-wise weights as ONNX Runtime's com.microsoft MatMulNBits; static activations as
QuantizeLinear/DequantizeLinear with the calibrated scale and zero point, dynamic per-token
activations as the same min-max arithmetic in plain ops. Formats without an ONNX grid (NF4, log2,
codebooks, fp8, ...) are written as float weights and listed with the reason. The file is traced
with the TorchScript exporter (``torch.onnx.export(dynamo=False)``), checked with ``onnx.checker``
and, where onnxruntime is installed, run once against lowbit's own output.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, SpecError, UnsupportedError
from ..io import atomic_path
from ..models import Loaded
from ..nn import QModule, set_submodule
from .checkpoint import MANIFEST
from .checkpoint import load as load_checkpoint
from .onnx_layers import LayerNote, exportable

OPSET = 17
OPTIONS = {"module", "example", "dynamic", "check"}
DYNAMIC = ("token", "ort")


class _TextModel(nn.Module):
    """input_ids, attention_mask -> last_hidden_state (encoder) or logits (causal LM, no KV cache)."""

    def __init__(self, model: nn.Module, kind: str, hidden_states: bool = False) -> None:
        super().__init__()
        self.model, self.kind = model, kind
        self.hidden_states = hidden_states  # an encoder with a head: its last hidden_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "causal-lm":
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        if self.hidden_states:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            return out.hidden_states[-1]
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _PlainModel(nn.Module):
    """Any module whose output is a tensor (or has ``.logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(*inputs)
        return out.logits if hasattr(out, "logits") else out


def _graph_io(loaded: Loaded, example: Any) -> tuple[nn.Module, tuple, list[str], list[str], dict]:
    """(wrapper, example inputs, input names, output names, dynamic axes) for the model's kind."""
    model = loaded.model
    if example is None and loaded.kind in ("encoder", "causal-lm") and hasattr(model, "config"):
        vocab = int(getattr(model.config, "vocab_size", 100))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 16), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 11:] = 0  # a padded row, so that the mask path is traced
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        out = "logits" if loaded.kind == "causal-lm" else "last_hidden_state"
        axes[out] = {0: "batch", 1: "sequence"}
        headed = False
        if loaded.kind == "encoder":
            with torch.no_grad():
                probe = model(input_ids=ids[:1, :4], attention_mask=mask[:1, :4])
            headed = getattr(probe, "last_hidden_state", None) is None and hasattr(probe, "hidden_states")
        wrapper = _TextModel(model, loaded.kind, headed)
        return wrapper, (ids, mask), ["input_ids", "attention_mask"], [out], axes
    if example is None and loaded.meta.get("builtin") == "efficientnet-lite0":
        example = torch.zeros(1, 3, 224, 224)
    config = getattr(model, "config", None)
    if example is None and loaded.kind == "image-classifier" and isinstance(getattr(config, "image_size", None), int):
        gen = torch.Generator().manual_seed(0)  # HF image classifiers: the size and channels config.json gives
        size, channels = config.image_size, int(getattr(config, "num_channels", 3))
        example = torch.randn(1, channels, size, size, generator=gen)
    if example is None:
        raise SpecError(
            f"{loaded.source}: a {loaded.kind} model of type {type(model).__name__} needs an example input; "
            "from Python pass example=<tensor or tuple of tensors> to lowbit.export.onnx.export"
        )
    inputs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        raise SpecError("example must be a tensor or a tuple of tensors")
    names = (
        ["pixel_values"] if len(inputs) == 1 and inputs[0].dim() == 4 else [f"input_{i}" for i in range(len(inputs))]
    )
    axes = {name: {0: "batch"} for name in [*names, "logits"]}
    return _PlainModel(model), inputs, names, ["logits"], axes


def _swap_layers(model: nn.Module, dynamic: str) -> list[LayerNote]:
    notes = []
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, QModule)]:
        new, note = exportable(module, name, dynamic)
        set_submodule(model, name, new)
        notes.append(note)
    if not notes:
        raise UnsupportedError(
            "the checkpoint holds no quantized layer; export the float model with torch.onnx instead"
        )
    return notes


def _trace(
    wrapper: nn.Module, inputs: tuple, names: list[str], outputs: list[str], axes: dict, path: Path, contrib: bool
) -> None:
    wrapper.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                inputs,
                str(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=names,
                output_names=outputs,
                dynamic_axes=axes,
                custom_opsets={"com.microsoft": 1} if contrib else None,
                do_constant_folding=True,
            )
    except (RuntimeError, TypeError, ValueError, AttributeError, torch.onnx.errors.OnnxExporterError) as exc:
        raise UnsupportedError(
            f"torch.onnx.export could not trace {type(wrapper.model).__name__} ({str(exc)[:300]}); this "
            "architecture is not exportable to ONNX by lowbit"
        ) from exc
    wrapper.eval()  # the exporter restores the wrapper's mode; keep it in eval


def session(path: str | Path, exact: bool = True, threads: int = 0):
    """An onnxruntime CPU session for an exported file. ``exact`` keeps float activations in
    weight-only layers: by default ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits
    with int8-quantized activations (``session.qdq_matmulnbits_accuracy_level`` 4)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if exact:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check(path: Path, names: list[str], inputs: tuple, reference: torch.Tensor) -> dict[str, Any]:
    """onnx.checker, then (if installed) one onnxruntime run against lowbit's own output."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise UnsupportedError(f"the exported graph is invalid ({str(exc)[:300]}); please report it") from exc
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}
    got = session(path).run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
    diff = (torch.from_numpy(got) - reference).abs().max().item()
    return {"max_abs_diff": diff, "reference_max_abs": reference.abs().max().item()}


def _summary(notes: list[LayerNote]) -> dict[str, Any]:
    dequantized = [{"layer": n.name, "why": n.why} for n in notes if n.weight == "float"]
    approximated = [f"{n.name}: {n.approximated}" for n in notes if n.approximated]
    if any(n.activation == "dynamic-ort" for n in notes):
        approximated.append(
            "dynamic activations use ONNX Runtime's DynamicQuantizeLinear (uint8, one scale per tensor) "
            "instead of lowbit's int8 per-token scales"
        )
    return {
        "layers": dict(Counter(n.weight for n in notes)),
        "activations": dict(Counter(n.activation for n in notes)),
        "dequantized": dequantized,
        "approximated": approximated,
    }


def export(source: Path, out: Path, **options: Any) -> dict[str, Any]:
    """Write the lowbit checkpoint ``source`` as the ONNX file ``out`` (atomically).

    Options: ``dynamic`` ("token": lowbit's exact per-token int8 scales, default; "ort": ONNX
    Runtime's fused per-tensor DynamicQuantizeLinear, faster, approximate) and ``check`` (default
    True; both also as CLI ``--option KEY=VALUE``); from Python only: ``module`` (the float skeleton
    of a custom nn.Module checkpoint) and ``example`` (input tensor(s) for models that are not
    Hugging Face text models)."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise SpecError(f"onnx export: unknown option(s) {unknown}; allowed: {sorted(OPTIONS)}")
    dynamic = options.get("dynamic", "token")
    if dynamic not in DYNAMIC:
        raise SpecError(f"onnx export: dynamic={dynamic!r}; choose one of {list(DYNAMIC)}")
    check = options.get("check", True)
    if isinstance(check, str):  # from the CLI: --option check=false
        if check.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise SpecError(f"onnx export: check={check!r}; write true or false")
        check = check.lower() in ("true", "1", "yes")
    module = options.get("module")
    if module is not None and not isinstance(module, nn.Module):
        raise SpecError("onnx export: module= takes an nn.Module instance (from Python, not the command line)")
    source, out = Path(source), Path(out)
    if not (source / MANIFEST).is_file():
        raise CheckpointError(
            f"{source}: not a lowbit checkpoint (no {MANIFEST}); make one with "
            "`lowbit quantize MODEL --recipe int8-dynamic --out DIR`"
        )
    loaded = load_checkpoint(source, module=module)
    wrapper, inputs, names, outputs, axes = _graph_io(loaded, options.get("example"))
    notes = _swap_layers(loaded.model, dynamic)
    with torch.no_grad():  # the swapped layers compute lowbit's reference arithmetic in eager mode
        reference = wrapper.eval()(*inputs).float()
    with atomic_path(out) as tmp:
        contrib = any(n.weight.startswith("matmulnbits") for n in notes)
        _trace(wrapper, inputs, names, outputs, axes, tmp, contrib)
        checked = _check(tmp, names, inputs, reference) if check else {}
        size = tmp.stat().st_size
    return {
        "opset": OPSET,
        "inputs": names,
        "outputs": outputs,
        **_summary(notes),
        **checked,
        "size_bytes": size,
    }
