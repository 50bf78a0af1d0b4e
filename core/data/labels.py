"""Labels as classes: what a data source's labels mean, checked once, encoded the same way everywhere.

Every estimator receives labels as int64 *class codes*, one per sample:

- integer (and boolean) labels are classes as they are: the code is the label;
- float labels must be whole numbers (``3.0`` is class 3); any other float, NaN or Inf is a
  user error naming the data source and the sample;
- string labels (CSV columns, folder names) are classes named by the string: the classes are
  the sorted distinct labels of the samples the run reads, and the code is the position in
  that list (the convention of scikit-learn's ``LabelEncoder`` and of image-folder datasets);
  records name the class by its string;
- labels must be one per sample (shape ``(N,)`` or ``(N, 1)``); object arrays are refused.

:func:`classes_of` checks the labels of a run's samples before any model work
(:func:`layerscope.data.source.scan_labels`), so a bad label stops the run before it starts, and the
codes of string classes are fixed for every shard, worker and checkpoint of the run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from layerscope.util.errors import UserError

#: A whole number as text: digits, a minus sign perhaps, spaces around.
WHOLE_NUMBER = re.compile(r"\s*-?[0-9]+\s*")

#: The ids of a batch's samples (positions in the data source), to name a bad label.
SampleIds = Sequence[int] | np.ndarray


@dataclass(frozen=True)
class ClassLabels:
    """The classes of a run's labels: ``names`` for string labels (code = position), else None."""

    names: tuple[str, ...] | None = None

    def encode(self, labels: Any, where: str, sample_ids: SampleIds | None = None) -> np.ndarray:
        """Class codes (int64, shape (N,)) of *labels*; *where* and *sample_ids* name a bad label."""
        values = _one_per_sample(labels, where)
        if (values.dtype.kind in "US") != (self.names is not None):
            raise UserError(f"{where}: mixes string and numeric labels")
        if self.names is None:
            return _numeric_codes(values, where, sample_ids)
        try:
            return np.array([self._codes[name] for name in _as_strings(values).tolist()], dtype=np.int64)
        except KeyError as error:
            raise UserError(f"{where}: label {error.args[0]!r} is not one of the run's classes") from None

    @cached_property
    def _codes(self) -> dict[str, int]:
        return {name: code for code, name in enumerate(self.names or ())}

    def decode(self, code: Any) -> Any:
        """The class a record names: the string for string labels, else the code itself."""
        if self.names is not None and isinstance(code, (int, np.integer)) and 0 <= code < len(self.names):
            return self.names[int(code)]
        return code


def labels_from_text(values: Any) -> np.ndarray:
    """Labels read as text (a CSV column, a manifest) as numbers when every one spells a number: integers
    when all spell whole numbers (``"3"``, ``" -1"``), else floats (``"1.0"``, ``"0.5"``), which the
    label check takes as classes when whole and refuses otherwise, as it does a float column of a
    Parquet file or an npz; labels that do not all spell numbers are as they are (strings name classes)."""
    values = np.asarray(values)
    if values.dtype.kind != "U":
        return values
    distinct = np.unique(values)
    kinds = (np.int64, np.float64) if all(WHOLE_NUMBER.fullmatch(v) for v in distinct) else (np.float64,)
    for kind in kinds:
        try:
            distinct.astype(kind)
        except (ValueError, OverflowError):  # not a number, or a whole one past int64
            continue
        return values.astype(kind)
    return values


def _one_per_sample(labels: Any, where: str) -> np.ndarray:
    values = np.asarray(labels)
    if values.dtype == object:
        raise UserError(f"{where}: labels are an object array; give integer or string labels")
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise UserError(
            f"{where}: labels must be one class per sample (shape (N,)), not shape {list(values.shape)}"
            + ("; for one-hot labels give their argmax" if values.ndim == 2 else "")
        )
    if values.dtype.kind not in "biufUS":
        raise UserError(f"{where}: labels of dtype {values.dtype} are not classes; give integer or string labels")
    return values


def _as_strings(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S":
        try:
            return np.char.decode(values, "utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"labels are bytes that are not UTF-8 text ({error})") from None
    return values


def _numeric_codes(values: np.ndarray, where: str, sample_ids: SampleIds | None) -> np.ndarray:
    if values.dtype.kind in "biu":
        return values.astype(np.int64)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        index = int(np.argmax(bad))
        sample = int(sample_ids[index]) if sample_ids is not None else index
        value = values[index].item()
        why = "NaN or Inf" if not np.isfinite(value) else "not a whole number (float labels name classes: 0.0, 1.0, …)"
        raise UserError(f"{where}: sample {sample} has label {value!r}, {why}")
    return values.astype(np.int64)


def classes_of(label_batches: Iterable[Any], where: str, sample_ids: Iterable[SampleIds]) -> ClassLabels:
    """Check every label of *label_batches* (the sample ids of each batch name a bad one) and fix the
    run's classes: the sorted distinct strings for string labels, else none (codes are the labels)."""
    strings: set[str] = set()
    kinds = set()
    for labels, ids in zip(label_batches, sample_ids):
        values = _one_per_sample(labels, where)
        kinds.add("string" if values.dtype.kind in "US" else "number")
        if values.dtype.kind in "US":
            strings.update(_as_strings(values).tolist())
        else:
            _numeric_codes(values, where, ids)
    if len(kinds) > 1:
        raise UserError(f"{where}: mixes string and numeric labels")
    return ClassLabels(tuple(sorted(strings)) if "string" in kinds else None)
