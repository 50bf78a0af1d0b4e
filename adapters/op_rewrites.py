"""Ops that onnxruntime cannot run, rewritten into ONNX ops that compute the same function.

tf2onnx keeps a TensorFlow op it has no conversion for in the graph under its TensorFlow name
(``Erfc``, which Keras's exact GELU calls: ``gelu(x) = x/2 · erfc(−x/√2)``); no ONNX operator has
that name, so onnxruntime refuses the model and ONNX shape inference types none of the tensors
after it. :data:`REWRITES` holds, for each such op with an exact equivalent in ONNX operators,
the nodes that compute it:

- ``Erfc(x) = 1 − Erf(x)``
- ``Expm1(x) = Exp(x) − 1``
- ``Log1p(x) = Log(1 + x)``

The TensorFlow adapter rewrites what it converts; the ONNX file adapter rewrites a graph converted
outside layerscope (a ModelProto from Python as a copy).

The equivalents are exact in real arithmetic. In float32 they lose the relative precision that the
fused op keeps where its result is tiny: ``1 − Erf(x)`` is 0 from x ≈ 4 (erfc(4) ≈ 1.5·10⁻⁸), and
``Exp(x) − 1`` and ``Log(1 + x)`` are 0.1 % off at x = 10⁻⁵. Their absolute error stays at the rounding
of numbers near 1 (at most 3·10⁻⁷, measured on onnxruntime against SciPy and NumPy in float64 over
x ∈ [−10, 10] for Erfc and [−0.99, 1] for the others), which is what a GELU or an ELU made of them sees.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it


def _one_like(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Nodes making ``<output>/one``: the number 1 in the element type of the node's input (CastLike)."""
    helper, base = onnx.helper, node.output[0]
    one = helper.make_tensor(f"{base}/one_value", onnx.TensorProto.FLOAT, [], [1.0])
    return [
        helper.make_node("Constant", [], [f"{base}/one_float"], name=f"{node.name}/one_float", value=one),
        helper.make_node("CastLike", [f"{base}/one_float", node.input[0]], [f"{base}/one"], name=f"{node.name}/one"),
    ]


def _erfc(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    helper, base = onnx.helper, node.output[0]
    return [
        *_one_like(node),
        helper.make_node("Erf", [node.input[0]], [f"{base}/erf"], name=f"{node.name}/erf"),
        helper.make_node("Sub", [f"{base}/one", f"{base}/erf"], [base], name=node.name),
    ]


def _expm1(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    helper, base = onnx.helper, node.output[0]
    return [
        *_one_like(node),
        helper.make_node("Exp", [node.input[0]], [f"{base}/exp"], name=f"{node.name}/exp"),
        helper.make_node("Sub", [f"{base}/exp", f"{base}/one"], [base], name=node.name),
    ]


def _log1p(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    helper, base = onnx.helper, node.output[0]
    return [
        *_one_like(node),
        helper.make_node("Add", [node.input[0], f"{base}/one"], [f"{base}/plus_one"], name=f"{node.name}/plus_one"),
        helper.make_node("Log", [f"{base}/plus_one"], [base], name=node.name),
    ]


#: op type (default domain) → the ONNX nodes computing it, the last one producing the op's output under its
#: name (so that every reader and the layer name, read from node names, stay as they were)
REWRITES: dict[str, Callable[[onnx.NodeProto], list[onnx.NodeProto]]] = {
    "Erfc": _erfc,
    "Expm1": _expm1,
    "Log1p": _log1p,
}


def _rewritable(node: onnx.NodeProto) -> bool:
    return node.op_type in REWRITES and node.domain in ("", "ai.onnx") and len(node.input) == len(node.output) == 1


def with_ops_rewritten(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """*model* with the ops :data:`REWRITES` knows rewritten, and how many of each, leaving *model* as it
    is: a copy when there is something to rewrite (a model given from Python stays the caller's), else
    *model* itself."""
    if not any(_rewritable(node) for node in model.graph.node):
        return model, {}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, dict(rewrite_unsupported_ops(copy))


def rewrite_unsupported_ops(model: onnx.ModelProto) -> Counter[str]:
    """Replace, in place, every node of *model*'s graph that :data:`REWRITES` knows (default domain, one
    input and one output) by its equivalent; returns how many nodes of each op type were rewritten."""
    rewritten: Counter[str] = Counter()
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if not _rewritable(node):
            nodes.append(node)
            continue
        nodes += REWRITES[node.op_type](node)
        rewritten[node.op_type] += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten
