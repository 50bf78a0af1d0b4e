"""Map ONNX nodes back to the user's layer names.

torch's exporter records the module path of every node in the node metadata
(``pkg.torch.onnx.name_scopes``: ``['', 'features', 'features.1', 'relu']``, the last
entry being the op). The layer is the innermost module path; functional ops called at
the root take their op name. Without metadata the ONNX node name is used.
:func:`call_labels` turns these names into one label per tensor.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import TYPE_CHECKING

from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it


TORCH_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def layer_name(node: onnx.NodeProto) -> str:
    """The user's name for the layer that produced *node* (see module docstring)."""
    for prop in node.metadata_props:
        if prop.key == TORCH_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                break
            if len(scopes) >= 2 and scopes[-2]:
                return str(scopes[-2])
            if scopes:
                return str(scopes[-1])
    return node.name or (node.output[0] if node.output else node.op_type)


def call_labels(nodes: Sequence[tuple[str, Sequence[tuple[str, bool]]]]) -> dict[str, str]:
    """A unique label for every output of *nodes* (in graph order: the node's layer name and its
    outputs as ``(tensor name, observable)``).

    A module called more than once (torchvision's ResNet blocks reuse one ReLU) gives several
    tensors one layer name; records, plots and summaries need one label per tensor. A *call*
    of layer M is a run of consecutive nodes whose layer is M or inside it (``M.…``), so the
    nodes of sub-modules do not end their parent's call. The first call is labelled ``M``, the
    k-th ``M#k``; within a call the last observable tensor (the call's output) takes that label
    and the call's other tensors ``M/<tensor>`` (``M#k/<tensor>``).
    """
    calls: dict[str, int] = {}
    open_calls: dict[str, int] = {}  # layer -> number of its call in progress
    members: dict[tuple[str, int], list[tuple[str, bool]]] = {}
    for layer, outputs in nodes:
        open_calls = {m: n for m, n in open_calls.items() if layer == m or layer.startswith(m + ".")}
        if layer not in open_calls:
            calls[layer] = open_calls[layer] = calls.get(layer, 0) + 1
        members.setdefault((layer, open_calls[layer]), []).extend(outputs)
    labels: dict[str, str] = {}
    for (layer, number), outputs in members.items():
        base = layer if number == 1 else f"{layer}#{number}"
        observable = [name for name, ok in outputs if ok]
        output = observable[-1] if observable else None
        labels.update({name: base if name == output else f"{base}/{name}" for name, _ in outputs})
    seen: set[str] = set()
    for name, label in labels.items():  # a layer literally named like another's label: keep labels unique
        labels[name] = label if label not in seen else f"{label}/{name}"
        seen.add(labels[name])
    return labels
