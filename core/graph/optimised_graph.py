"""Several fetch groups' sessions from one onnxruntime-optimised graph, holding the model's weights once.

A run whose tensors do not fit its memory budget in one fetch fetches them in groups, a session each
(:mod:`layerscope.engine.runner`). The initializers those sessions read are shared
(:meth:`~layerscope.graph.weights.Weights.share`), but onnxruntime's full optimisation writes new ones of
its own in every session: on x86 its NCHWc layout transformation stores each convolution's weights again,
reordered, so a ResNet-50 session held 97 MiB more than its graph, once per group (485 MiB at five groups).
Here the model is optimised once, with every tensor of every group exposed, and saved with its
initializers in a file (``optimized_model_filepath``); each group's session then runs that graph as it is
(no optimisation), cut down to the nodes its own tensors need, and reads the saved initializers from one
shared mapping of the file. The graph the groups run is the one a single session exposing all of them
would run, and a group's session computes only its part; their tensors equal those of a session per group
bit for bit. Shared weights are not prepacked, so MatMul/Gemm layers carry other float32 round-off than in
a one-group run, which prepacks them (documented in the models guide).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from layerscope.util.files import scratch_folder
from layerscope.util.lazy import lazy_module

from .session import CPU, create_session, exposing
from .tensors import TensorInfo
from .weights import INLINE_BYTES, Weights, weight_free

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")


def _inputs(node: onnx.NodeProto) -> Iterable[str]:
    """The names *node* reads: its inputs, and those its ``If``/``Loop``/``Scan`` bodies read from outside."""
    yield from node.input
    for attribute in node.attribute:
        for body in [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]:
            for inner in body.node:
                yield from _inputs(inner)


def restricted(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of *model* whose graph outputs are *outputs* (graph outputs of *model*), with only the nodes
    and initializers they depend on (the nodes are in topological order, as ONNX requires; an initializer
    that an older model also lists as a graph input leaves the inputs with it)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    wanted = set(outputs)
    needed = set(wanted)
    nodes = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            nodes.append(node)
            needed.update(name for name in _inputs(node) if name)
    unused = {tensor.name for tensor in graph.initializer} - needed
    kept = {
        "output": [o for o in graph.output if o.name in wanted],
        "node": nodes[::-1],
        "initializer": [t for t in graph.initializer if t.name not in unused],
        "input": [i for i in graph.input if i.name not in unused],
    }
    for field, values in kept.items():
        del getattr(graph, field)[:]
        getattr(graph, field).extend(values)
    return copy


#: A scratch folder of this module untouched for this long was left by a process that was killed: a live
#: one is written to while its graph is saved and removed as soon as the sessions are made.
STALE_SECONDS = 600


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's
        return True
    return True


def remove_stale_folders() -> None:
    """Remove the scratch folders that killed processes left in the temporary folder (each as large as a
    model's weights): those whose newest file was last written over :data:`STALE_SECONDS` ago, unless the
    process that made them (its ``owner`` file) still runs, optimising a very large model."""
    for folder in Path(tempfile.gettempdir()).glob("layerscope-optimised-*"):
        try:
            newest = max([folder.stat().st_mtime, *(entry.stat().st_mtime for entry in folder.iterdir())])
            owner = folder / "owner"
            alive = owner.exists() and _running(int(owner.read_text() or 0))
        except (OSError, ValueError):  # gone meanwhile, another user's, or not ours
            continue
        if time.time() - newest > STALE_SECONDS and not alive:
            shutil.rmtree(folder, ignore_errors=True)


class OptimisedGraph:
    """*model* (weights in *weights*) as onnxruntime's CPU provider optimises it with every tensor of
    *tensors* exposed, saved in a scratch folder; :meth:`session` makes a session fetching some of them."""

    def __init__(self, model: onnx.ModelProto, tensors: Sequence[TensorInfo], weights: Weights):
        remove_stale_folders()
        self.folder = scratch_folder("optimised")
        try:
            (self.folder / "owner").write_text(str(os.getpid()))
            self._save(model, tensors, weights)
        except BaseException:
            self.release_folder()  # what was written of a graph that could not be saved
            raise

    def _save(self, model: onnx.ModelProto, tensors: Sequence[TensorInfo], weights: Weights) -> None:
        """Optimise *model* with *tensors* exposed into this folder, and read back the graph apart from its
        weights."""
        import onnxruntime as ort

        saved = self.folder / "model.onnx"
        options = ort.SessionOptions()
        weights.configure(options)
        options.optimized_model_filepath = str(saved)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", str(INLINE_BYTES)
        )
        options.intra_op_num_threads = 1  # this session never runs: one thread, nothing prepacked
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.log_severity_level = 3  # its warning that the saved graph suits this machine only: it does
        with exposing(model, tensors, only=True) as exposed:
            ort.InferenceSession(exposed.SerializeToString(), options, providers=[CPU])
        self.graph, self.weights = weight_free(Path(saved))

    def session(self, names: Sequence[str]):
        """A CPU session of the optimised graph fetching *names*; returns (session, provider), as
        :func:`~layerscope.graph.session.create_session` does."""
        return create_session(restricted(self.graph, names), "cpu", self.weights, shared=True, optimised=True)

    def release_folder(self) -> None:
        """Remove the saved files once every session is made: the sessions read the weights through mappings
        that outlive the files' names (else the folder goes when the process ends)."""
        shutil.rmtree(self.folder, ignore_errors=True)
