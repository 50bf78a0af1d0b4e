"""Adapter for PyTorch models: an ``nn.Module`` (Python API), a ``.pt2`` file saved with
``torch.export.save``, or ``python: "package.module:factory"`` plus ``weights: file.pt``.

Models are exported with torch's default (dynamo) exporter, with a symbolic batch axis
and the node metadata that maps nodes back to module paths. torch is imported only
when a torch model is actually loaded.
"""

from __future__ import annotations

import copy
import importlib
import re
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, model_validator

from layerscope import Adapter, Checkpoint, LoadedModel, hookimpl
from layerscope.data.source import Samples
from layerscope.model.adapter import ModelParams, load_onnx_file
from layerscope.util.errors import ANSI_ESCAPES, UserError, exception_summary
from layerscope.util.files import regular_file
from layerscope.util.lazy import lazy_module

from .checkpoints import CheckpointFiles, checkpoint_files, file_checkpoints
from .export_cache import cached_export, file_digest, state_digest, with_weights
from .quiet import quiet
from .refill import Refill, learn_refill, module_state

if TYPE_CHECKING:
    import onnx
    import torch
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it

#: Node metadata that only bloats the graph (source stack traces, FX text).
_DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _strip_metadata(proto: onnx.ModelProto) -> onnx.ModelProto:
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key not in _DROPPED_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return proto


def export_to_onnx(model, example: Samples | None = None) -> onnx.ModelProto:
    """Export an ``nn.Module`` (traced on *example*, batch axis symbolic) or an ``ExportedProgram``:
    :func:`export_unoptimized` then :func:`optimized`, which is what ``torch.onnx.export`` does."""
    return optimized(export_unoptimized(model, example))


