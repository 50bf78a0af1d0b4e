"""What a model's graph offers for observation: every tensor, its shape, and whether it can be fetched.

Follows these rules, measured on onnxruntime: shapes and dtypes come from ONNX shape
inference (never guessed); Constant outputs and integer shape arithmetic are not worth
fetching (nor a ``CastLike`` of a constant: its second input gives only the type); tensors
inside ``If``/``Loop``/``Scan`` bodies cannot be graph outputs; sequence- and map-typed
values are not tensors.
"""

from __future__ import annotations

import ast
import hashlib
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeGuard

import numpy as np

from layerscope.util.errors import UserError
from layerscope.util.lazy import lazy_module

from .layer_names import CallNode, layer_name, module_calls, module_stacks

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it

Dim = int | str | None
SHAPE_OPS = {"Shape", "Size"}
SUBGRAPH_OPS = {"If", "Loop", "Scan"}


_FUNCTIONS: dict[str, Callable[..., float]] = {
    "Min": min,
    "Max": max,
    "floor": math.floor,
    "ceiling": math.ceil,
    "FloorDiv": operator.floordiv,
    "CeilToInt": math.ceil,
    "Mod": operator.mod,
    "Abs": abs,
}
_OPERATORS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def dim_size(dim: Dim, bindings: Mapping[str, int]) -> int | None:
    """The size of *dim*: an int as it is; a symbol, or an expression of symbols as exporters write them
    (``seq``, ``2*seq``, ``Min(512, seq)``, ``floor(seq/2)``), evaluated with the sizes in *bindings*;
    None when it is unknown or names a symbol *bindings* lacks. Only arithmetic is evaluated, never code."""
    if isinstance(dim, int) or dim is None:
        return dim

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            return bindings[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return value(node.left) / value(node.right)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            return _FUNCTIONS[node.func.id](*(value(argument) for argument in node.args))
        raise ValueError(ast.dump(node))

    try:
        size = value(ast.parse(dim, mode="eval").body)
    except (SyntaxError, ValueError, KeyError, TypeError, ZeroDivisionError, RecursionError):
        return None
    return int(size) if float(size).is_integer() and size >= 0 else None


def known_sizes(dims: Sequence[Dim]) -> TypeGuard[Sequence[int]]:
    """True when every dim of *dims* is a size (an int), none a symbol or unknown."""
    return all(isinstance(d, int) for d in dims)


def format_dims(shape: tuple[Dim, ...] | None) -> str:
    """A shape as text, e.g. ``batch×128``; ``?`` for an unknown shape or dimension."""
    return "?" if shape is None else "×".join(str(d) if d is not None else "?" for d in shape)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the graph as the user sees it."""

    name: str
    op_type: str  # op that produces it; "Input" for a model input
    layer: str  # a label unique in the model: the user's layer name (module path, or the node name),
    #             "#k" for the k-th call of a reused module, "/<tensor>" for a call's inner tensors
    dtype: str | None  # numpy dtype name
    shape: tuple[Dim, ...] | None
    observable: bool
    reason: str = ""  # why it is not observable
    order: int = -1  # producer's position in the graph (-1: model input)
    node: str = ""
    inputs: tuple[str, ...] = ()  # the producer's input tensors
    role: str = "intermediate"  # input | output | intermediate
    layout: str | None = None  # NCHW or NHWC for 4-D maps (see infer_layouts)
    module: str = ""  # the layer name as the model gives it, shared by every call of a reused module
    calls: tuple[str, ...] = ()  # the module calls computing it: module paths and call labels, innermost first
    output_of: tuple[str, ...] = ()  # those of *calls* it leaves (read outside the call, or a graph output)

    @property
    def inner(self) -> bool:
        """True for a tensor computed inside a module call and read only there: an output of no call."""
        return bool(self.calls) and not self.output_of

    def channels_first(self, values):
        """*values* (a torch batch of this tensor) with channels on axis 1, whatever the tensor's layout."""
        return values.permute(0, 3, 1, 2) if self.layout == "NHWC" and values.ndim == 4 else values

    def bytes_per_sample(self, bindings: Mapping[str, int] | None = None) -> int | None:
        """Bytes of one sample (axis 0 is the batch axis), symbolic dims sized by *bindings*
        (:func:`dim_size`); None if a non-batch dim is unknown."""
        if self.shape is None or self.dtype is None:
            return None
        dims = [dim_size(dim, bindings or {}) for dim in self.shape[1:]]
        if not known_sizes(dims):
            return None
        return math.prod(dims) * np.dtype(self.dtype).itemsize

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op_type": self.op_type,
            "layer": self.layer,
            "module": self.module,
            "dtype": self.dtype,
            "shape": list(self.shape) if self.shape is not None else None,
            "observable": self.observable,
            "reason": self.reason,
            "role": self.role,
            "layout": self.layout,
            "output_of": list(self.output_of),
        }


