"""What a forward pass costs, estimated from the graph: multiply-accumulates per sample.

The dense ops dominate a network's arithmetic: per sample, a ``Conv`` costs its output elements times
the input channels per group times the kernel size, a ``MatMul`` or ``Gemm`` its output elements times
the reduced dimension. Everything else (activations, normalisations, pooling) is left out. The count
decides whether spreading one checkpoint over worker processes can pay for starting them
(:func:`layerscope.engine.execute.open_executor`); it is an estimate, not a profile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .tensors import TensorInfo, known_sizes

if TYPE_CHECKING:
    import onnx


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def macs_per_sample(model: onnx.ModelProto, tensors: Sequence[TensorInfo]) -> int:
    """Multiply-accumulates of the Conv, ConvTranspose, MatMul and Gemm nodes of *model* for one sample (axis 0
    of every tensor is the batch); nodes whose shapes are not known are left out."""
    shapes: dict[str, tuple] = {t.name: t.shape for t in tensors if t.shape is not None}
    shapes.update({i.name: tuple(i.dims) for i in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        out, first, second = (shapes.get(name) for name in (node.output[0], node.input[0], node.input[1]))
        if out is None or first is None or second is None or not known_sizes([*out[1:], *first[1:]]):
            continue
        if node.op_type == "MatMul":  # the reduced axis is the last of the first operand
            total += math.prod(out[1:]) * first[-1]
        elif not known_sizes(second):  # the others reduce over a weight of known shape
            continue
        elif node.op_type == "Conv":  # weight: out channels × in channels per group × kernel
            total += math.prod(out[1:]) * math.prod(second[1:])
        elif node.op_type == "ConvTranspose":  # every input element meets out channels per group × kernel
            total += math.prod(first[1:]) * math.prod(second[1:])
        else:  # Gemm: B is (K, N), or (N, K) with transB
            total += math.prod(out[1:]) * (second[1] if _attribute(node, "transB", 0) else second[0])
    return total
