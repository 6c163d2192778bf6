"""A torch.compile graph pass: W8A8 layers that read the same activations (attention's q, k and v;
an MLP's gate and up projections) become one ``lowbit.w8a8_linear_triple`` or ``_pair`` call, which
quantizes those activations once per distinct quantization (SmoothQuant divisor, static scale and
zero point) and runs all the weights in one thread team: one call, one fork and join instead of
several (outputs bit-equal to the separate calls). Found from the graph, so no model needs driver
code. Groups have a fixed size because torch.compile's C++ wrapper calls ops with a fixed number of
outputs through the dispatcher, but an op returning a list through Python, which costs more than
the grouping saves.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .cpu_int8 import _load_native

# w8a8_linear's positional arguments (see csrc/int8.cpp).
_X, _PACKED, _SUMS, _SCALE, _BIAS, _SMOOTH, _X_SCALE, _X_ZERO, _ONEDNN, _ONEDNN_MIN, _AMX_MIN = range(11)


class SharedInputLinears(CustomGraphPass):
    """Inductor post-grad pass (``post_grad_custom_post_pass``) that applies ``group_shared_inputs``.

    Stateless, so every instance is equal and a copy is the instance itself: transformers deep-copies
    the generation config (and the compile options in it) on every ``generate`` call and compiles
    the decode step again when the copy differs."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        group_shared_inputs(graph)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __deepcopy__(self, memo: dict) -> SharedInputLinears:
        return self

    def uuid(self) -> str:
        return get_hash_for_files((__file__,)).hex()


def group_shared_inputs(graph: torch.fx.Graph) -> int:
    """Replace each set of >= 2 native W8A8 calls with the same input (all with or all without
    bias, SmoothQuant divisor, static scale and zero point) by grouped calls; returns the number of
    calls replaced. Calls that use oneDNN's weight (many rows without AMX) stay."""
    if not _load_native():
        return 0
    linear = torch.ops.lowbit.w8a8_linear.default
    order = {node: i for i, node in enumerate(graph.nodes)}
    sets: dict[tuple, list[torch.fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is linear and len(node.args) == 11 and not node.kwargs:
            args = node.args
            if args[_ONEDNN] is None:
                absent = tuple(args[i] is None for i in (_BIAS, _SMOOTH, _X_SCALE, _X_ZERO))
                key = (args[_X], args[_AMX_MIN], absent)
                sets[key].append(node)
    replaced = 0
    for nodes in sets.values():
        first = nodes[0]
        members = [n for n in nodes if all(_defined_before(a, first, order) for a in _weight_args(n))]
        for chunk in _chunks(members):
            _replace(graph, chunk)
            replaced += len(chunk)
    if replaced:
        graph.lint()
    return replaced


def _chunks(members: list[torch.fx.Node]) -> list[list[torch.fx.Node]]:
    """Groups of three, and two where three do not divide (4 -> 2 + 2, 5 -> 3 + 2); a single call stays."""
    chunks, rest = [], list(members)
    while len(rest) >= 2:
        take = 2 if len(rest) in (2, 4) else 3
        chunks.append(rest[:take])
        rest = rest[take:]
    return chunks


def _weight_args(node: torch.fx.Node) -> list:
    return [node.args[i] for i in (_PACKED, _SUMS, _SCALE, _BIAS, _SMOOTH, _X_SCALE, _X_ZERO)]


def _defined_before(arg, first: torch.fx.Node, order: dict) -> bool:
    """Whether ``arg`` (a node or a constant) is available where ``first`` runs."""
    return not isinstance(arg, torch.fx.Node) or arg is first or order[arg] < order[first]


def _replace(graph: torch.fx.Graph, members: list[torch.fx.Node]) -> None:
    first = members[0]
    args = first.args
    biases, smooths, x_scales, x_zeros = (
        [] if args[i] is None else [n.args[i] for n in members] for i in (_BIAS, _SMOOTH, _X_SCALE, _X_ZERO)
    )
    with graph.inserting_before(first):
        group = graph.call_function(
            (torch.ops.lowbit.w8a8_linear_pair if len(members) == 2 else torch.ops.lowbit.w8a8_linear_triple).default,
            (
                args[_X],
                [n.args[_PACKED] for n in members],
                [n.args[_SUMS] for n in members],
                [n.args[_SCALE] for n in members],
                biases,
                smooths,
                x_scales,
                x_zeros,
                args[_AMX_MIN],
            ),
        )
        group.meta["val"] = tuple(n.meta.get("val") for n in members)
        for i, node in enumerate(members):
            item = graph.call_function(operator.getitem, (group, i))
            item.meta.update(node.meta)
            node.replace_all_uses_with(item)
    for node in members:
        graph.erase_node(node)
