"""The ``npz`` data source: arrays from a NumPy ``.npz`` file (``x`` and optional ``y``).

A model with several inputs takes one array per input: ``inputs: {input_ids: ids,
attention_mask: mask}`` maps each model input to a key of the archive (instead of ``x_key``).

Arrays are opened by their headers and read batch by batch (:mod:`.npz_arrays`): shapes,
dtypes and the label count are checked before any data is read, and memory stays flat
whatever the archive expands to. Object arrays are refused (reading them would unpickle).
"""

from __future__ import annotations

import zipfile

from pydantic import BaseModel, ConfigDict, Field, model_validator

from layerscope import DataSource, hookimpl
from layerscope.util.errors import UserError
from layerscope.util.files import regular_file

from .npz_arrays import NpyMember


class NpzParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="the .npz file, relative to the spec")
    x_key: str = Field("x", description="the array of samples (first axis: sample)")
    y_key: str = Field(
        "y", description="the array of labels, one per sample (optional when left at y; a key given must exist)"
    )
    inputs: dict[str, str] | None = Field(
        None, description="model input name -> key of its array, for models with several inputs (replaces x_key)"
    )

    @model_validator(mode="after")
    def _one_way_to_name_samples(self) -> NpzParams:
        if self.inputs is not None and "x_key" in self.model_fields_set:
            raise ValueError("give either x_key (one input) or inputs (an array per model input), not both")
        if self.inputs is not None and not self.inputs:
            raise ValueError("inputs: name at least one model input")
        return self


class NpzSource(DataSource):
    name = "npz"
    Params = NpzParams
    params: NpzParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        self.path = regular_file(base_dir / params.path, "data.path")
        named = params.inputs or {None: params.x_key}  # model input (None: the only one) -> key
        try:
            with zipfile.ZipFile(self.path) as archive:
                keys = [name.removesuffix(".npy") for name in archive.namelist() if name.endswith(".npy")]
                wanted = {("data.x_key" if name is None else f"data.inputs.{name}"): key for name, key in named.items()}
                if "y_key" in params.model_fields_set:  # the default 'y' is optional; a named key must exist
                    wanted["data.y_key"] = params.y_key
                for where, key in wanted.items():
                    if key not in keys:
                        raise UserError(
                            f"{where}: {self.path} has no array '{key}' (it has: {', '.join(keys) or 'none'})"
                        )
                # model input (None: the only one) -> its array
                self.x = {input_name: NpyMember(self.path, archive, key) for input_name, key in named.items()}
                self.y = NpyMember(self.path, archive, params.y_key) if params.y_key in keys else None
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise UserError(f"data.path: {self.path} is not a readable .npz file ({error})") from None
        for key, array in [*zip(named.values(), self.x.values()), (params.y_key, self.y)]:
            if array is not None and array.dtype.hasobject:
                raise UserError(
                    f"data: array '{key}' in {self.path} holds Python objects (dtype object), which "
                    "layerscope does not read (unpickling runs code); save numbers or fixed-width "
                    "strings, e.g. np.array(labels, dtype=str)"
                )
        for key, array in zip(named.values(), self.x.values()):
            if len(array.shape) < 1 + (params.inputs is None):
                raise UserError(
                    f"data: '{key}' in {self.path} must have a sample axis"
                    f"{' and features' if params.inputs is None else ''} (shape {array.shape})"
                )
            if array.dtype.kind not in "biuf":
                raise UserError(f"data: '{key}' in {self.path} is not numeric (dtype {array.dtype})")
        lengths = {key: len(array) for key, array in zip(named.values(), self.x.values())}
        if len(set(lengths.values())) > 1:
            raise UserError(f"data.inputs: the arrays in {self.path} have different sample counts ({lengths})")
        self.samples = next(iter(lengths.values()))
        if self.y is not None and len(self.y) != self.samples:
            raise UserError(
                f"data: '{params.y_key}' has {len(self.y)} labels for {self.samples} samples in {self.path}"
            )

    def __len__(self) -> int:
        return self.samples

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def read(self, indices):
        if self.params.inputs is None:
            return self.x[None][indices], self.read_labels(indices)
        return {name: array[indices] for name, array in self.x.items()}, self.read_labels(indices)

    def read_labels(self, indices):
        return self.y[indices] if self.y is not None else None

    def describe(self) -> str:
        return f"npz {self.path}"

    def describe_labels(self) -> str:
        return f"key '{self.params.y_key}'"


@hookimpl
def register_data_sources(register):
    register(NpzSource)
