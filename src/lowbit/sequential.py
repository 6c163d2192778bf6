"""Block-by-block quantization (the GPTQ flow) for models built from repeated blocks.

The blocks are found from the module tree (the longest ModuleList of same-class modules), so
no per-model driver is needed. The inputs of block 0 are recorded once; then for each block:
collect its layers' statistics from its inputs, quantize its layers, and run the quantized
block to make the next block's inputs. Inside a block, layers that read the same tensor form a
stage, quantized before the next stage's statistics are taken ("true sequential"). Only one
stage's statistics exist at a time.

Layers that ask for "cross" statistics (GPTQ's asymmetric target) also get the inputs the float
model would give them: a float copy of each block runs beside the quantized one on the float
hidden states, which are carried through the blocks next to the quantized ones.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .calibration import LayerStats, _Collector, finish_statistics, forward_batch
from .errors import CheckpointError
from .reduction import owned

Call = tuple[tuple, dict]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(qualified name, ModuleList) of the model's repeated blocks, or None: the longest list of
    two or more containers of one type that no other such list holds. A list of bare layers
    (parallel heads, branches) is no block list, and lists inside blocks (a mixture of experts'
    experts, which can outnumber the blocks) are skipped."""
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) >= 2
        and len({type(c) for c in module}) == 1
        and all(next(c.children(), None) is not None for c in module)
    ]
    outer = [(n, m) for n, m in lists if not any(n.startswith(f"{o}.") for o, _ in lists if o and o != n)]
    return max(outer, key=lambda item: len(item[1]), default=None)


def _detach(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


class _Captured(Exception):
    """Raised by _Recorder once block 0's inputs are recorded: the rest of the forward is not needed."""


class _Recorder(nn.Module):
    """Stands in for the block list during capture: records block 0's inputs, then ends the
    forward (the model's head alone can cost more than a block: SmolLM2's is six blocks' worth)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.calls: list[Call] = []

    def forward(self, *args, **kwargs):
        self.calls.append((_detach(args), _detach(kwargs)))
        raise _Captured


@contextlib.contextmanager
def _no_cache(model: nn.Module) -> Iterator[None]:
    """Calibration runs never use a KV cache (blocks run many times on the same inputs)."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if old is not None:
            config.use_cache = old


def capture_inputs(model: nn.Module, blocks_name: str, batches: list[Any]) -> list[Call]:
    """The (args, kwargs) block 0 receives for every calibration batch."""
    parent_name, _, attr = blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, attr)
    recorder = _Recorder(original[0])
    setattr(parent, attr, nn.ModuleList([recorder]))
    try:
        with _no_cache(model), torch.inference_mode():
            for batch in batches:
                with contextlib.suppress(_Captured):
                    forward_batch(model, batch)
    finally:
        setattr(parent, attr, original)
    return recorder.calls


def _hidden(call: Call) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: Call, hidden: torch.Tensor) -> Call:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def run_block(block: nn.Module, call: Call) -> torch.Tensor:
    """The block's output hidden states for one recorded call."""
    args, kwargs = call
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: LayerNorm, GroupNorm or any class named *RMSNorm / *LayerNorm."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


class _StageDone(Exception):
    """Ends a block's forward once the stage being calibrated has seen its inputs."""


