"""The ``python`` data source: data handed over from Python, ``layerscope.run(spec, data=...)``.

Accepted objects (torch tensors are read as NumPy arrays, without a copy):

- an array ``x`` (first axis: sample), or ``(x, y)`` with one label per sample;
- a mapping of named arrays, one per model input (``{"input_ids": ids, "attention_mask": mask}``),
  or ``(mapping, y)``; a key ``label`` or ``labels`` (or ``label_key``) holds the labels;
- a map-style torch ``Dataset`` (anything with ``__len__`` and ``__getitem__``) whose items are
  ``x``, ``(x, y)`` or a mapping as above; a batch stacks its items;
- a ``DataLoader`` over such a dataset: a batch is the loader's ``collate_fn`` applied to the items
  the run reads. The run's ``data.batch_size``, ``shuffle`` (with the run's seed) and ``limit``
  apply, not the loader's sampler, so that every analysis and every shard sees the same samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from layerscope import DataSource, hookimpl
from layerscope.util.errors import UserError

LABEL_KEYS = ("label", "labels")
WHERE = "data (given from Python)"


class PythonDataParams(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    object: Any = Field(None, description="the object given as layerscope.run(spec, data=...)")
    label_key: str | None = Field(None, description="the key of the labels in a mapping (default: label or labels)")


def as_array(value: Any, what: str) -> np.ndarray:
    """*value* (a NumPy array, torch or TensorFlow tensor, list or number) as a NumPy array; objects
    are refused by name."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    elif hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # a TensorFlow tensor
        value = value.numpy()
    try:
        array = np.asarray(value)
    except ValueError as error:  # ragged nesting
        raise UserError(f"{WHERE}: {what} cannot be read as an array ({error})") from None
    if array.dtype.hasobject:
        raise UserError(f"{WHERE}: {what} holds Python objects (dtype object); give numbers or strings")
    return array


class Split:
    """How one item or batch splits into samples and labels: ``x``, ``(x, y)`` or a mapping."""

    def __init__(self, example: Any, label_key: str | None, what: str):
        self.pair = isinstance(example, tuple | list) and not isinstance(example, str)
        if self.pair and len(example) not in (1, 2):
            raise UserError(f"{WHERE}: {what} is a sequence of {len(example)} parts; give x, (x, y) or a mapping")
        inputs = example[0] if self.pair else example
        self.named = isinstance(inputs, Mapping)
        keys = [label_key] if label_key is not None else list(LABEL_KEYS)
        self.label_key = next((k for k in keys if self.named and k in inputs), None)
        if label_key is not None and self.label_key is None:
            raise UserError(
                f"{WHERE}: label_key '{label_key}' is not a key of {what} "
                f"(keys: {', '.join(map(str, inputs)) if self.named else 'none, it is not a mapping'})"
            )
        if self.pair and len(example) == 2 and self.label_key is not None:
            raise UserError(f"{WHERE}: {what} gives labels twice: as y and as key '{self.label_key}'")
        self.has_labels = self.pair and len(example) == 2 and example[1] is not None or self.label_key is not None

    def __call__(self, value: Any, what: str) -> tuple[Any, Any]:
        """*value* as ``(inputs, labels)`` (labels None when it has none)."""
        if self.pair != (isinstance(value, tuple | list) and not isinstance(value, str)):
            raise UserError(f"{WHERE}: {what} is {type(value).__name__}, unlike the first item")
        if self.pair and len(value) not in (1, 2):
            raise UserError(f"{WHERE}: {what} is a sequence of {len(value)} parts; give x, (x, y) or a mapping")
        inputs, labels = (value[0], value[1] if len(value) == 2 else None) if self.pair else (value, None)
        if self.named:
            if not isinstance(inputs, Mapping):
                raise UserError(f"{WHERE}: {what} is {type(inputs).__name__}, unlike the first item (a mapping)")
            if self.label_key is not None:
                labels = inputs[self.label_key]
            inputs = {str(k): v for k, v in inputs.items() if k != self.label_key}
        return inputs, labels


def _arrays(inputs: Any, what: str) -> Any:
    """Inputs (one value, or values by input name) as NumPy arrays."""
    if isinstance(inputs, Mapping):
        return {name: as_array(value, f"{what} '{name}'") for name, value in inputs.items()}
    return as_array(inputs, what)


class ArrayData:
    """Samples held in arrays (an array, a mapping of arrays, either with labels)."""

    def __init__(self, data: Any, label_key: str | None):
        split = Split(data, label_key, "the data")
        inputs, labels = split(data, "the data")
        self.x = _arrays(inputs, "the samples")
        self.y = as_array(labels, "the labels") if labels is not None else None
        counts = {
            name: len(a) if a.ndim else 0
            for name, a in (self.x.items() if isinstance(self.x, dict) else [("x", self.x)])
        }
        if 0 in counts.values() or len(set(counts.values())) != 1:
            raise UserError(
                f"{WHERE}: every array needs the same number of samples on its first axis "
                f"({', '.join(f'{k}: {v}' for k, v in counts.items())})"
            )
        self.length = next(iter(counts.values()))
        if self.y is not None and (self.y.ndim == 0 or len(self.y) != self.length):
            raise UserError(f"{WHERE}: {self.y.size} labels for {self.length} samples")

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def read_labels(self, indices: np.ndarray) -> np.ndarray | None:
        return self.y[indices] if self.y is not None else None

    def read(self, indices: np.ndarray) -> tuple[Any, np.ndarray | None]:
        x = {name: a[indices] for name, a in self.x.items()} if isinstance(self.x, dict) else self.x[indices]
        return x, self.y[indices] if self.y is not None else None


class DatasetData:
    """Samples read item by item from a map-style dataset, batched by *collate* (a DataLoader's) or
    stacked."""

    def __init__(self, dataset: Any, label_key: str | None, collate: Any = None):
        self.dataset, self.collate = dataset, collate
        self.length = len(dataset)
        if self.length == 0:
            raise UserError(f"{WHERE}: the dataset has no samples")
        self.split = Split(self._item(0), label_key, "item 0 of the dataset")

    def _item(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as error:  # the user's __getitem__: any failure is theirs, named with the item
            raise UserError(
                f"{WHERE}: reading item {index} of the dataset failed: {type(error).__name__}: {error}"
            ) from None

    def read(self, indices: np.ndarray) -> tuple[Any, np.ndarray | None]:
        items = [self._item(int(i)) for i in indices]
        if self.collate is not None:
            try:
                batch = self.collate(items)
            except Exception as error:  # the user's collate_fn
                raise UserError(
                    f"{WHERE}: the DataLoader's collate_fn failed on items {indices[:5].tolist()}"
                    f"{'…' if len(indices) > 5 else ''}: {type(error).__name__}: {error}"
                ) from None
            inputs, labels = self.split(batch, "a collated batch")
            return _arrays(inputs, "the batch"), as_array(labels, "the labels") if labels is not None else None
        parts = [self.split(item, f"item {int(i)} of the dataset") for item, i in zip(items, indices)]
        labels = self._labels(y for _, y in parts)
        if self.split.named:
            names = list(parts[0][0])
            return {
                name: self._stack([x[name] for x, _ in parts], indices, f"input '{name}'") for name in names
            }, labels
        return self._stack([x for x, _ in parts], indices, "the samples"), labels

    def read_labels(self, indices: np.ndarray) -> np.ndarray | None:
        """The labels of the items at *indices*, read one item at a time (no batch of samples is held)."""
        return self._labels(self.split(self._item(int(i)), f"item {int(i)} of the dataset")[1] for i in indices)

    def _labels(self, labels) -> np.ndarray | None:
        return as_array([as_array(y, "a label") for y in labels], "the labels") if self.has_labels else None

    @property
    def has_labels(self) -> bool:
        return self.split.has_labels

    @staticmethod
    def _stack(values: Sequence[Any], indices: np.ndarray, what: str) -> np.ndarray:
        arrays = [as_array(v, what) for v in values]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            first, other = arrays[0].shape, next(a.shape for a in arrays if a.shape != arrays[0].shape)
            raise UserError(
                f"{WHERE}: {what} of the items differ in shape ({list(first)} and {list(other)}, "
                f"items {indices[:5].tolist()}…); give items of one shape, or a DataLoader whose "
                "collate_fn pads them"
            )
        return np.stack(arrays)


def _map_style(dataset: Any) -> bool:
    """True for a dataset read by index: ``__len__`` and ``__getitem__``, and not a torch IterableDataset."""
    return (
        hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
        and not any(cls.__name__ == "IterableDataset" for cls in type(dataset).__mro__)
    )


def open_python_data(data: Any, label_key: str | None) -> ArrayData | DatasetData:
    """The reader for *data* (see the module docstring); an unsupported object is a user error."""
    if data is None:
        raise UserError("data.source: 'python' reads data given from Python: layerscope.run(spec, data=...)")
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(data, "collate_fn"):  # a torch DataLoader
        if not _map_style(dataset):
            raise UserError(
                f"{WHERE}: the DataLoader's dataset ({type(dataset).__name__}) cannot be read by index; "
                "layerscope shuffles, limits and shards by sample index: give a map-style dataset"
            )
        return DatasetData(dataset, label_key, data.collate_fn)
    if isinstance(data, np.ndarray) or hasattr(data, "detach") or isinstance(data, Mapping | tuple):
        return ArrayData(data, label_key)
    if _map_style(data) and not isinstance(data, str | list):
        return DatasetData(data, label_key)
    raise UserError(
        f"{WHERE}: a {type(data).__name__} is not data layerscope reads; give an array, (x, y), a "
        "mapping of named arrays, a map-style torch Dataset or a DataLoader"
    )


class PythonDataSource(DataSource):
    name = "python"
    Params = PythonDataParams
    params: PythonDataParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        self.reader = open_python_data(params.object, params.label_key)

    def __len__(self) -> int:
        return self.reader.length

    @property
    def has_labels(self) -> bool:
        return self.reader.has_labels

    def read(self, indices):
        return self.reader.read(np.asarray(indices))

    def read_labels(self, indices):
        return self.reader.read_labels(np.asarray(indices))

    def describe(self) -> str:
        return f"python ({type(self.params.object).__name__})"

    def fingerprint(self) -> str | None:
        """A digest of the arrays' bytes (arrays are in memory: hashing them costs a pass); None for a
        dataset, whose items cannot be told apart without reading them all."""
        if not isinstance(self.reader, ArrayData):
            return None
        digest = hashlib.sha256()
        arrays = self.reader.x.items() if isinstance(self.reader.x, dict) else [("x", self.reader.x)]
        for name, array in [*arrays, ("y", self.reader.y)]:
            if array is not None:
                digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
                digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()


@hookimpl
def register_data_sources(register):
    register(PythonDataSource)