INPUT_LAYOUT_KEY = "layerscope.input_layout"  # model metadata set by adapters whose framework is NHWC
CHANNELS_FIRST_OPS = {
    "Conv",
    "ConvTranspose",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "BatchNormalization",
    "InstanceNormalization",
    "LRN",
}
LAYOUT_PRESERVING_OPS = {
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "Celu",
    "Sigmoid",
    "HardSigmoid",
    "Tanh",
    "Gelu",
    "Softplus",
    "Softsign",
    "HardSwish",
    "Mish",
    "Clip",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Identity",
    "Dropout",
    "Neg",
    "Abs",
    "Exp",
    "Log",
    "Sqrt",
    "Erf",
    "Pow",
    "Cast",
    "Max",
    "Min",
}


def infer_layouts(model: onnx.ModelProto) -> dict[str, str]:
    """The axis order of 4-D tensors: the input's from the model metadata (NCHW unless an adapter
    says NHWC, as Keras does), NCHW after channels-first ops (Conv, pooling …), what a Transpose
    with perm (0,2,3,1) / (0,3,1,2) produces, and unchanged through element-wise ops."""
    metadata = {p.key: p.value for p in model.metadata_props}
    initializers = {i.name for i in model.graph.initializer}
    layouts = {i.name: metadata.get(INPUT_LAYOUT_KEY, "NCHW") for i in model.graph.input if i.name not in initializers}
    for node in model.graph.node:
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            layout = {(0, 2, 3, 1): "NHWC", (0, 3, 1, 2): "NCHW"}.get(tuple(perm or ()))
        elif node.op_type in CHANNELS_FIRST_OPS:
            layout = "NCHW"
        elif node.op_type in LAYOUT_PRESERVING_OPS:
            layout = next((layouts[i] for i in node.input if i in layouts), None)
        else:
            layout = None
        if layout:
            layouts.update({output: layout for output in node.output if output})
    return layouts


def _numpy_dtype(elem_type: int) -> str | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return None


def _tensor_type(type_proto: onnx.TypeProto | None) -> tuple[str | None, tuple[Dim, ...] | None, str]:
    """(dtype, shape, reason-if-unusable) of a value's type."""
    if type_proto is None or type_proto.WhichOneof("value") is None:
        return None, None, "no type information after shape inference"
    kind = type_proto.WhichOneof("value")
    if kind != "tensor_type":
        return None, None, f"{kind.replace('_type', '')}-typed value, not a tensor"
    tensor_type = type_proto.tensor_type
    dtype = _numpy_dtype(tensor_type.elem_type)
    if dtype is None:
        return (
            None,
            None,
            f"element type {onnx.TensorProto.DataType.Name(tensor_type.elem_type)} has no numpy equivalent",
        )
    if not tensor_type.HasField("shape"):
        return dtype, None, ""
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
    return dtype, shape, ""


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run ONNX shape inference (on the graph: a model whose weights are set apart, :mod:`layerscope.graph.
    weights`, costs what its graph costs); a model it rejects is a user error naming the problem."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as error:
        raise UserError(f"ONNX shape inference failed on the model: {error}") from None


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    graph = model.graph
    return {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}


def _subgraph_tensors(node: onnx.NodeProto, layer_of: Callable[[onnx.NodeProto], str]) -> list[TensorInfo]:
    found = []
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for body in graphs:
            for inner in body.node:
                reason = (
                    f"inside the {node.op_type} body of node '{node.name}' (subgraph values cannot be graph outputs)"
                )
                found += [
                    TensorInfo(
                        name=o,
                        op_type=inner.op_type,
                        layer=layer_of(inner),
                        dtype=None,
                        shape=None,
                        observable=False,
                        reason=reason,
                        node=inner.name,
                    )
                    for o in inner.output
                    if o
                ]
                found += _subgraph_tensors(inner, layer_of)
    return found


def structure_fingerprint(model: onnx.ModelProto) -> str:
    """A digest of a graph's structure: the opsets, the graph's inputs, outputs and nodes (names, ops,
    attributes, metadata), and every initializer's name, type and shape, with the values of the integer
    ones (shape constants) but not of the float ones. Two graphs that differ only in their weights share it:
    it recognises one model with other weights (a model followed through training, whose steps change only
    the initializers of its parameters), so :func:`describe_tensors` runs once; it does not tell models
    apart (a float constant such as a Resize scale is left out too)."""
    digest = hashlib.sha256()
    graph = model.graph
    for part in [
        *model.opset_import,
        *graph.input,
        *graph.output,
        *graph.value_info,
        *graph.node,
        *graph.sparse_initializer,
    ]:
        digest.update(part.SerializeToString())
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    for initializer in graph.initializer:
        digest.update(repr((initializer.name, initializer.data_type, tuple(initializer.dims))).encode())
        if initializer.data_type not in floating:
            digest.update(initializer.SerializeToString())
    return digest.hexdigest()


