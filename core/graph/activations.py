"""Find the activation functions of a graph: single ops and the decomposed forms exporters emit.

Single activation ops (``Relu``, ``Gelu``, ``Tanh`` …, see :data:`ACTIVATION_OPS`, and ``Clip``
as ReLU6/hardtanh) pair their first input with their output. A decomposed form is a
small cone of element-wise nodes ending in one output (a Mul, Div or Where) whose every
path back leads to one tensor, the activation's input, which feeds the cone at least
twice (x·f(x)); the nearest such input is taken, and the ops inside the cone name the
pattern:

- Erf → GELU (erf form), x·½(1 + erf(x/√2))
- Tanh and Pow → GELU (tanh form)
- Softplus and Tanh → Mish, x·tanh(softplus(x))
- Sigmoid and Mul → SiLU / swish, x·sigmoid(x)
- HardSigmoid and Mul → HardSwish
- Softplus and Where → Softplus with threshold (torch's export)

The largest cone wins, and single ops inside an accepted cone (the Sigmoid of a SiLU) are
not reported again.

**Attention** (:func:`find_attention`) is the Softmax between two matrix products: its input,
the scores, comes from a MatMul (Q·Kᵀ) through at most a few scaling, masking, bias or
reshaping steps, and its output, the attention probabilities, reaches a MatMul (·V) the same
way. Attention computed inside one fused op (ONNX ``Attention``, onnxruntime's
``MultiHeadAttention``) and the gates of ``LSTM``/``GRU``/``RNN`` ops have no tensors of their own:
:func:`fused_activations` lists those ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .tensors import TensorInfo

#: ONNX ops that are activation functions (their outputs are "activations").
ACTIVATION_OPS: tuple[str, ...] = (
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
    "ThresholdedRelu",
)

ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Erf",
    "Tanh",
    "Sigmoid",
    "Softplus",
    "Exp",
    "Log",
    "Sqrt",
    "Neg",
    "Abs",
    "Greater",
    "Less",
    "Where",
    "HardSigmoid",
    "Relu",
    "Min",
    "Max",
    "Clip",
    "Reciprocal",
}
PATTERN_ENDS = {"Mul", "Div", "Where"}
MAX_CONE = 12
PATTERNS = (  # (ops that must all be in the cone, name), most specific first
    ({"Erf"}, "Gelu (erf form)"),
    ({"Tanh", "Pow"}, "Gelu (tanh form)"),
    ({"Softplus", "Tanh"}, "Mish (decomposed)"),
    ({"HardSigmoid", "Mul"}, "HardSwish (decomposed)"),
    ({"Sigmoid", "Mul"}, "SiLU (x·sigmoid(x))"),
    ({"Softplus", "Where"}, "Softplus (thresholded)"),
)


@dataclass(frozen=True)
class Activation:
    """An activation function in the graph: its input and output tensors and what matched."""

    input: str
    output: str
    kind: str  # the op type, or the name of a decomposed pattern
    layer: str
    order: int


def _sources(tensor: TensorInfo, by_name: dict[str, TensorInfo]) -> list[TensorInfo]:
    """The non-constant tensors *tensor*'s producer reads."""
    found = [by_name.get(name) for name in tensor.inputs]
    return [t for t in found if t is not None and t.reason != "constant"]


def _elementwise(tensor: TensorInfo) -> bool:
    return tensor.op_type in ELEMENTWISE and tensor.role != "input"


def _cone_from(end: TensorInfo, source: str, by_name: dict[str, TensorInfo]) -> set[str] | None:
    """Tensors on the paths from *source* to *end* if every path from *end* back to a
    non-element-wise tensor passes through *source* (it dominates *end*); else None."""
    inside, frontier = {end.name}, [end]
    while frontier:
        for parent in _sources(frontier.pop(), by_name):
            if parent.name == source or parent.name in inside:
                continue
            if not _elementwise(parent) or len(inside) >= MAX_CONE:
                return None  # a path escapes around *source*, or the cone is too big to be one function
            inside.add(parent.name)
            frontier.append(parent)
    return inside


