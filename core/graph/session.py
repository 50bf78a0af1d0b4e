"""onnxruntime sessions: provider choice and exposing the tensors a run fetches.

``device: auto`` asks for CUDA only when the CUDA provider is built in and an NVIDIA
device is present; the provider that really runs is read back from the session (an
onnxruntime-gpu wheel lists CUDA as available even on a CPU-only machine).
"""

from __future__ import annotations

import functools
import glob
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import onnx

from layerscope.util.errors import UserError

from .tensors import TensorInfo
from .weights import Weights

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
THREADS: int | None = None  # onnxruntime intra-op threads (set in worker processes); None: its default


def _nvidia_device_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or bool(glob.glob("/dev/dxg"))


def requested_providers(device: str) -> list[str]:
    import onnxruntime as ort

    cuda_built = CUDA in ort.get_available_providers()
    if device == "cuda" or (device == "auto" and cuda_built and _nvidia_device_present()):
        return [CUDA, CPU] if cuda_built else [CPU]
    return [CPU]


@contextmanager
def exposing(model: onnx.ModelProto, tensors: Iterable[TensorInfo], only: bool = False) -> Iterator[onnx.ModelProto]:
    """*model* whose graph outputs include *tensors* (dtype/shape from inference) while the block runs;
    its own outputs are put back afterwards. The graph is changed in place, not copied: a copy would
    duplicate every weight of the model for each session made from it.

    With ``only=True`` the graph outputs are exactly *tensors*: onnxruntime then neither
    computes what they do not depend on nor holds buffers for the model's own outputs.
    """
    outputs = model.graph.output
    saved = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in outputs]
    tensors = list(tensors)
    try:
        if only:
            wanted = {t.name for t in tensors}
            kept = [o for o in saved if o.name in wanted]
            del outputs[:]
            outputs.extend(kept)
        present = {o.name for o in outputs} | {i.name for i in model.graph.input}
        for info in tensors:
            if info.name in present:
                continue
            elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
            outputs.append(onnx.helper.make_tensor_value_info(info.name, elem_type, info.shape))
            present.add(info.name)
        yield model
    finally:
        del outputs[:]
        outputs.extend(saved)


@functools.cache
def _onnxruntime_ops() -> dict[tuple[str, str], int]:
    """(domain, op type) → the first opset version of the domain at which onnxruntime knows the op: ONNX's
    operators (domain ``""``) and onnxruntime's own (``com.microsoft`` …), from its operator registry."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    first: dict[tuple[str, str], int] = {}
    for schema in get_all_operator_schema():
        key = (schema.domain, schema.name)
        first[key] = min(first.get(key, schema.since_version), schema.since_version)
    return first


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of *graph*, those of ``If``/``Loop``/``Scan`` bodies included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for body in [*attribute.graphs, *([attribute.g] if attribute.HasField("g") else [])]:
                yield from _nodes(body)


def unknown_ops(model: onnx.ModelProto) -> list[str]:
    """The op types of *model* that onnxruntime does not know at the model's opset of their domain (an op a
    converter left under its framework's name, such as TensorFlow's ``Erfc``), each as ``Erfc (domain
    ai.onnx, opset 17; 1 node: 'model/gelu/Erfc')``; empty when onnxruntime knows every op. Ops defined by
    the model's own functions are known."""
    known = _onnxruntime_ops()
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    defined = {(f.domain, f.name) for f in model.functions}
    missing: dict[tuple[str, str], list[str]] = {}
    for node in _nodes(model.graph):
        domain = "" if node.domain == "ai.onnx" else node.domain
        since = known.get((domain, node.op_type))
        if (domain, node.op_type) not in defined and (since is None or since > opsets.get(domain, 0)):
            missing.setdefault((domain, node.op_type), []).append(node.name or node.output[0])
    return [
        f"{op} (domain {domain or 'ai.onnx'}, opset {opsets.get(domain, 'not imported')}; "
        f"{len(nodes)} node{'s' if len(nodes) > 1 else ''}: '{nodes[0]}'{', …' if len(nodes) > 1 else ''})"
        for (domain, op), nodes in missing.items()
    ]