def optimized(raw: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter's own optimisation of an unoptimised export (constant folding — BatchNorm into the
    convolution before it — and fusions): onnxscript's ``optimize_ir`` and ``onnx_fusions.fuse``,
    the two steps ``torch.onnx.export(optimize=True)`` runs."""
    import onnx_ir
    import onnxscript

    with quiet("onnxscript"):
        model = onnx_ir.from_proto(raw)
        onnxscript.optimizer.optimize_ir(model)
        onnxscript.rewriter.onnx_fusions.fuse(model)
        return _strip_metadata(onnx_ir.to_proto(model))


def tracing_inputs(example: Samples):
    """``(args, kwargs, dynamic_shapes)`` to trace a module on *example*: one array is the positional
    argument, a mapping the keyword arguments by input name. Element types are the data's (floats as
    float32, integers as int64: token ids stay ids); the batch axis is symbolic, and so is the second
    axis of integer inputs (the sequence of token ids and masks). A batch of one is doubled, since
    torch.export would specialise a batch axis of size 1."""
    import torch

    def tensor(array) -> torch.Tensor:
        array = np.asarray(array)
        dtype = np.float32 if array.dtype.kind == "f" else np.int64 if array.dtype.kind in "iu" else array.dtype
        value = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))
        return torch.cat([value, value]) if value.shape[0] < 2 else value

    batch = torch.export.Dim("batch")

    def dims(value: torch.Tensor) -> dict:
        sequence = {1: torch.export.Dim.AUTO} if not value.is_floating_point() and value.ndim >= 2 else {}
        return {0: batch, **sequence}

    if isinstance(example, Mapping):
        kwargs = {name: tensor(array) for name, array in example.items()}
        return (), kwargs, {name: dims(value) for name, value in kwargs.items()}
    value = tensor(example)
    return (value,), {}, (dims(value),)


def _check_arguments(model, args: tuple, kwargs: dict) -> None:
    """A user error when the data's inputs do not fit the module's ``forward`` (a missing or unknown
    argument), naming both."""
    import inspect

    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # no signature to check against
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        given = ", ".join(kwargs) if kwargs else "one array"
        raise UserError(
            f"model.source: the data's inputs ({given}) do not fit the model's forward{signature}: {error}"
        ) from None


@contextmanager
def _for_tracing(model):
    """*model* as it predicts, for the block: in eval mode (dropout off, BatchNorm on its running
    statistics) and, for a Hugging Face decoder, with ``config.use_cache`` off (it would return a
    key/value cache object, which the exporter cannot flatten and an analysis never reads). Each
    module's own mode and the configuration are restored afterwards: a model in the middle of its
    training keeps training."""
    import torch

    modes = [(module, module.training) for module in model.modules()] if isinstance(model, torch.nn.Module) else []
    config: Any = getattr(model, "config", None)  # a Hugging Face model's configuration object
    cached = getattr(config, "use_cache", None)
    if cached:
        config.use_cache = False
    if modes:
        model.eval()
    try:
        yield model
    finally:
        if cached:
            config.use_cache = cached
        for module, training in modes:
            module.training = training


#: A model whose parameters and buffers take more bytes is exported straight into a file (:func:`export_large`).
LARGE_MODEL_BYTES = 2**30


def _weight_bytes(model) -> int:
    """Bytes of the parameters and buffers of a module or ``ExportedProgram``."""
    state = model.state_dict() if callable(getattr(model, "state_dict", None)) else getattr(model, "state_dict", {})
    return sum(value.numel() * value.element_size() for value in state.values())


def export_unoptimized(model, example: Samples | None = None) -> onnx.ModelProto:
    """The graph ``torch.onnx.export`` traces, before optimisation: its initializers are the model's
    parameters and buffers under their own names (what :func:`.export_cache.with_weights` swaps)."""
    return _strip_metadata(_program(model, example).model_proto)


def export_large(model, example: Samples | None, target: Path) -> None:
    """Export *model* to the file *target* with its weights in a file beside it, without ever holding an
    ONNX copy of them: the exporter's graph refers to the module's own tensors, is optimised as
    ``torch.onnx.export`` does, and is written tensor by tensor (a 1.1B-parameter model would otherwise
    be held three times: the module, the unoptimised graph, the optimised one)."""
    program = _program(model, example)
    with quiet("torch", "torch.onnx", "onnxscript"):
        program.optimize()
    for node in program.model.graph.all_nodes():
        for key in _DROPPED_METADATA:
            node.metadata_props.pop(key, None)
    program.save(str(target), external_data=True)


def _program(model, example: Samples | None):
    """The ``ONNXProgram`` of ``torch.onnx.export`` for *model* traced on *example*, unoptimised.

    When the exporter's own decomposition of the traced program fails (T5's attention, for one), the
    program is decomposed with torch's default table instead and converted again; the graph then
    holds the same computation in smaller ops, with the same module paths.
    """
    import torch

    args, kwargs, dynamic_shapes = (), {}, None
    if isinstance(model, torch.nn.Module):
        if example is None:
            raise UserError("model.source: exporting a torch module needs example inputs; give a spec with data")
        args, kwargs, dynamic_shapes = tracing_inputs(example)
        _check_arguments(model, args, kwargs)
    try:
        with quiet("torch", "torch.onnx", "torch.export", "onnxscript"), _for_tracing(model):
            try:
                program = torch.onnx.export(
                    model,
                    args,
                    kwargs=kwargs,
                    dynamo=True,
                    dynamic_shapes=dynamic_shapes,
                    external_data=False,
                    verbose=False,
                    optimize=False,
                )
            except Exception as error:
                if "Failed to decompose" not in str(error) or not isinstance(model, torch.nn.Module):
                    raise
                decomposed = torch.export.export(
                    model, args, kwargs, dynamic_shapes=dynamic_shapes
                ).run_decompositions()
                program = torch.onnx.export(decomposed, dynamo=True, external_data=False, verbose=False, optimize=False)
    except Exception as error:
        raise UserError(
            f"model.source: torch.onnx.export could not export the model: {export_failure(error)}; "
            "change the model so that torch.export can trace it, or export it to ONNX yourself and "
            "give the .onnx file"
        ) from None
    return program


def export_failure(error: BaseException) -> str:
    """The cause of a failed export in one line: the innermost exception's type and first line, and the
    user's code it names (torch reports it as 'File "…", line N, in f' followed by the line)."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in ANSI_ESCAPES.sub("", str(root)).splitlines() if line.strip()]
    summary = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    frames = [
        (index, match)
        for index, line in enumerate(lines)
        if (match := re.match(r'File "(.+)", line (\d+), in (\S+)', line))
    ]
    if frames:
        index, match = frames[-1]
        code = f": {lines[index + 1]}" if index + 1 < len(lines) else ""
        summary += f" (at {match.group(1)}:{match.group(2)} in {match.group(3)}{code})"
    return summary