def block_statistics(
    block: nn.Module,
    prefix: str,
    needs: dict[str, set[str]],
    plan: dict,
    calls: dict[int, Call],
    count: int,
    probe: Call,
    seed: int = 0,
    stop_early: bool = False,
    reference: tuple[nn.Module, dict[int, Call]] | None = None,
) -> tuple[dict[str, LayerStats], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Statistics of the block's layers from its recorded inputs (``calls``: this process's
    share, by batch index, of ``count`` batches; gathered across processes under torchrun);
    plus, from one call, each layer's input tensor and each norm module's output tensor (kept
    alive, so layers reading the very same tensor, and the norm that produced it, can be
    recognised). A process without batches of its own runs ``probe`` for the latter.

    ``stop_early`` (for layers that run once per forward) ends each forward as soon as every
    layer of the stage has seen its input: the rest of the block does not change the statistics,
    and skipping it makes the early stages of a block nearly free.

    ``reference`` (the float block and the float model's calls by batch index) gives layers
    asking for "cross" statistics the float inputs of each batch, in call order."""
    collectors: dict[str, _Collector] = {}
    inputs: dict[str, torch.Tensor] = {}
    norm_outputs: dict[str, torch.Tensor] = {}
    handles = []
    shared: dict = {}  # Hessian products by input tensor, for layers that read the same one
    for name, kinds in needs.items():
        if not kinds:
            continue
        module = block.get_submodule(name[len(prefix) :])
        collector = _Collector(module, kinds, plan[name].activation, 1024, seed, shared)
        collectors[name] = collector

        def first_input(module, args, name=name):
            inputs.setdefault(name, args[0])

        handles += [module.register_forward_pre_hook(collector), module.register_forward_pre_hook(first_input)]
    for sub_name, module in block.named_modules():
        if is_norm(module):

            def first_output(module, args, output, name=prefix + sub_name):
                norm_outputs.setdefault(name, output)

            handles.append(module.register_forward_hook(first_output))
    pending: set[str] = set()
    if stop_early:
        for name in collectors:

            def done(module, args, name=name):
                pending.discard(name)
                if not pending:
                    raise _StageDone

            handles.append(block.get_submodule(name[len(prefix) :]).register_forward_pre_hook(done))

    def forward(call: Call) -> None:
        pending.update(collectors)
        with contextlib.suppress(_StageDone):
            run_block(block, call)

    crossed = [name for name, c in collectors.items() if "cross" in c.kinds]
    try:
        with torch.inference_mode():
            for index, call in calls.items():
                if reference is not None and crossed:
                    float_inputs = _layer_inputs(reference[0], prefix, crossed, reference[1][index], stop_early)
                    for name in crossed:
                        collectors[name].reference = float_inputs[name]
                for collector in collectors.values():
                    collector.begin(index)
                forward(call)
                for collector in collectors.values():
                    collector.end()
            if not calls:
                forward(probe)  # structure only: no collector is inside a batch
    finally:
        for handle in handles:
            handle.remove()
    return finish_statistics(collectors, count), inputs, norm_outputs


def _layer_inputs(
    block: nn.Module, prefix: str, names: list[str], call: Call, stop_early: bool = False
) -> dict[str, list[torch.Tensor]]:
    """The inputs of the named layers of ``block`` on one call, per layer in call order
    (``stop_early``: layers run once per forward, so the forward ends once all have run)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = []
    for name in names:

        def record(module, args, name=name):
            seen[name].append(args[0].detach())
            if stop_early and all(seen.values()):
                raise _StageDone

        handles.append(block.get_submodule(name[len(prefix) :]).register_forward_pre_hook(record))
    try:
        with contextlib.suppress(_StageDone):
            run_block(block, call)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def fold_into_norm(block: nn.Module, prefix: str, norm_name: str, layers: list[str], call: Call) -> bool:
    """Move the layers' shared ``input_smooth`` into the norm that produces their input, if the
    block's output is unchanged by it (checked on one call; a residual reading the same norm
    output would change it, so post-norm blocks keep the divisor in the layers)."""
    norm = block.get_submodule(norm_name[len(prefix) :])
    mods = [block.get_submodule(n[len(prefix) :]) for n in layers]
    smooth = mods[0].input_smooth
    if getattr(norm, "weight", None) is None or any(m.input_smooth is None for m in mods):
        return False
    if any(not torch.equal(m.input_smooth, smooth) for m in mods) or norm.weight.shape != smooth.shape:
        return False
    with torch.inference_mode():
        before = run_block(block, call)
    saved_w = norm.weight.data.clone()
    saved_b = None if getattr(norm, "bias", None) is None else norm.bias.data.clone()
    norm.weight.data = norm.weight.data / smooth.to(norm.weight.dtype)
    if saved_b is not None:
        norm.bias.data = norm.bias.data / smooth.to(norm.bias.dtype)
    for m in mods:
        m.input_smooth = None
    with torch.inference_mode():
        after = run_block(block, call)
    if torch.allclose(after, before, rtol=1e-3, atol=1e-4 * float(before.abs().max())):
        return True
    norm.weight.data = saved_w
    if saved_b is not None:
        norm.bias.data = saved_b
    for m in mods:
        m.input_smooth = smooth
    return False


def block_stages(
    block: nn.Module, prefix: str, names: list[str], call: Call, counts: dict[str, int] | None = None
) -> list[list[str]]:
    """The block's layers grouped by the input tensor they read, in execution order (e.g. q/k/v,
    then o, then gate/up, then down): each stage is quantized before the next one's statistics
    are taken, so later layers calibrate on the inputs the quantized layers really produce.
    ``counts``, if given, receives how often each layer ran in one forward of the block."""
    seen: dict[int, list[str]] = {}
    keep: list[torch.Tensor] = []  # keeps inputs alive so their ids stay unique
    handles = []
    for name in names:

        def record(module, args, name=name):
            keep.append(args[0])
            seen.setdefault(id(args[0]), []).append(name)
            if counts is not None:
                counts[name] = counts.get(name, 0) + 1

        handles.append(block.get_submodule(name[len(prefix) :]).register_forward_pre_hook(record))
    try:
        with torch.inference_mode():
            run_block(block, call)
    finally:
        for handle in handles:
            handle.remove()
    stages, placed = [], set()
    for members in seen.values():
        fresh = [m for m in dict.fromkeys(members) if m not in placed]
        placed.update(fresh)
        if fresh:
            stages.append(fresh)
    return stages


def run_sequential(
    model: nn.Module,
    blocks: tuple[str, nn.ModuleList],
    plan: dict,
    needs: dict[str, set[str]],
    batches: list[Any],
    quantize_block: Callable[..., None],
    progress: Callable[[str, int, int], None] | None = None,
    journal: Any = None,
) -> None:
    """Quantize the layers inside ``blocks`` one block at a time, and inside a block one stage
    (layers sharing an input) at a time; ``quantize_block(block, prefix, names, stats, inputs,
    norm_outputs, probe)`` swaps the named layers (``probe`` is batch 0's call, for checks that
    must decide the same way in every process). With a ``journal`` (lowbit.journal.BlockJournal,
    its saved blocks already restored) the run starts after the saved blocks and saves each block
    it finishes.

    Under torchrun each process carries only its share of the batches through the blocks (plus
    batch 0 as the probe); statistics are gathered in batch order, every process quantizes the
    same way, and the result equals one process's to the bit."""
    blocks_name, module_list = blocks
    mine = owned(len(batches))
    if journal is not None and len(mine) != len(batches):
        raise CheckpointError("a block journal needs every calibration batch in one process; run without torchrun")
    extra = [] if 0 in mine else [0]
    captured = capture_inputs(model, blocks_name, [batches[i] for i in mine + extra])
    calls = dict(zip(mine, captured[: len(mine)], strict=True))
    separate_probe = captured[-1] if extra else None
    crossing = any("cross" in kinds for kinds in needs.values())
    float_calls = dict(calls) if crossing else None  # the float model's block inputs, carried alongside
    start = 0
    if journal is not None and journal.done:
        saved = journal.saved_hidden
        if len(saved) != len(calls):
            raise CheckpointError(
                f"{journal.directory}: the journal holds {len(saved)} calibration batches, the run has "
                f"{len(calls)}; run without --resume to start over"
            )
        if crossing:
            raise CheckpointError(
                f"{journal.directory}: a run whose layers compare against the float model's inputs "
                "(gptq or awq with asymmetric: true) cannot resume; run without --resume to start over"
            )
        start = journal.done
        calls = {i: _with_hidden(call, h) for (i, call), h in zip(calls.items(), saved, strict=True)}
    for index, block in enumerate(module_list):
        if index < start:
            continue
        probe = separate_probe if separate_probe is not None else calls[0]
        prefix = f"{blocks_name}.{index}."
        if progress is not None:
            progress(f"block {index + 1}/{len(module_list)}", index, len(module_list))
        block_needs = {name: kinds for name, kinds in needs.items() if name.startswith(prefix)}
        float_block = copy.deepcopy(block) if float_calls is not None else None
        reference = None if float_block is None else (float_block, float_calls)
        if block_needs:
            layers = [name for name in plan if name.startswith(prefix)]
            counts: dict[str, int] = {}
            stages = block_stages(block, prefix, layers, probe, counts)
            once = all(n == 1 for n in counts.values())  # no layer runs twice per forward
            staged = {name for stage in stages for name in stage}
            unseen = [name for name in layers if name not in staged]  # never called: no statistics
            for number, stage in enumerate(stages):
                stage_needs = {name: block_needs[name] for name in stage if name in block_needs}
                stats, inputs, norm_outputs = {}, {}, {}
                if any(stage_needs.values()):
                    stats, inputs, norm_outputs = block_statistics(
                        block,
                        prefix,
                        stage_needs,
                        plan,
                        calls,
                        len(batches),
                        probe,
                        stop_early=once,
                        reference=reference,
                    )
                names = stage + unseen if number == len(stages) - 1 else stage
                quantize_block(block, prefix, names, stats, inputs, norm_outputs, probe)
        with torch.inference_mode():
            calls = {i: _with_hidden(call, run_block(block, call)) for i, call in calls.items()}
            if separate_probe is not None:
                separate_probe = _with_hidden(separate_probe, run_block(block, separate_probe))
            if float_block is not None:
                float_calls = {i: _with_hidden(call, run_block(float_block, call)) for i, call in float_calls.items()}
        if journal is not None:
            journal.save(index, block, prefix, [_hidden(call) for call in calls.values()])
