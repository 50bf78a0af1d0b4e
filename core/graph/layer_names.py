"""Map ONNX nodes back to the user's layer names, and group them into module calls.

torch's exporter records the module path of every node in the node metadata
(``pkg.torch.onnx.name_scopes``: ``['', 'features', 'features.1', 'relu']``, the last
entry being the op). The layer is the innermost module path; functional ops called at
the root take their op name. Without metadata the ONNX node name is used.
:func:`module_calls` turns these names into one label per tensor and says which module
calls each tensor is an output of.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it


TORCH_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _torch_scopes(node: onnx.NodeProto) -> list[str] | None:
    for prop in node.metadata_props:
        if prop.key == TORCH_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return [str(scope) for scope in scopes] if isinstance(scopes, list) else None
    return None


def layer_name(node: onnx.NodeProto) -> str:
    """The user's name for the layer that produced *node* (see module docstring)."""
    scopes = _torch_scopes(node)
    if scopes and len(scopes) >= 2 and scopes[-2]:
        return scopes[-2]
    if scopes:
        return scopes[-1]
    return node.name or (node.output[0] if node.output else node.op_type)


def _recorded_stack(node: onnx.NodeProto, layer: str) -> tuple[str, ...] | None:
    """The modules whose calls compute *node* as torch recorded them, outermost first and ending with
    *layer* (``['', 'h.0', 'h.0.mlp', 'h.0.mlp.act', 'mul']`` → ``h.0``, ``h.0.mlp``, ``h.0.mlp.act``);
    None without such a record."""
    scopes = [scope for scope in (_torch_scopes(node) or [])[1:-1] if scope]
    return tuple(scopes) if scopes and scopes[-1] == layer else None


def module_stacks(nodes: Sequence[onnx.NodeProto], layers: Sequence[str]) -> list[tuple[tuple[str, ...], bool]]:
    """``(stack, recorded)`` for each of *nodes* (in graph order, with their *layers*): the modules whose
    calls compute it, outermost first and ending with its layer, and whether the graph says so.

    The stack is torch's record (:func:`_recorded_stack`), else the layer alone. In a graph with records,
    a node without one (the exporter's optimiser adds them: the ``Split`` of a fused projection, a mask
    computed once for every layer) is placed inside the modules common to the recorded nodes around it,
    those that produce its inputs and read its outputs; not recorded, it is a call of its own there
    (:class:`CallNode`)."""
    recorded = [_recorded_stack(node, layer) for node, layer in zip(nodes, layers)]
    if all(stack is None for stack in recorded):
        return [((layer,), True) for layer in layers]
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            readers.setdefault(name, []).append(index)
    stacks = []
    for node, layer, stack in zip(nodes, layers, recorded):
        if stack is not None:
            stacks.append((stack, True))
            continue
        around = [producer[name] for name in node.input if name in producer]
        around += [reader for name in node.output for reader in readers.get(name, ())]
        known = [recorded[index] for index in around]
        stacks.append(((*_common_prefix([stack for stack in known if stack is not None]), layer), False))
    return stacks


def _common_prefix(stacks: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The modules at the start of every one of *stacks* (none for no stacks)."""
    if not stacks:
        return ()
    common = stacks[0]
    for other in stacks[1:]:
        same = 0
        while same < min(len(common), len(other)) and common[same] == other[same]:
            same += 1
        common = common[:same]
    return common


@dataclass(frozen=True)
class CallNode:
    """A node as :func:`module_calls` reads it: the modules computing it (outermost first, its layer last),
    its outputs as ``(tensor, observable)`` and the tensors whose values it reads. A node not *recorded*
    in its modules (:func:`module_stacks`) neither opens nor ends their calls: it joins those in progress
    and makes a call of its own layer."""

    stack: tuple[str, ...]
    outputs: tuple[tuple[str, bool], ...] = ()
    inputs: tuple[str, ...] = ()
    recorded: bool = True

    @property
    def layer(self) -> str:
        return self.stack[-1]


@dataclass(frozen=True)
class TensorCalls:
    """Where a tensor stands among the module calls: its unique *label*, the *calls* that compute it
    (module paths and call labels, innermost first) and those it is an *output of*: the calls it
    leaves (a node outside the call reads it, or it is a graph output)."""

    label: str
    calls: tuple[str, ...]
    output_of: tuple[str, ...]


def _call_label(module: str, number: int) -> str:
    return module if number == 1 else f"{module}#{number}"


def module_calls(nodes: Sequence[CallNode], graph_outputs: set[str]) -> dict[str, TensorCalls]:
    """A label and the calls of every output of the nodes with an observable output, for *nodes* in
    graph order (every node that reads values: those without an observable output only as readers).

    A module called more than once (torchvision's ResNet blocks reuse one ReLU) gives several
    tensors one layer name; records, plots and summaries need one label per tensor. A *call*
    of module M is a run of consecutive nodes computed by M or inside it (M in their stack, or a
    layer ``M.…``), so the nodes of sub-modules do not end their parent's call; nodes without an
    observable output (constants, shape arithmetic) neither open nor end a call. The first call is
    labelled ``M``, the k-th ``M#k``; within a call the last observable tensor of M's own nodes
    takes that label and the call's other tensors ``M/<tensor>`` (``M#k/<tensor>``).

    A tensor is an output of a call of M when it is a graph output or a node outside that call reads
    it; of M's own call first, then of each enclosing module's call it also leaves.
    """
    counts: dict[str, int] = {}
    open_calls: dict[str, int] = {}  # module -> number of its call in progress
    inside: list[dict[str, int]] = []  # per node: the calls it is part of
    members: dict[tuple[str, int], list[tuple[str, bool]]] = {}
    for node in nodes:
        enclosing = {m: n for m, n in open_calls.items() if m in node.stack or node.layer.startswith(m + ".")}
        if any(ok for _, ok in node.outputs):
            for module in node.stack if node.recorded else [node.layer]:
                if module not in enclosing:
                    counts[module] = enclosing[module] = counts.get(module, 0) + 1
            if node.recorded:
                open_calls = enclosing
            members.setdefault((node.layer, enclosing[node.layer]), []).extend(node.outputs)
        inside.append(enclosing)
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.inputs:
            readers.setdefault(name, []).append(index)

    def leaves(name: str, module: str, number: int) -> bool:
        return name in graph_outputs or any(inside[r].get(module) != number for r in readers.get(name, ()))

    found: dict[str, TensorCalls] = {}
    for node, position in zip(nodes, inside):
        if not any(ok for _, ok in node.outputs):
            continue
        modules = [(m, position[m]) for m in reversed(node.stack) if m in position]  # innermost first
        calls = tuple(dict.fromkeys(name for m, n in modules for name in (m, _call_label(m, n))))
        for name, _ in node.outputs:
            left = []
            for module, number in modules:  # nested calls: a tensor that stays in one stays in those around it
                if not leaves(name, module, number):
                    break
                left += [module, _call_label(module, number)]
            found[name] = TensorCalls("", calls, tuple(dict.fromkeys(left)))
    labels: dict[str, str] = {}
    for (layer, number), outputs in members.items():
        base = _call_label(layer, number)
        observable = [name for name, ok in outputs if ok]
        output = observable[-1] if observable else None
        labels.update({name: base if name == output else f"{base}/{name}" for name, _ in outputs})
    seen: set[str] = set()
    for name, label in labels.items():  # a layer literally named like another's label: keep labels unique
        labels[name] = label if label not in seen else f"{label}/{name}"
        seen.add(labels[name])
    return {name: TensorCalls(labels[name], found[name].calls, found[name].output_of) for name in labels}
