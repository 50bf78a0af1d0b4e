"""Data sources: where input samples (and labels) come from.

A data source knows its length and reads samples by index, so the runner can shuffle
with the run's seed, apply ``limit`` and stream batches without holding more than one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import ClassVar, overload

import numpy as np
from pydantic import BaseModel

from layerscope.util.errors import UserError
from layerscope.util.files import fingerprint_paths
from layerscope.util.params import NoParams
from layerscope.util.units import format_bytes

from .labels import ClassLabels, classes_of

#: A batch of samples as data sources yield it: one array, or arrays by model input name.
Samples = np.ndarray | Mapping[str, np.ndarray]


def sample_count(samples: Samples) -> int:
    """Samples in a batch (the first axis of its arrays)."""
    if isinstance(samples, Mapping):
        return len(next(iter(samples.values()))) if samples else 0
    return len(samples)


@overload
def take(samples: np.ndarray, rows) -> np.ndarray: ...
@overload
def take(samples: Mapping[str, np.ndarray], rows) -> dict[str, np.ndarray]: ...
def take(samples: Samples, rows) -> Samples:
    """The *rows* (an index array or a slice) of every array of a batch."""
    if isinstance(samples, Mapping):
        return {name: array[rows] for name, array in samples.items()}
    return samples[rows]


def arrays(samples: Samples) -> dict[str | None, np.ndarray]:
    """A batch as named arrays (the key None for a single unnamed array)."""
    return {name: array for name, array in samples.items()} if isinstance(samples, Mapping) else {None: samples}


def nbytes(samples: Samples) -> int:
    """Bytes of a batch's arrays."""
    return sum(np.asarray(array).nbytes for array in arrays(samples).values())


class DataSource:
    """Base class of data-source plugins."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, params: BaseModel, base_dir: Path, seed: int = 0):
        self.params = params
        self.base_dir = base_dir
        self.seed = seed

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def has_labels(self) -> bool:
        raise NotImplementedError

    def read(self, indices: np.ndarray) -> tuple[Samples, np.ndarray | None]:
        """Samples (first axis = sample) and labels (or None) at *indices*: one array, or arrays by
        model input name for a model with several inputs."""
        raise NotImplementedError

    def read_labels(self, indices: np.ndarray) -> np.ndarray | None:
        """The labels at *indices* (the run checks them all before it starts); override when
        labels can be read without the samples."""
        return self.read(indices)[1]

    def describe(self) -> str:
        return self.name

    def fingerprint(self) -> str | None:
        """What identifies the data this source reads, so that a run continued with ``--resume`` reuses
        saved checkpoints only for the same data: by default a digest of the files the parameters name
        (:func:`~layerscope.util.files.fingerprint_paths`: sizes, modification times, inodes). Override
        it when the data is not in those files; return None when it cannot be told (``--resume`` then
        warns that it trusts the data to be unchanged)."""
        return fingerprint_paths(self.params.model_dump().values(), self.base_dir)

    def describe_labels(self) -> str:
        """Where the labels come from, for error messages (e.g. an npz key)."""
        return "labels"


LABEL_CHUNK = 65_536  # labels read at once while checking them


def labels_where(source: DataSource) -> str:
    """How error messages name a data source's labels."""
    return f"labels ({source.describe_labels()}) of data source '{source.describe()}'"


def scan_labels(source: DataSource, order: np.ndarray) -> ClassLabels | None:
    """Check the labels of the samples in *order* and fix their classes (None: the source has none)."""
    if not source.has_labels:
        return None
    chunks = [order[start : start + LABEL_CHUNK] for start in range(0, len(order), LABEL_CHUNK)]
    return classes_of((source.read_labels(chunk) for chunk in chunks), labels_where(source), chunks)


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_allocation(nbytes: int, what: str) -> None:
    """A user error naming *what* when *nbytes* exceed this machine's memory (checked before allocating)."""
    total = physical_memory()
    if total is not None and nbytes > total:
        raise UserError(f"{what} needs {format_bytes(nbytes)}, more than this machine's memory ({format_bytes(total)})")


def sample_order(length: int, limit: int | None, shuffle: bool, seed: int) -> np.ndarray:
    """Indices of the samples a run reads: a seeded permutation (if *shuffle*) cut at *limit*."""
    order = np.random.default_rng(seed).permutation(length) if shuffle else np.arange(length)
    return order[:limit] if limit is not None else order


def iter_batches(
    source: DataSource,
    order: np.ndarray,
    batch_size: int,
    lookahead: int = 0,
    span: tuple[int, int] | None = None,
    classes: ClassLabels | None = None,
) -> Iterator[tuple[int, Samples, np.ndarray | None]]:
    """Yield ``(start, x, y)`` batches in *order* (with up to *lookahead* samples of the next
    batch appended, read past the span's end too), labels as *classes* codes; NaN/Inf inputs
    are a user error.

    *span* ``(first, stop)`` restricts the batches to those starting in ``first..stop-1``
    (a data shard; *first* is a multiple of *batch_size*); ``start`` stays the index in the
    whole stream.
    """
    first, stop = span if span is not None else (0, len(order))
    for start in range(first, stop, batch_size):
        indices = order[start : min(start + batch_size, stop) + lookahead]
        x, y = source.read(indices)
        if y is not None:
            y = (classes or ClassLabels()).encode(y, labels_where(source), indices)
        for name, array in arrays(x).items():
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                bad = int(np.argwhere(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0, 0])
                what = f" input '{name}'" if name is not None else ""
                raise UserError(
                    f"data source '{source.describe()}': sample {int(order[start + bad])}{what} contains NaN or Inf"
                )
        yield start, x, y


def shard_spans(samples: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """Split a stream of *samples* into at most *shards* contiguous ``(first, stop)`` spans of
    whole batches, their batch counts differing by at most one."""
    batches = -(-samples // batch_size)
    shards = max(1, min(shards, batches))
    bounds = [index * batches // shards for index in range(shards + 1)]
    return [(low * batch_size, min(high * batch_size, samples)) for low, high in zip(bounds, bounds[1:])]