def check_runnable(model: onnx.ModelProto) -> None:
    """Raise a :class:`UserError` naming the ops of *model* that onnxruntime cannot run (:func:`unknown_ops`),
    before anything else reads the graph: ONNX shape inference leaves every tensor after such an op untyped,
    so that selectors would find nothing to select."""
    import onnxruntime as ort

    unknown = unknown_ops(model)
    if unknown:
        raise UserError(f"onnxruntime {ort.__version__} cannot run the model: it has no op {', '.join(unknown)}")


_SHARED_ARENA: list[bool] = []


def _use_shared_cpu_arena(options) -> None:
    """Make the session allocate CPU memory from one arena shared by every session of the process.

    Fetch groups run one session each; with private arenas every session would keep its
    own high-water mark of intermediate buffers.
    """
    import onnxruntime as ort

    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # grow exactly as requested from a 64 KiB first chunk, so the arena tracks what a
        # budgeted run really holds (power-of-two growth overshot by ~0.3 MiB on the demo CNN)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, 65536, -1))
        _SHARED_ARENA.append(True)
    options.add_session_config_entry("session.use_env_allocators", "1")


def create_session(
    model: onnx.ModelProto,
    device: str,
    weights: Weights | None = None,
    shared: bool = False,
    initializers: dict[str, np.ndarray] | None = None,
    optimised: bool = False,
):
    """An ``InferenceSession`` for *model* on *device*; returns (session, provider that runs).

    *weights* says where the initializers that *model* references lie (:mod:`layerscope.graph.weights`):
    onnxruntime reads them from there, so the session is made from the graph's bytes alone. With *shared*,
    the sessions made from the same *weights* use one copy of them (:meth:`Weights.share`): a run that
    needs a session per fetch group holds the model once, not once per group. *initializers* (name →
    array) are buffers of the caller's that the session reads as those initializers, prepacking off: the
    caller may refill them in place (:mod:`layerscope.engine.reused_sessions`); such a session's graph is
    optimised up to onnxruntime's extended level, whose transformations keep reading the buffers. *optimised*:
    the graph is onnxruntime's own optimised form already (:mod:`.optimised_graph`), run as it is.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    values = weights.share(model, options) if weights is not None and shared else []
    if weights is not None and not shared:
        weights.configure(options)
    if initializers:
        values = [(name, ort.OrtValue.ortvalue_from_numpy(array)) for name, array in initializers.items()]
        for name, value in values:
            options.add_initializer(name, value)
        options.add_session_config_entry("session.disable_prepacking", "1")
        # the layout transformations of ORT_ENABLE_ALL copy convolution weights at start (they read them
        # from the graph's references, not from the buffers given): the extended level keeps reading them
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    _use_shared_cpu_arena(options)
    # Memory patterns pre-allocate one block per session and run; with a session per fetch
    # group that raised the peak by ~1 MiB on the demo CNN (tests/benchmarks/bench_runner.py).
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    if THREADS:
        options.intra_op_num_threads = THREADS
    ort.set_default_logger_severity(4)  # a missing CUDA library is reported by us, not as an ORT error dump
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=requested_providers(device))
    except Exception as error:
        hint = (
            " (the execution provider has no kernel for that op and element type)"
            if "NOT_IMPLEMENTED" in str(error)
            else ""
        )
        raise UserError(f"onnxruntime cannot run the model: {error}{hint}") from None
    finally:
        ort.set_default_logger_severity(2)
    session.layerscope_shared_initializers = values  # onnxruntime does not own them: they live with the session
    provider = session.get_providers()[0]
    if device == "cuda" and CUDA not in ort.get_available_providers():
        raise UserError(
            "runtime.device: cuda was requested but the installed onnxruntime has no CUDA provider (the CPU "
            "build, the onnxruntime package): pip uninstall -y onnxruntime && pip install onnxruntime-gpu, "
            "or use device: auto or cpu"
        )
    if device == "cuda" and provider != CUDA:
        raise UserError(
            "runtime.device: cuda was requested but onnxruntime could not start its CUDA provider "
            "on this machine (use device: auto or cpu)"
        )
    return session, provider
