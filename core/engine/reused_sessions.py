"""onnxruntime sessions kept from one training step to the next, their weights replaced in place.

A :class:`layerscope.Monitor` step used to make new sessions for graphs that differ from the last step's
in their weights alone (a session costs milliseconds on a small network, tens of milliseconds on ResNet-18).
:class:`ReusedSessions` keeps each session with the weights it reads: buffers of its own, handed to
onnxruntime as its initializers (prepacking off, so that the kernels read them as they are), and refilled
with the next step's weights when a graph of the same structure comes again.

A kept session runs at onnxruntime's extended optimisation level without prepacking, so that its kernels read
the buffers: the full level's layout transformations (convolutions in blocked layouts) copy the weights when the
session is made. For a graph with more than :data:`KEPT_BYTES` of weights that costs more than making a session
does: ResNet-18 (45 MB, 64 images 64×64, one thread) ran 176 ms a batch in a kept session, against 25 ms to make
a session at the full level and 92 ms to run it. Such graphs get a new session at every step (made as a run makes
its sessions, so that the records are a run's); the small CNN of ``bench_monitor.py`` (0.5 MB: 1.4 ms to make a
session, 2.0 ms against 1.3 ms to run it) keeps its sessions.

Whether onnxruntime reads those buffers at every run or took copies of some weights when it made the
session (a transformation at optimisation time) is not assumed: the first time each kept session is reused,
a new session made the same way from the same weights runs the same batch, and reuse goes on only while the
two give identical tensors; after a difference every step makes its sessions anew, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from layerscope.graph.session import create_session, exposing
from layerscope.graph.tensors import TensorInfo, structure_fingerprint
from layerscope.graph.weights import external_bytes
from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import onnx

    from layerscope.graph.weights import Weights
else:
    onnx = lazy_module("onnx")

#: Graphs with more bytes of weights (in files or memory, apart from the graph) get a new session at every step.
KEPT_BYTES = 4 * 2**20


@dataclass
class _Kept:
    session: Any
    provider: str
    #: The initializer buffers the session reads, refilled in place with each step's weights.
    buffers: dict[str, np.ndarray]
    #: Whether its first reuse was compared with a new session's tensors.
    checked: bool = False


@dataclass
class ReusedSessions:
    """Sessions by graph structure and fetched tensors, kept across steps (module docstring)."""

    kept: dict[tuple, _Kept] = field(default_factory=dict)
    #: None until a first reuse was checked against a new session, then whether every check agreed.
    trusted: bool | None = None
    #: Sessions made so far, and sessions reused.
    made: int = 0
    reused: int = 0

    def session(
        self, model: onnx.ModelProto, tensors: list[TensorInfo], device: str, weights: Weights, shared: bool = False
    ) -> tuple[Any, str, bool]:
        """``(session, provider, check)`` exposing *tensors* of *model* with *weights*: a kept session of a graph
        of the same structure with its buffers refilled, or a new one (kept, unless the graph has more than
        :data:`KEPT_BYTES` of weights, made as a run makes it: with *shared*, the weights shared with the other
        sessions made so from *weights*). *check* asks the caller to compare the session's first run with :meth:`fresh`
        and report with :meth:`checked` (each kept session's first reuse)."""
        if external_bytes(model) > KEPT_BYTES:
            self.made += 1
            with exposing(model, tensors, only=True) as exposed:
                session, provider = create_session(exposed, device, weights, shared)
            return session, provider, False
        key = (structure_fingerprint(model), tuple(t.name for t in tensors), device)
        buffers = _arrays(model, weights)
        kept = self.kept.get(key)
        if kept is not None and self.trusted is not False and _same_layout(kept.buffers, buffers):
            for name, value in buffers.items():
                np.copyto(kept.buffers[name], value)
            self.reused += 1
            return kept.session, kept.provider, not kept.checked
        session, provider = self._make(model, tensors, device, weights, buffers)
        self.kept[key] = _Kept(session, provider, {name: value for name, value in buffers.items()})
        return session, provider, False

    def fresh(self, model: onnx.ModelProto, tensors: list[TensorInfo], device: str, weights: Weights):
        """A new session made as a kept one is, from *weights*, for the check of the first reuse."""
        return self._make(model, tensors, device, weights, _arrays(model, weights))[0]

    def checked(self, session: Any, same: bool) -> None:
        """Record the check of *session*'s first reuse: when its tensors differ from a new session's, no
        session is reused from now on."""
        for kept in self.kept.values():
            if kept.session is session:
                kept.checked = True
        self.trusted = same and self.trusted is not False

    def _make(self, model, tensors, device, weights, buffers):
        self.made += 1
        with exposing(model, tensors, only=True) as exposed:
            return create_session(exposed, device, weights, initializers=buffers)


def _arrays(model: onnx.ModelProto, weights: Weights) -> dict[str, np.ndarray]:
    """Writable copies of *model*'s floating-point initializers, inside the graph or apart from it (the
    buffers a kept session reads: weights change from step to step; integer shapes and indices do not)."""
    return {
        tensor.name: np.array(weights.array(model, tensor.name))
        for tensor in model.graph.initializer
        if np.issubdtype(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)), np.floating)
    }


def _same_layout(kept: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> bool:
    return kept.keys() == new.keys() and all(
        kept[n].shape == new[n].shape and kept[n].dtype == new[n].dtype for n in kept
    )