def _weights_key(spec, weights: str | None) -> str:
    """The spec key that names the weights file *weights*: ``weights``, or an entry of ``checkpoints``."""
    section = spec.model
    if section is not None and section.get("weights") == weights:
        return "model.weights"
    return "model.checkpoints" if section is not None else "models"


def _load_factory(reference: str, weights: str | None, spec):
    """Import ``package.module:factory`` (spec folder on the path), call it, load *weights* safely."""
    import torch

    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise UserError(f"model.python: '{reference}' must look like 'package.module:factory'")
    sys.path.insert(0, str(spec.base_dir))
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module raised while importing (or is missing)
        raise UserError(f"model.python: importing '{module_name}' failed: {exception_summary(error)}") from None
    finally:
        sys.path.remove(str(spec.base_dir))
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UserError(f"model.python: '{module_name}' has no function '{attribute}'")
    try:
        model = factory()
    except Exception as error:
        raise UserError(f"model.python: calling '{reference}' failed: {exception_summary(error)}") from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model.python: '{reference}' returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        key = _weights_key(spec, weights)
        path = regular_file(spec.resolve_path(weights), key)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as error:
            raise UserError(f"{key}: cannot load {path} into '{reference}': {_load_failure(error)}") from None
    return model


def _load_failure(error: Exception) -> str:
    """Why ``torch.load`` or ``load_state_dict`` failed, in one line. A file that does not load as tensors
    alone gives torch's unpickler's reason, not torch's advice to load it with ``weights_only=False`` (which
    runs the code a file holds: never done here)."""
    text = ANSI_ESCAPES.sub("", str(error))
    if "Weights only load failed" in text:
        reason = text.partition("WeightsUnpickler error:")[2].strip().split("\n\n")[0].strip()
        reason = reason.split(". Please use")[0]
        return f"it is not a file of tensors alone ({' '.join(reason.split()) or type(error).__name__})"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _load_pt2(path: Path):
    import torch

    regular_file(path, "model.source")
    try:
        return torch.export.load(str(path))
    except Exception as error:
        raise UserError(f"model.source: {path} is not a torch.export program: {error}") from None


def _is_torch_object(source) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(source, (torch.nn.Module, torch.export.ExportedProgram))


class TorchParams(ModelParams):
    python: str | None = Field(
        None,
        description="'package.module:factory' (relative to the spec's folder) "
        "returning a torch.nn.Module; also written "
        "source: python:package.module:factory",
    )
    weights: str | None = Field(
        None, description="a state_dict file for the python: factory, loaded with weights_only=True"
    )
    checkpoints: CheckpointFiles = checkpoint_files(".pt / .pth state_dict (with python:) or .pt2")

    @model_validator(mode="after")
    def _python_from_source(self) -> TorchParams:
        if self.python is None and isinstance(self.source, str) and self.source.startswith("python:"):
            self.python = self.source.removeprefix("python:")
        if self.weights and not self.python:
            raise ValueError("weights: needs python: (the factory whose model the weights are loaded into)")
        return self