def _match(end: TensorInfo, by_name: dict[str, TensorInfo]) -> tuple[str, set[str], str] | None:
    """(activation input, cone, pattern) for the nearest input that fans out into a known pattern ending at *end*."""
    seen: set[str] = set()
    frontier = [end]
    while frontier and len(seen) <= MAX_CONE:
        tensor = frontier.pop(0)
        for candidate in _sources(tensor, by_name):
            if candidate.name in seen:
                continue
            seen.add(candidate.name)
            cone = _cone_from(end, candidate.name, by_name)
            if cone is not None:
                uses = sum(candidate.name in by_name[n].inputs for n in cone)
                kind = _pattern({by_name[n].op_type for n in cone})
                if uses >= 2 and kind:  # x·f(x)-like: the input feeds the product and the branch
                    return candidate.name, cone, kind
            if _elementwise(candidate):
                frontier.append(candidate)
    return None


def _pattern(ops: set[str]) -> str | None:
    return next((name for required, name in PATTERNS if required <= ops), None)


#: Ops allowed between the Softmax of an attention and its matrix products.
ATTENTION_STEPS = {"Add", "Sub", "Mul", "Div", "Where", "Reshape", "Cast", "Transpose", "Dropout", "Identity"}
MAX_ATTENTION_STEPS = 3
#: Ops that compute activations internally (op type -> what cannot be observed).
FUSED_ACTIVATIONS = {
    "LSTM": "its gate activations (sigmoid, tanh)",
    "GRU": "its gate activations (sigmoid, tanh)",
    "RNN": "its activation",
    "Attention": "its attention softmax",
    "MultiHeadAttention": "its attention softmax",
    "GroupQueryAttention": "its attention softmax",
    "PackedMultiHeadAttention": "its attention softmax",
}


def _reaches(start: TensorInfo, step, target_op: str) -> bool:
    """True when a tensor produced by *target_op* is reached from *start* within
    :data:`MAX_ATTENTION_STEPS` hops of *step* (a function tensor -> neighbours) through ops of
    :data:`ATTENTION_STEPS`."""
    frontier = [start]
    for _ in range(MAX_ATTENTION_STEPS + 1):
        following = []
        for tensor in frontier:
            for neighbour in step(tensor):
                if neighbour.op_type == target_op:
                    return True
                if neighbour.op_type in ATTENTION_STEPS:
                    following.append(neighbour)
        frontier = following
    return False


def find_attention(tensors: Sequence[TensorInfo]) -> list[Activation]:
    """Every attention softmax of the graph (scores → probabilities), in forward order."""
    by_name = {t.name: t for t in tensors}
    consumers: dict[str, list[TensorInfo]] = {}
    for tensor in tensors:
        for name in tensor.inputs:
            consumers.setdefault(name, []).append(tensor)
    found = []
    for tensor in tensors:
        if tensor.op_type != "Softmax" or not tensor.inputs or tensor.inputs[0] not in by_name:
            continue
        scores = by_name[tensor.inputs[0]]
        from_product = scores.op_type == "MatMul" or _reaches(scores, lambda t: _sources(t, by_name), "MatMul")
        into_product = _reaches(tensor, lambda t: consumers.get(t.name, []), "MatMul")
        if from_product and into_product:
            found.append(Activation(scores.name, tensor.name, "attention softmax", tensor.layer, tensor.order))
    return found


def fused_activations(model) -> list[str]:
    """One line per node of *model* (an ONNX ModelProto) that computes activations inside itself."""
    return [
        f"{node.op_type} node '{node.name or node.output[0]}' computes {FUSED_ACTIVATIONS[node.op_type]} "
        "inside the op: only its outputs can be observed"
        for node in model.graph.node
        if node.op_type in FUSED_ACTIVATIONS
    ]


def find_activations(tensors: Sequence[TensorInfo]) -> list[Activation]:
    """Every activation of the graph, in forward order."""
    by_name = {t.name: t for t in tensors}
    candidates = []
    for tensor in tensors:
        if tensor.op_type in PATTERN_ENDS and tensor.observable:
            match = _match(tensor, by_name)
            if match is not None:
                source, inside, kind = match
                candidates.append((len(inside), tensor, source, inside, kind))
    covered: set[str] = set()
    found: dict[str, Activation] = {}
    for _, tensor, source, inside, kind in sorted(candidates, key=lambda c: -c[0]):
        if tensor.name in covered:
            continue
        covered |= inside
        found[tensor.name] = Activation(source, tensor.name, kind, tensor.layer, tensor.order)
    for tensor in tensors:
        single = tensor.op_type in ACTIVATION_OPS or tensor.op_type == "Clip"
        if single and tensor.observable and tensor.name not in covered and tensor.inputs:
            found[tensor.name] = Activation(tensor.inputs[0], tensor.name, tensor.op_type, tensor.layer, tensor.order)
    return sorted(found.values(), key=lambda a: a.order)
