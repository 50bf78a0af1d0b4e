"""Find global aggregation layers: the pooling node, the activation feeding it and the linear layer after it.

An aggregation is a GlobalAveragePool / GlobalMaxPool, or a ReduceMean / ReduceSum /
ReduceMax over every axis after the channel axis (also after a Flatten/Reshape that
merges the spatial axes). For each one this module reads, from the graph: the number of
positions M it aggregates, the activation that produced its input (and that activation's
input), and the linear layer that follows — a Gemm, or a MatMul plus an Add — with its
weights and bias from the initializers (through Flatten/Reshape/Squeeze in between).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from layerscope.graph.activations import ACTIVATION_OPS
from layerscope.graph.tensors import TensorInfo, known_sizes
from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import onnx

    from layerscope import LoadedModel
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it

AGGREGATION_OPS = {
    "GlobalAveragePool": "mean",
    "GlobalMaxPool": "max",
    "ReduceMean": "mean",
    "ReduceSum": "sum",
    "ReduceMax": "max",
}
PASS_THROUGH = {"Flatten", "Reshape", "Squeeze"}


@dataclass(frozen=True)
class Aggregation:
    """A global aggregation layer and its neighbourhood in the graph."""

    output: str  # the aggregated tensor G
    input: str  # the map A that is aggregated (N, C, …)
    kind: str  # mean | sum | max
    positions: int  # M: the number of positions aggregated per channel
    layer: str
    order: int
    activation: str | None = None  # op type producing A
    activation_input: str | None = None  # Z, the activation's input
    linear_output: str | None = None  # Y = W·G + b
    weight: np.ndarray | None = None  # (outputs, channels)
    bias: np.ndarray | None = None


class _Constants(Mapping[str, np.ndarray]):
    """The values of *model*'s initializers and Constant nodes by name, each read when first asked for (an
    initializer's from the model's file when the graph holds a reference: only the few this module needs
    are read, never every weight of the model)."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.nodes = {
            node.output[0]: attribute.t
            for node in model.graph.node
            if node.op_type == "Constant"
            for attribute in node.attribute
            if attribute.name == "value"
        }
        self.names = [i.name for i in model.graph.initializer] + list(self.nodes)
        self.read: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.read:
            if name in self.nodes:
                self.read[name] = onnx.numpy_helper.to_array(self.nodes[name])
            elif name in self.names:
                self.read[name] = self.model.initializer(name)
            else:
                raise KeyError(name)
        return self.read[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _reduced_axes(node: onnx.NodeProto, rank: int, constants: Mapping[str, np.ndarray]) -> set[int] | None:
    if node.op_type.startswith("Global"):
        return set(range(2, rank))
    axes = _attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        if node.input[1] not in constants:
            return None
        axes = constants[node.input[1]].tolist()
    if axes is None:
        return None
    return {a % rank for a in axes}


def _linear_after(tensor: str, consumers: dict[str, list[onnx.NodeProto]], constants: Mapping[str, np.ndarray]):
    """(output, weight (out, C), bias) of the Gemm or MatMul+Add reading *tensor* (through reshapes)."""
    current = tensor
    for _ in range(4):
        users = consumers.get(current, [])
        if len(users) != 1:
            return None
        node = users[0]
        if node.op_type in PASS_THROUGH:
            current = node.output[0]
            continue
        if node.op_type == "Gemm" and node.input[0] == current and node.input[1] in constants:
            weight = constants[node.input[1]].astype(np.float64)
            weight = weight if _attribute(node, "transB", 0) else weight.T
            weight = weight * _attribute(node, "alpha", 1.0)
            bias = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            bias = (
                np.zeros(len(weight))
                if bias is None
                else np.broadcast_to(bias, len(weight)) * _attribute(node, "beta", 1.0)
            )
            return node.output[0], weight, np.asarray(bias, dtype=np.float64)
        if node.op_type == "MatMul" and node.input[0] == current and node.input[1] in constants:
            weight = constants[node.input[1]].astype(np.float64).T
            adds = consumers.get(node.output[0], [])
            if len(adds) == 1 and adds[0].op_type == "Add":
                other = [i for i in adds[0].input if i != node.output[0]]
                if other and other[0] in constants:
                    return (
                        adds[0].output[0],
                        weight,
                        np.broadcast_to(constants[other[0]], len(weight)).astype(np.float64),
                    )
            return node.output[0], weight, np.zeros(len(weight))
        return None
    return None


def find_aggregations(model: LoadedModel, tensors: Sequence[TensorInfo]) -> list[Aggregation]:
    """Every global aggregation of *model* with its activation and following linear layer, in graph order."""
    by_name = {t.name: t for t in tensors}
    constants = _Constants(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in model.graph.node:
        if node.op_type not in AGGREGATION_OPS or not node.output or node.output[0] not in by_name:
            continue
        source = by_name.get(node.input[0])
        if source is None or source.shape is None or len(source.shape) < 3:
            continue
        spatial = source.shape[2:]
        axes = _reduced_axes(node, len(source.shape), constants)
        if axes != set(range(2, len(source.shape))) or not known_sizes(spatial):
            continue
        output = by_name[node.output[0]]
        producer = source
        while producer.op_type in PASS_THROUGH and producer.inputs and producer.inputs[0] in by_name:
            producer = by_name[producer.inputs[0]]  # e.g. a Flatten that merged the spatial axes
        activation = producer.op_type if producer.op_type in ACTIVATION_OPS else None
        linear = _linear_after(node.output[0], consumers, constants)
        found.append(
            Aggregation(
                output=output.name,
                input=source.name,
                kind=AGGREGATION_OPS[node.op_type],
                positions=math.prod(spatial),
                layer=output.layer,
                order=output.order,
                activation=activation,
                activation_input=producer.inputs[0] if activation and producer.inputs else None,
                linear_output=linear[0] if linear else None,
                weight=linear[1] if linear else None,
                bias=linear[2] if linear else None,
            )
        )
    return found