class TorchAdapter(Adapter[TorchParams]):
    """PyTorch models (an nn.Module from Python, a .pt2 file, or a python: factory with weights), exported to ONNX."""

    name = "torch"
    Params = TorchParams

    def __init__(self):
        self._graphs: dict[tuple, onnx.ModelProto] = {}  # an unoptimised graph per architecture and input shape
        self._checked: set[tuple] = set()  # architectures whose swapped graph reproduced a followed model
        # per followed architecture, once learnt: how its optimised graph's weights follow from the module's
        # state, or None when they could not be learnt or the first refill did not reproduce the model
        self._refills: dict[tuple, Refill | None] = {}

    def claims(self, section) -> bool:
        source = section.source
        if isinstance(source, str):
            return source.endswith(".pt2") or source.startswith("python:")
        return section.get("python") is not None if source is None else _is_torch_object(source)

    def checkpoints(self, section: TorchParams, spec) -> list[Checkpoint]:
        if isinstance(section.source, str) and section.source.endswith(".pt2"):
            if section.checkpoints:
                return file_checkpoints(section.checkpoints, spec, (".pt2",))
            return [Checkpoint(Path(section.source).stem, spec.resolve_path(section.source))]
        if section.python and section.checkpoints:
            return [
                Checkpoint(c.label, (section.python, str(c.ref)), c.step)
                for c in file_checkpoints(section.checkpoints, spec, (".pt", ".pth"))
            ]
        if section.python:
            return [
                Checkpoint(
                    Path(section.weights).stem if section.weights else "model", (section.python, section.weights)
                )
            ]
        return [Checkpoint("model", section.source)]

    def load(self, checkpoint: Checkpoint, spec, example) -> LoadedModel:
        """Export the checkpoint once: from the export cache, by swapping its weights into the graph of
        an earlier checkpoint of the same factory, or by exporting it (see :mod:`.export_cache`)."""
        ref = checkpoint.ref
        if isinstance(ref, tuple):
            model, source = _load_factory(ref[0], ref[1], spec), f"python:{ref[0]}" + (f" + {ref[1]}" if ref[1] else "")
        elif isinstance(ref, Path):
            model, source = _load_pt2(ref), str(ref)
        else:
            model, source = ref, f"<{type(ref).__name__}>"
        path = cached_export(
            _export_key(model, ref, example),
            lambda target: self._export_to(model, ref, example, target),
            {"source": source, "class": type(model).__name__},
        )
        proto, weights = load_onnx_file(path)
        return LoadedModel(proto, checkpoint.label, source, framework="pytorch", weights=weights)

    def _export_to(self, model, ref, example, target: Path) -> None:
        """Export *model* into the file *target*: a large model straight from the exporter, its weights
        in a file beside it (:func:`export_large`); a smaller one through :meth:`_export`, which can reuse
        the graph of an earlier checkpoint."""
        if _weight_bytes(model) > LARGE_MODEL_BYTES:
            export_large(model, example, target)
        else:
            onnx.save_model(self._export(model, ref, example), str(target))

    def follow(self, model, label: str, spec, example) -> LoadedModel:
        """The live *model*'s current weights in the graph exported for it at the first call. The second call
        swaps them into the unoptimised graph by parameter name and optimises it (10 ms for the demo CNN,
        0.16 s for ResNet-18, against 0.7 s and more for an export), and learns how every weight of the
        optimised graph follows from the module's state (:mod:`.refill`: copied, or BatchNorm folded into the
        convolution before it); later calls compute the optimised graph's weights from the state with NumPy
        and skip the optimiser. Nothing is written to the export cache: a training run's weights are seen once.
        The first swap and the first refill are checked against the model with onnxruntime; a model whose
        graph does not take its weights by name is exported again at every call. A model on a GPU is exported
        from a CPU copy; the model's train/eval mode is left as it was."""
        import torch

        if not isinstance(model, torch.nn.Module):
            return super().follow(model, label, spec, example)
        training = model.training
        try:
            on_cpu = model if all(p.device.type == "cpu" for p in model.parameters()) else copy.deepcopy(model).cpu()
            architecture = (id(type(model)), repr(example_signature(example)))
            refilled = self._refilled(architecture, on_cpu, example, label)
            if refilled is not None:
                return refilled
            proto = self._swapped(architecture, on_cpu, example, check=architecture not in self._checked)
            if proto is not None:
                self._checked.add(architecture)
                if architecture not in self._refills:
                    state = module_state(on_cpu.state_dict())
                    self._refills[architecture] = learn_refill(self._graphs[architecture], proto, state, optimized)
            else:
                raw = export_unoptimized(on_cpu, example)
                self._graphs[architecture] = raw
                proto = optimized(raw)
        finally:
            model.train(training)
        return LoadedModel(proto, label, f"<{type(model).__name__}>", framework="pytorch")

    def _export(self, model, ref, example) -> onnx.ModelProto:
        """The optimised graph of *model*: its weights swapped into the unoptimised graph of an earlier
        checkpoint of the same factory and input shape, optimised and checked against the model with
        onnxruntime; or, failing that, a new trace."""
        architecture = (ref[0] if isinstance(ref, tuple) else id(type(model)), repr(example_signature(example)))
        if not isinstance(ref, Path):
            proto = self._swapped(architecture, model, example, check=True)
            if proto is not None:
                return proto
        raw = export_unoptimized(model, example)
        self._graphs.setdefault(architecture, raw)
        return optimized(raw)

    def _refilled(self, architecture: tuple, model, example, label: str) -> LoadedModel | None:
        """*model*'s weights computed into the optimised graph of *architecture* (see :meth:`follow`), its large
        weights apart, or None when there is no refill for it, or the first refill does not reproduce the model,
        or an integer buffer the graph reads changed (the architecture is then optimised at every call)."""
        refill = self._refills.get(architecture)
        if refill is None:
            return None
        state = module_state(model.state_dict())
        first = refill.optimised is not None  # the first refill is checked against the model itself
        if not refill.fits(state) or (first and not _same_outputs(refill.full(state), model, example)):
            self._refills[architecture] = None
            return None
        refill.optimised = None
        proto, weights = refill.graph(state)
        return LoadedModel(proto, label, f"<{type(model).__name__}>", framework="pytorch", weights=weights)

    def _swapped(self, architecture: tuple, model, example, check: bool) -> onnx.ModelProto | None:
        """*model*'s weights in the unoptimised graph exported earlier for *architecture*, optimised; None
        when there is none, when the graph does not hold the weights by name, or (with *check*) when the
        result does not reproduce the model."""
        if architecture not in self._graphs:
            return None
        swapped = with_weights(self._graphs[architecture], model.state_dict(), unused=True)
        if swapped is None:
            return None
        proto = optimized(swapped)
        return proto if not check or _same_outputs(proto, model, example) else None


