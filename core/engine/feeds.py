"""Model inputs: the named arrays a batch feeds a model.

A data source yields, per batch, one array (the input of a single-input model) or a mapping
input name → array, first axis the sample (``input_ids``, ``attention_mask``, …). Inputs
named in ``data.constants`` (``sr: 16000``) are fed as given, with no sample axis, to every
run. :class:`ModelFeeds` checks a batch against the model's inputs, naming the input on a
mismatch, and turns it into what onnxruntime is fed: every data input present, cast to its
input's element type (integer inputs only from whole numbers), images moved between channel-first
and channel-last to the input's layout, reshaped when only the sizes agree.

The **token mask** is the input that marks real tokens (1) against padding (0): the input
``data.token_mask`` names, else an input called ``attention_mask``. Estimators read it as
``TensorBatch.token_mask`` so that padding never counts as data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from layerscope.data.source import Samples
from layerscope.graph.tensors import Dim, TensorInfo, format_dims, known_sizes
from layerscope.util.errors import UserError

DEFAULT_TOKEN_MASK = "attention_mask"


def _cast(array: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """*array* as *dtype*; a user error naming *what* when an integer or boolean input would receive
    values that are not whole numbers (or not 0/1)."""
    array = np.asarray(array)
    if array.dtype.kind not in "biuf":
        raise UserError(f"{what} is not numeric (dtype {array.dtype})")
    if dtype.kind in "biu" and array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise UserError(f"{what} holds non-integral values, but the model input has element type {dtype}")
    if dtype.kind == "b" and not np.isin(array, (0, 1)).all():
        raise UserError(f"{what} holds values other than 0 and 1, but the model input is boolean")
    return np.ascontiguousarray(array, dtype=dtype)


def _agrees(dims: Sequence[Dim], sizes: tuple[int, ...]) -> bool:
    """True when sample *sizes* fit the input's sample *dims* (a symbolic dim fits any size)."""
    return len(dims) == len(sizes) and all(not isinstance(d, int) or d == s for d, s in zip(dims, sizes))


def _shaped(array: np.ndarray, info: TensorInfo, what: str) -> np.ndarray:
    """*array* with the sample shape of input *info*: as is when its dims agree (symbolic dims agree
    with any size); images moved between channel-first (N, C, H, W) and channel-last (N, H, W, C) when
    only the moved axes agree; reshaped when only the static sizes agree."""
    shape = info.shape
    if shape is None or _agrees(shape[1:], array.shape[1:]):
        return array
    if array.ndim == len(shape) == 4:
        for axes in ((0, 3, 1, 2), (0, 2, 3, 1)):  # channel-last -> first, channel-first -> last
            if _agrees(shape[1:], tuple(array.shape[a] for a in axes[1:])):
                return np.ascontiguousarray(array.transpose(axes))
    target = shape[1:]
    if known_sizes(target) and math.prod(target) == math.prod(array.shape[1:]):
        return array.reshape((array.shape[0], *target))
    raise UserError(
        f"{what} has samples of shape {list(array.shape[1:])} but the model input '{info.name}' "
        f"expects {list(shape[1:])}"
    )


@dataclass(frozen=True)
class ModelFeeds:
    """How batches feed one model: its data inputs (in graph order), the constant inputs and the
    token mask (see the module docstring)."""

    inputs: tuple[TensorInfo, ...]
    constants: dict[str, np.ndarray]
    token_mask: str | None = None

    @classmethod
    def for_model(
        cls, tensors: list[TensorInfo], constants: Mapping[str, Any] | None = None, token_mask: str | None = None
    ) -> ModelFeeds:
        """The feeds of the model described by *tensors*, with ``data.constants`` and ``data.token_mask``
        checked against its inputs."""
        model_inputs = [t for t in tensors if t.role == "input"]
        names = [t.name for t in model_inputs]
        given = {}
        for name, value in (constants or {}).items():
            info = next((t for t in model_inputs if t.name == name), None)
            if info is None:
                raise UserError(f"data.constants.{name}: the model has no input '{name}' (inputs: {', '.join(names)})")
            given[name] = _cast(np.asarray(value), np.dtype(info.dtype or "float32"), f"data.constants.{name}")
        data_inputs = tuple(t for t in model_inputs if t.name not in given)
        if not data_inputs:
            raise UserError(
                f"data.constants: every model input is a constant ({', '.join(names)}); leave at least one to the data"
            )
        data_names = [t.name for t in data_inputs]
        if token_mask is not None and token_mask not in data_names:
            raise UserError(
                f"data.token_mask: '{token_mask}' is not a data input of the model (inputs: {', '.join(data_names)})"
            )
        if token_mask is None and DEFAULT_TOKEN_MASK in data_names:
            token_mask = DEFAULT_TOKEN_MASK
        return cls(data_inputs, given, token_mask)

    @property
    def primary(self) -> TensorInfo:
        """The first data input: ``TensorBatch.inputs``, and the input of single-input methods."""
        return self.inputs[0]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def describe(self) -> str:
        """The data inputs with element type and shape, e.g. ``input_ids (int64, batch×seq)``."""
        return ", ".join(f"{t.name} ({t.dtype}, {format_dims(t.shape)})" for t in self.inputs)

    def mark_constants(self, tensors: list[TensorInfo]) -> list[TensorInfo]:
        """*tensors* with the constant inputs unobservable (they have no sample axis)."""
        return [
            replace(t, observable=False, reason="constant input (data.constants)")
            if t.role == "input" and t.name in self.constants
            else t
            for t in tensors
        ]

    def prepare(self, samples: Samples, source: str) -> dict[str, np.ndarray]:
        """The batch *samples* from data source *source* as model feeds: one array per data input, cast
        and shaped for it (constants are not included); every mismatch is a user error naming the input."""
        if not isinstance(samples, Mapping):
            if len(self.inputs) != 1:
                raise UserError(
                    f"the model has {len(self.inputs)} data inputs ({', '.join(self.names)}), but data "
                    f"source '{source}' gives one array; give one array per input (npz: "
                    "inputs: {input: key}) or the others in data.constants"
                )
            samples = {self.primary.name: samples}
        missing = [n for n in self.names if n not in samples]
        unknown = [n for n in samples if n not in self.names]
        if missing or unknown:
            problems = ([f"no array for model input(s) {', '.join(missing)}"] if missing else []) + [
                f"'{name}' is not a data input of the model" for name in unknown
            ]
            raise UserError(f"data source '{source}': {'; '.join(problems)} (model inputs: {self.describe()})")
        feeds = {}
        for info in self.inputs:
            what = f"input '{info.name}' from data source '{source}'"
            feeds[info.name] = _shaped(_cast(samples[info.name], np.dtype(info.dtype or "float32"), what), info, what)
        counts = {name: len(array) for name, array in feeds.items()}
        if len(set(counts.values())) > 1:
            raise UserError(f"data source '{source}': the inputs have different sample counts ({counts})")
        return feeds

    def mask(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The token mask of a prepared batch as booleans (sample × token), or None."""
        if self.token_mask is None:
            return None
        mask = np.asarray(feeds[self.token_mask])
        if mask.ndim != 2:
            raise UserError(
                f"data.token_mask: input '{self.token_mask}' must be (sample, token), not shape {list(mask.shape)}"
            )
        return mask != 0
