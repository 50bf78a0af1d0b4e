"""Tensors on demand: the tensors a selector picks, for every sample of the data, as named arrays.

:func:`trace_tensors` runs the model as an analysis does (the checkpoint loaded and checked, the
tensors fetched by the runner in groups within ``runtime.memory_budget``) and copies each fetched
part into one array per tensor, the samples on axis 0 in data order. In memory (``layerscope.trace``)
the arrays count against the budget: a trace that would exceed it is refused before the model runs
past its first batch, naming the bytes it needs. On disk (``layerscope trace --out``) they are
memory-mapped files written as the parts come, so a trace larger than memory holds only the runner's
fetch groups; :func:`write_npz` then packs them into one ``.npz``.
"""

from __future__ import annotations

import itertools
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from layerscope.data.source import iter_batches, sample_count
from layerscope.graph.selectors import Selection, resolve
from layerscope.util.errors import UserError
from layerscope.util.files import atomic_path
from layerscope.util.units import format_bytes

from .checkpoint_run import ShardWorker
from .plan import RunPlan
from .progress import Progress
from .runner import Runner, to_numpy

#: The .npz entries beside the tensors: rows of (tensor name, layer label), and the traced samples' indices.
LAYERS_KEY, SAMPLES_KEY = "__layers__", "__samples__"

#: Makes the array a traced tensor is copied into: (tensor name, shape, dtype) → array.
Allocate = Callable[[str, tuple[int, ...], np.dtype], np.ndarray]


class Trace(dict[str, np.ndarray]):
    """Traced tensors by ONNX tensor name, each an array with the samples on axis 0, in data order.

    ``layers`` maps each tensor name to its layer label (``features.3``, ``block.relu#2``,
    ``h.0.mlp.act/tanh``: the names of records and ``layerscope inspect``), ``samples`` holds the
    indices of the traced samples in the data."""

    def __init__(self, arrays: Mapping[str, np.ndarray], layers: Mapping[str, str], samples: np.ndarray):
        super().__init__(arrays)
        self.layers = dict(layers)
        self.samples = samples

    def by_layer(self) -> dict[str, np.ndarray]:
        """The arrays keyed by layer label instead of tensor name. A tensor has one label, that of the
        innermost module it leaves: the output of a container ``features`` (a Sequential whose last
        module is ``features.4``) is ``features.4``, whichever of the two a selector named."""
        return {self.layers[name]: array for name, array in self.items()}

    def save(self, path: str | Path) -> None:
        """Write the trace to *path* as an ``.npz`` (:func:`write_npz`)."""
        write_npz(Path(path), self, self.layers, self.samples)