def _same_outputs(proto: onnx.ModelProto, model, example: Samples) -> bool:
    """True when *proto* computes what *model* does on *example* (1e-4 relative), checked with
    onnxruntime: a swapped graph is used only when it reproduces the model."""
    import onnxruntime as ort
    import torch

    try:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        args, kwargs, _ = tracing_inputs(example)
        feeds = (
            {name: v.numpy() for name, v in kwargs.items()}
            if kwargs
            else {i.name: v.numpy() for i, v in zip(session.get_inputs(), args)}
        )
        got = session.run(None, feeds)
        with torch.no_grad(), _for_tracing(model):
            expected = torch.utils._pytree.tree_leaves(model(*args, **kwargs))
        return len(got) == len(expected) and all(
            np.allclose(g, e.numpy(), rtol=1e-4, atol=1e-5) for g, e in zip(got, expected)
        )
    except Exception:
        return False


def example_signature(example: Samples | None) -> list | None:
    """What an export depends on in the example: each input's name, element kind and sample shape."""
    if example is None:
        return None
    named = example.items() if isinstance(example, Mapping) else [(None, example)]
    return [[name, np.asarray(a).dtype.kind, list(np.shape(a)[1:])] for name, a in named]


def _export_key(model, ref, example) -> dict | None:
    """What an export depends on (None: unknown, do not cache): the ``.pt2`` file, or the module tree
    (its ``repr``), the source files of every module class in it and of the ``python:`` factory,
    and the weights; the example's inputs (:func:`example_signature`); the versions of torch and layerscope."""
    import inspect

    import torch

    from layerscope import __version__

    structure: str | list[str]
    if isinstance(ref, Path):
        digests, structure = [file_digest(ref)], "torch.export program"
    else:
        try:
            files = {inspect.getsourcefile(type(module)) for module in model.modules()}
        except TypeError:  # a class without a source file (defined interactively)
            return None
        if isinstance(ref, tuple):
            files.add(getattr(sys.modules.get(ref[0].partition(":")[0]), "__file__", None))
        digests = [file_digest(f) for f in sorted(files, key=str)]
        structure = [repr(model), state_digest(model.state_dict())]
    if any(digest is None for digest in digests):
        return None
    return {
        "layerscope": __version__,
        "torch": torch.__version__,
        "code": digests,
        "model": structure,
        "inputs": example_signature(example),
    }


@hookimpl
def register_adapters(register):
    register(TorchAdapter)
