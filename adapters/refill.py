"""New weights straight into an optimised graph: which of its initializers copy a parameter, which fold one.

The exporter's optimiser (onnxscript) rewrites the graph of a module: among other things it folds each
BatchNormalization that follows a convolution into that convolution's weight and bias (for a BatchNorm in eval
mode with scale γ, shift β, running mean μ and variance σ², s = γ / √(σ² + ε), the convolution's weight becomes
W·s per output channel and its bias (b − μ)·s + β, with b = 0 when it had none). A model followed through
training keeps its graph and changes its weights at every step; optimising the graph again at every step cost
ResNet-18 0.16 s of a 0.5 s step. :func:`learn_refill` learns once how every float initializer of the optimised
graph comes from the module's state (a parameter copied as it is, a folded weight, a folded bias, or a constant
that no weight changes), and :class:`Refill` then computes them from the state of any later step with NumPy and
puts them into the optimised graph, without the optimiser.

Nothing is assumed about the optimiser: a derivation is kept only when it reproduces the optimiser's tensor bit
for bit, both for the module's weights and for the same weights shifted by random amounts (the optimiser run a
second time on them); the two optimised graphs must have the same structure, and every initializer that no
derivation reproduces must be the same in both (a constant). Otherwise there is no refill and the caller
optimises at every step, as before. A refill that exists gives the optimiser's own bytes: the same arithmetic
on the same float32 values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from layerscope.graph.tensors import structure_fingerprint
from layerscope.graph.weights import MEMORY_FILE, Weights, external_tensors, weight_free
from layerscope.util.lazy import lazy_module

from .export_cache import with_weights

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")

State = Mapping[str, np.ndarray]
#: The random shift added to every float weight for the second optimisation (positive: variances stay valid).
SHIFT = (0.5, 1.0)
_FLOATS = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass(frozen=True)
class Copied:
    """A parameter or buffer as it is: ``state[name]``."""

    name: str

    @property
    def shaped_like(self) -> str:
        """The state entry whose shape the value has."""
        return self.name

    def value(self, state: State) -> np.ndarray:
        return state[self.name]


@dataclass(frozen=True)
class FoldedWeight:
    """A convolution's weight with the BatchNorm after it folded in: ``W · γ / √(σ² + ε)``, the factor taken per
    output channel (the weight's first axis)."""

    weight: str
    gamma: str
    variance: str
    epsilon: float

    @property
    def shaped_like(self) -> str:
        return self.weight

    def value(self, state: State) -> np.ndarray:
        weight = state[self.weight]
        scale = state[self.gamma] / np.sqrt(state[self.variance] + self.epsilon)
        return weight * np.reshape(scale, [-1 if axis == 0 else 1 for axis in range(weight.ndim)])


@dataclass(frozen=True)
class FoldedBias:
    """A convolution's bias with the BatchNorm after it folded in: ``(b − μ) · γ / √(σ² + ε) + β``, with b = 0
    for a convolution without a bias (*bias* None)."""

    bias: str | None
    gamma: str
    beta: str
    mean: str
    variance: str
    epsilon: float

    @property
    def shaped_like(self) -> str:
        return self.mean

    def value(self, state: State) -> np.ndarray:
        mean = state[self.mean]
        scale = state[self.gamma] / np.sqrt(state[self.variance] + self.epsilon)
        bias = state[self.bias] if self.bias is not None else np.zeros_like(mean)
        return (1.0 * bias - mean) * scale + state[self.beta]


Derivation = Copied | FoldedWeight | FoldedBias


@dataclass
class Refill:
    """The weight-free optimised graph of an architecture and how each of its float initializers follows from a
    module's state (name → NumPy array): :meth:`graph` puts a state's values in."""

    #: The optimised graph with its large initializers apart (:func:`weight_free`), as the engine reads it.
    template: onnx.ModelProto
    #: Initializer name → how its value follows from the state (initializers not listed are constants).
    derived: dict[str, Derivation]
    #: Where each large derived initializer lies in the in-memory weights: name → (offset, dtype, shape).
    places: dict[str, tuple[int, np.dtype, tuple[int, ...]]]
    #: Bytes of the in-memory weights, and the constants' bytes in them (written once per buffer).
    size: int
    constants: list[tuple[int, bytes]] = field(default_factory=list)
    #: Index in the template's initializers of each small derived one (kept inside the graph).
    inline: dict[str, int] = field(default_factory=dict)
    #: The optimised graph with its weights, until the first refill was checked against the model.
    optimised: onnx.ModelProto | None = None
    #: The values of the state's other entries the graph reads (integers: not shifted, so taken as fixed).
    fixed: dict[str, np.ndarray] = field(default_factory=dict)

    def fits(self, state: State) -> bool:
        """True when *state* holds the :attr:`fixed` entries at their learnt values (else the graph is optimised
        again)."""
        return all(name in state and np.array_equal(state[name], value) for name, value in self.fixed.items())

    def graph(self, state: State) -> tuple[onnx.ModelProto, Weights]:
        """The optimised graph with *state*'s weights: a copy of the weight-free graph (the small initializers
        in it) and its large initializers in memory where its references point."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.template)
        buffer = bytearray(self.size)
        for offset, data in self.constants:
            buffer[offset : offset + len(data)] = data
        for name, derivation in self.derived.items():
            if name in self.inline:
                tensor = proto.graph.initializer[self.inline[name]]
                tensor.raw_data = np.ascontiguousarray(derivation.value(state), _dtype(tensor)).tobytes()
            else:
                offset, dtype, shape = self.places[name]
                target = np.frombuffer(buffer, dtype, int(np.prod(shape)), offset).reshape(shape)
                target[...] = derivation.value(state)
        return proto, Weights(files={MEMORY_FILE: buffer})

    def full(self, state: State) -> onnx.ModelProto:
        """The optimised graph holding *state*'s weights (for the check of the first refill)."""
        assert self.optimised is not None
        values = {name: np.asarray(d.value(state)) for name, d in self.derived.items()}
        proto = onnx.ModelProto()
        proto.CopyFrom(self.optimised)
        for index, tensor in enumerate(proto.graph.initializer):
            if tensor.name in values:
                proto.graph.initializer[index].CopyFrom(
                    onnx.numpy_helper.from_array(values[tensor.name].astype(_dtype(tensor)), tensor.name)
                )
        return proto


def learn_refill(
    raw: onnx.ModelProto,
    optimised: onnx.ModelProto,
    state: State,
    optimise: Callable[[onnx.ModelProto], onnx.ModelProto],
) -> Refill | None:
    """How each float initializer of *optimised* (the optimisation of the unoptimised graph *raw* holding
    *state*, parameters and buffers by name) follows from the state, found and checked on a second optimisation
    of *raw* with shifted weights (module docstring); None when some initializer is not reproduced."""
    used = {t.name for t in raw.graph.initializer} & set(state)
    floats = {name for name in used if np.issubdtype(state[name].dtype, np.floating)}
    rng = np.random.default_rng(0)
    shifted = {
        name: (state[name] + rng.uniform(*SHIFT, state[name].shape)).astype(state[name].dtype) for name in floats
    }
    swapped = with_weights(raw, shifted, unused=True)
    if swapped is None:
        return None
    second = optimise(swapped)
    if structure_fingerprint(second) != structure_fingerprint(optimised):
        return None
    if [t.name for t in second.graph.initializer] != [t.name for t in optimised.graph.initializer]:
        return None
    candidates = _candidates(raw, floats)
    derived: dict[str, Derivation] = {}
    for tensor, again in zip(optimised.graph.initializer, second.graph.initializer):
        if tensor.data_type not in _FLOATS:
            continue
        value, other = onnx.numpy_helper.to_array(tensor), onnx.numpy_helper.to_array(again)
        found = next(
            (c for c in _ranked(candidates, tensor.name) if _same(c, state, value) and _same(c, shifted, other)),
            None,
        )
        if found is not None:
            derived[tensor.name] = found
        elif not np.array_equal(value, other):
            return None  # changed with the weights, and no derivation reproduces it
    refill = _refill(optimised, derived)
    if refill is not None:
        refill.fixed = {name: np.array(state[name]) for name in used - floats}
    return refill


def _refill(optimised: onnx.ModelProto, derived: dict[str, Derivation]) -> Refill | None:
    """The :class:`Refill` of *optimised* with *derived*: where each derived initializer lies once the graph's
    weights are apart, and the bytes of the others (constants) there."""
    template, weights = weight_free(optimised)
    if MEMORY_FILE not in weights.files:  # a graph of 2 GB or more went to a file: not refilled in memory
        return None
    data = weights.files[MEMORY_FILE]
    places, constants = {}, []
    for tensor, entries in external_tensors(template):
        offset, length = int(entries["offset"]), int(entries["length"])
        if tensor.name in derived:
            places[tensor.name] = (offset, _dtype(tensor), tuple(tensor.dims))
        else:
            constants.append((offset, bytes(data[offset : offset + length])))
    inline = {
        tensor.name: index
        for index, tensor in enumerate(template.graph.initializer)
        if tensor.name in derived and tensor.name not in places
    }
    if any(not template.graph.initializer[index].HasField("raw_data") for index in inline.values()):
        return None  # values kept as typed fields: not rewritten here
    return Refill(template, derived, places, len(data), constants, inline, optimised)


def _candidates(raw: onnx.ModelProto, floats: set[str]) -> list[tuple[str, Derivation]]:
    """What an optimised initializer may be, each with the name the optimiser gives it: every float parameter
    copied; for each BatchNormalization (inference form) right after a Conv whose weight and BatchNorm
    parameters are all parameters, the folded weight and bias (named after the convolution's weight and bias,
    or ``<weight>_bias`` for a convolution without one)."""
    found: list[tuple[str, Derivation]] = [(name, Copied(name)) for name in sorted(floats)]
    producers = {output: node for node in raw.graph.node for output in node.output}
    for node in raw.graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 5:
            continue
        conv = producers.get(node.input[0])
        if conv is None or conv.op_type != "Conv" or len(conv.input) < 2 or not set(node.input[1:]) <= floats:
            continue
        if conv.input[1] not in floats:
            continue
        attributes = {a.name: a for a in node.attribute}
        if "training_mode" in attributes and attributes["training_mode"].i:
            continue
        epsilon = float(attributes["epsilon"].f) if "epsilon" in attributes else 1e-5
        gamma, beta, mean, variance = node.input[1:]
        weight = conv.input[1]
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] in floats else None
        found.append((weight, FoldedWeight(weight, gamma, variance, epsilon)))
        found.append((bias or f"{weight}_bias", FoldedBias(bias, gamma, beta, mean, variance, epsilon)))
        if bias is None and len(conv.input) > 2 and conv.input[2]:
            found.append((conv.input[2], FoldedBias(None, gamma, beta, mean, variance, epsilon)))
    return found


def _ranked(candidates: list[tuple[str, Derivation]], name: str) -> list[Derivation]:
    """*candidates*, those named *name* first."""
    return [c for n, c in candidates if n == name] + [c for n, c in candidates if n != name]


def _same(derivation: Derivation, state: State, value: np.ndarray) -> bool:
    """True when *derivation* computes exactly *value* (type, shape and every bit) from *state*."""
    source = state.get(derivation.shaped_like)
    if source is None or source.shape != value.shape:
        return False
    try:
        with np.errstate(all="ignore"):
            computed = np.asarray(derivation.value(state))
    except (KeyError, ValueError):
        return False
    return computed.dtype == value.dtype and computed.shape == value.shape and computed.tobytes() == value.tobytes()


def _dtype(tensor: onnx.TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))


def module_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A module's ``state_dict()`` as NumPy arrays (views of CPU tensors), the tensors NumPy cannot hold left
    out."""
    arrays = {}
    for name, value in state.items():
        try:
            arrays[name] = value.detach().cpu().numpy()
        except (TypeError, RuntimeError):  # bfloat16 and other types without a NumPy dtype
            continue
    return arrays