def in_memory(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """:data:`Allocate` for a trace held in memory."""
    return np.empty(shape, dtype)


def on_disk(folder: Path) -> Allocate:
    """:data:`Allocate` writing each tensor to a memory-mapped ``.npy`` file in *folder*."""
    count = itertools.count()

    def allocate(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.lib.format.open_memmap(folder / f"{next(count)}.npy", mode="w+", dtype=dtype, shape=shape)

    return allocate


def trace_tensors(
    plan: RunPlan,
    selector: Selection,
    where: str,
    allocate: Allocate | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors *selector* picks in *plan*'s one model, for every sample of its data in order:
    ``(arrays by tensor name, layer label by tensor name)``. Without *allocate* the arrays are held in
    memory, within ``runtime.memory_budget`` together with the runner's fetches; with it (a file-backed
    array, :func:`on_disk`) only the fetches count. Errors are located at *where* (the selector's place:
    ``on``, ``--on``); *progress* counts the samples traced."""
    checkpoints = plan.checkpoints()
    if len(checkpoints) != 1:
        key = "models" if plan.spec.models else "model"
        raise UserError(
            f"{plan.where(key)}: a trace reads one model; the spec names {len(checkpoints)} "
            f"({', '.join(c.label for c in checkpoints[:5])}): give one model and one checkpoint"
        )
    worker = ShardWorker(plan, checkpoints, [(0, len(plan.order))], plan.order, plan.example())
    model = worker.load(0)
    try:
        chosen = resolve(selector, model.tensors)
    except UserError as error:
        raise UserError(f"{where}: {error} (model {model.loaded.label})") from None
    names, layers = [t.name for t in chosen], {t.name: t.layer for t in chosen}
    spec = plan.spec
    budget, samples = spec.runtime.memory_budget, len(plan.order)
    runner = Runner(
        model.loaded.proto,
        model.tensors,
        [(name,) for name in names],
        spec.runtime.device,
        budget,
        spec.data.batch_size,
        set(names),  # copied part by part: any part of a batch will do
        model.loaded.weights,
        model.feeds,
    )
    arrays: dict[str, np.ndarray] = {}
    for start, x, _ in iter_batches(plan.data, plan.order, spec.data.batch_size, classes=plan.classes):
        feeds = model.feeds.prepare(x, plan.data.describe())
        if start == 0 and allocate is None:
            runner.memory_budget = budget - _held_bytes(runner, feeds, names, samples, budget)
        for part, fetched in runner.run(feeds):
            for name, value in fetched.items():
                array = to_numpy(value)
                rows = slice(start + (part.start or 0), start + part.stop)
                if len(array) != rows.stop - rows.start:
                    raise UserError(
                        f"{where}: tensor '{name}' (layer {layers[name]}) has {len(array)} rows for the "
                        f"{rows.stop - rows.start} samples {rows.start}..{rows.stop - 1}: its first axis is not the "
                        "samples (a reshape merging the batch with another axis, such as attention heads); "
                        "select the tensors before or after it"
                    )
                if name not in arrays:
                    arrays[name] = (allocate or in_memory)(name, (samples, *array.shape[1:]), array.dtype)
                if arrays[name].shape[1:] != array.shape[1:]:
                    raise UserError(
                        f"{where}: tensor '{name}' has shape {array.shape[1:]} per sample in samples "
                        f"{rows.start}..{rows.stop - 1} but {arrays[name].shape[1:]} before: a trace stacks the "
                        "samples of a tensor, which needs one shape (pad the data to one length)"
                    )
                arrays[name][rows] = array
            del fetched
        if progress is not None:
            progress.advance(sample_count(feeds), f"tracing {model.loaded.label}")
    return {name: arrays[name] for name in names}, layers


def _held_bytes(runner: Runner, feeds: dict[str, np.ndarray], names: list[str], samples: int, budget: int) -> int:
    """Bytes the arrays of an in-memory trace of *samples* samples hold; a :class:`UserError` naming them
    when they leave the runner less of *budget* than one sample of its largest fetch."""
    sizes = {**runner.sample_bytes(feeds), **{n: a[:1].nbytes for n, a in feeds.items() if n in names}}
    held = samples * sum(sizes[name] for name in names)
    if held + max(sizes[name] for name in names) > budget:
        raise UserError(
            f"memory_budget: the selected tensors of {samples} samples take {held} bytes ({format_bytes(held)}), "
            f"and fetching them needs room beside them: more than the memory budget of {budget} bytes "
            f"({format_bytes(budget)}). Raise memory_budget, trace fewer samples (limit) or tensors, or write "
            "them to a file as they come: layerscope trace SPEC --on SELECTOR --out FILE.npz"
        )
    return held


def write_npz(path: Path, arrays: Mapping[str, np.ndarray], layers: Mapping[str, str], samples: np.ndarray) -> None:
    """*arrays* written to *path* as NumPy's ``.npz`` (``np.load`` reads it: one ``<name>.npy`` entry per
    array, as ``np.savez`` writes them), each streamed in chunks (a memory-mapped array is never read
    whole), with ``__layers__`` (rows of tensor name and layer label) and ``__samples__`` (the traced
    samples' indices in the data); through a temporary file and a rename."""
    table = {
        **arrays,
        LAYERS_KEY: np.array([[name, layers[name]] for name in arrays], dtype=str).reshape(-1, 2),
        SAMPLES_KEY: np.asarray(samples, dtype=np.int64),
    }
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in table.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def trace_to_file(
    plan: RunPlan, selector: Selection, where: str, out: Path, progress: Progress | None = None
) -> dict[str, tuple[str, tuple, str]]:
    """:func:`trace_tensors` written to the ``.npz`` *out* as the parts come (memory-mapped files in a
    temporary folder beside it, packed by :func:`write_npz`, removed after); returns what was written:
    ``{tensor name: (layer label, shape, dtype)}``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as folder:
        arrays, layers = trace_tensors(plan, selector, where, on_disk(Path(folder)), progress)
        write_npz(out, arrays, layers, plan.order)
        written = {name: (layers[name], array.shape, array.dtype.name) for name, array in arrays.items()}
        del arrays  # the maps are closed before their folder is removed
    return written