def describe_tensors(
    model: onnx.ModelProto, layer_of: Callable[[onnx.NodeProto], str] = layer_name
) -> list[TensorInfo]:
    """Every tensor of *model* (inputs, node outputs, subgraph values) with observability and a
    unique layer label and the module calls it is computed in and an output of
    (:func:`layerscope.graph.layer_names.module_calls`)."""
    inferred = infer_shapes(model)
    types = _value_types(inferred)
    layouts = infer_layouts(model)
    graph = inferred.graph
    initializers = {i.name for i in graph.initializer} | {i.values.name for i in graph.sparse_initializer}
    outputs = {o.name for o in graph.output}
    tensors: list[TensorInfo] = []
    static: dict[str, str] = {name: "constant" for name in initializers}  # tensor -> why it is static

    for value in graph.input:
        if value.name in initializers:
            continue
        dtype, shape, reason = _tensor_type(value.type)
        tensors.append(
            TensorInfo(
                value.name,
                "Input",
                value.name,
                dtype,
                shape,
                not reason,
                reason,
                role="input",
                layout=layouts.get(value.name) if shape is not None and len(shape) == 4 else None,
                module=value.name,
            )
        )
    nodes: list[CallNode] = []  # every node as module_calls reads it
    layers = [layer_of(node) for node in graph.node]
    for order, (node, layer, (stack, recorded)) in enumerate(
        zip(graph.node, layers, module_stacks(graph.node, layers))
    ):
        inputs = tuple(i for i in node.input if i)
        if node.op_type == "Constant":
            why = "constant"
        elif node.op_type in SHAPE_OPS:
            why = "shape arithmetic"
        elif node.op_type == "CastLike" and inputs and inputs[0] in static:  # the second input gives a type only
            why = static[inputs[0]]
        elif inputs and all(i in static for i in inputs):
            why = "shape arithmetic" if any(static[i] == "shape arithmetic" for i in inputs) else "constant"
        else:
            why = ""
        produced: list[TensorInfo] = []
        for output in node.output:
            if not output:
                continue  # an omitted optional output
            dtype, shape, type_reason = _tensor_type(types.get(output))
            if why:
                static[output] = why
            reason = why or type_reason
            layout = layouts.get(output, "NCHW") if shape is not None and len(shape) == 4 else None
            produced.append(
                TensorInfo(
                    output,
                    node.op_type,
                    layer,
                    dtype,
                    shape,
                    not reason,
                    reason,
                    order,
                    node.name,
                    inputs,
                    "output" if output in outputs else "intermediate",
                    layout,
                )
            )
        tensors += produced
        nodes.append(
            CallNode(
                stack,
                tuple((t.name, t.observable) for t in produced),
                () if node.op_type in SHAPE_OPS else inputs + _read_in_bodies(node),  # a Shape reads no values
                recorded,
            )
        )
        if node.op_type in SUBGRAPH_OPS:
            tensors += _subgraph_tensors(node, layer_of)
    calls = module_calls(nodes, outputs)
    firsts = [t.shape[0] for t in tensors if t.role == "input" and t.shape]
    batch = {first for first in firsts if isinstance(first, str)}
    fixed = {first for first in firsts if isinstance(first, int)}
    tensors = [_batch_axis_checked(t, batch, fixed) for t in tensors]
    return [
        replace(
            t, layer=calls[t.name].label, module=t.layer, calls=calls[t.name].calls, output_of=calls[t.name].output_of
        )
        if t.name in calls
        else replace(t, module=t.module or t.layer)
        for t in tensors
    ]


def _read_in_bodies(node: onnx.NodeProto) -> tuple[str, ...]:
    """The tensors the subgraph bodies of *node* (``If``, ``Loop``, ``Scan``) read, outer-scope values included."""
    read: list[str] = []
    for attribute in node.attribute:
        for body in [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]:
            for inner in body.node:
                read += [i for i in inner.input if i]
                read += _read_in_bodies(inner)
    return tuple(read)


def _batch_axis_checked(tensor: TensorInfo, batch: set[str], fixed: set[int]) -> TensorInfo:
    """*tensor*, unobservable when it has no rows that are samples: a scalar; a tensor whose first axis is a
    fixed number other than the inputs' (a sum over the batch, a transpose), or any fixed number where the
    inputs' batch axis is symbolic; or one whose first axis is a symbolic expression of the batch axis other
    than the batch axis itself (``2*batch``: batch and heads merged, as in torch's MultiheadAttention).
    *batch* and *fixed*: the inputs' symbolic and fixed first axes."""
    if tensor.observable and tensor.shape == ():
        return replace(tensor, observable=False, reason="a scalar: it has no sample axis")
    first = tensor.shape[0] if tensor.shape else None
    if tensor.observable and isinstance(first, int) and (batch or (fixed and first not in fixed)):
        inputs = "symbolic" if batch else " or ".join(map(str, sorted(fixed)))
        return replace(
            tensor,
            observable=False,
            reason=f"its first axis is fixed ({first}) where the inputs' batch axis is {inputs}: rows are not samples",
        )
    if not tensor.observable or not isinstance(first, str) or first in batch:
        return tensor
    if any(re.search(rf"\b{re.escape(symbol)}\b", first) for symbol in batch):
        return replace(
            tensor, observable=False, reason=f"its first axis ({first}) is not the batch axis: rows are not samples"
        )
    return tensor
