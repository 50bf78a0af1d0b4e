"""Exporting a model once: a cache of exports on disk, and new weights swapped into an exported graph.

Exporting a PyTorch model to ONNX takes seconds (2.7–6 s for ResNet-sized models). The
exported graph of a model depends only on its code, its weights and the shape of its input,
so :func:`cached_export` keeps every export under ``$LAYERSCOPE_CACHE/exports/`` (default
``~/.cache/layerscope``) keyed by a hash of those: a second run of the same spec reads the
graph instead of exporting it. The code is identified by the module tree (its ``repr``) and
the source files of every module class in it and of the ``python:`` factory; a change to a
helper function in another file is not seen, so ``LAYERSCOPE_EXPORT_CACHE=0`` turns the
cache off.

Checkpoints of one architecture share a graph: :func:`with_weights` puts a checkpoint's
weights into the graph exported for another, by initializer name. That is only right when
the graph holds every parameter and buffer as an initializer of its own name and shape and
nothing derived from them — true of an unoptimised export, not of an optimised one
(BatchNorm folded into a convolution renames nothing but changes the convolution's
weights): :func:`with_weights` refuses a graph holding large float constants it does not
know, and the torch adapter swaps into the unoptimised graph and optimises afterwards (a model
followed through training has its optimised graph's weights computed from the module's after
the second step: :mod:`.refill`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from layerscope.util.cache import ABOUT_FILE
from layerscope.util.files import cache_dir, mark_used, scratch_folder
from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import onnx
    import torch
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it

SMALL_CONSTANT = 16  # elements: initializers up to this size may be the exporter's own constants


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: str | os.PathLike | None) -> str | None:
    """sha256 of a file's bytes (None when there is no readable file)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    except OSError:
        return None


EXPORT_FILE = "model.onnx"  # in an export's folder, its weights beside it when they are large


def cached_export(
    key: Mapping[str, object] | None, export: Callable[[Path], None], about: Mapping[str, str] | None = None
) -> Path:
    """The ONNX file of an export: ``export(path)`` writes it (its weights inside it, or for a large model
    in a file beside it). With a *key* (everything the graph depends on) the export lies in the cache,
    ``exports/<hash of key>/``, with *about* (what was exported: ``source``, ``class``) in its
    ``about.json`` for ``layerscope cache``, and a later run reads it back, marking it used; *key* None (or
    ``LAYERSCOPE_EXPORT_CACHE=0``) exports into a folder of this process's scratch space, removed when it
    ends. A run reads the file's graph and leaves the weights in it
    (:func:`layerscope.model.adapter.load_onnx_file`)."""
    if key is None or os.environ.get("LAYERSCOPE_EXPORT_CACHE", "1") == "0":
        folder = scratch_folder("export")
        export(folder / EXPORT_FILE)
        return folder / EXPORT_FILE
    name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    entry = cache_dir() / "exports" / name
    if (entry / EXPORT_FILE).is_file():
        mark_used(entry)
        return entry / EXPORT_FILE
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        writing = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=entry.parent))
    except OSError:  # a read-only cache costs every run an export, nothing else
        writing = scratch_folder("export")
    export(writing / EXPORT_FILE)
    if about:
        (writing / ABOUT_FILE).write_text(json.dumps(dict(about)), encoding="utf-8")
    try:
        writing.rename(entry)  # the whole export appears at once; a concurrent run's equal export may win
    except OSError:
        return (entry if (entry / EXPORT_FILE).is_file() else writing) / EXPORT_FILE
    return entry / EXPORT_FILE


def with_weights(
    proto: onnx.ModelProto, state: Mapping[str, torch.Tensor | np.ndarray], unused: bool = False
) -> onnx.ModelProto | None:
    """A copy of *proto* whose initializers take the values in *state* (parameters and buffers by name,
    torch tensors or NumPy arrays), or None when the graph does not hold *state* one-to-one: a tensor
    of *state* reshaped or (unless *unused*: an unoptimised export leaves out the buffers the forward
    never reads) missing, or a float initializer larger than a constant that is not in *state* (what
    folding leaves). With *unused*, a graph folded under the original names would pass: use it on
    unoptimised graphs only."""
    initializers = {i.name: i for i in proto.graph.initializer}
    for name, value in state.items():
        found = initializers.get(name)
        if (found is None and not unused) or (found is not None and tuple(found.dims) != tuple(value.shape)):
            return None
    for name, initializer in initializers.items():
        floating = initializer.data_type in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.DOUBLE,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.BFLOAT16,
        )
        if floating and name not in state and int(np.prod(initializer.dims)) > SMALL_CONSTANT:
            return None
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for index, initializer in enumerate(copy.graph.initializer):
        if initializer.name in state:
            value = state[initializer.name]
            value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            copy.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(value, initializer.name))
    return copy
