"""The ``npz`` data source: arrays from a NumPy ``.npz`` file (``x`` and optional ``y``).

Arrays are opened by their headers and read batch by batch (:mod:`.npz_arrays`): shapes,
dtypes and the label count are checked before any data is read, and memory stays flat
whatever the archive expands to. Object arrays are refused (reading them would unpickle).
"""

from __future__ import annotations

import zipfile

from pydantic import BaseModel, ConfigDict, Field

from layerscope import DataSource, hookimpl
from layerscope.errors import UserError
from layerscope.files import regular_file

from .npz_arrays import NpyMember


class NpzParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="the .npz file, relative to the spec")
    x_key: str = Field("x", description="the array of samples (first axis: sample)")
    y_key: str = Field("y", description="the array of labels, one per sample (optional)")


class NpzSource(DataSource):
    name = "npz"
    Params = NpzParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        self.path = regular_file(base_dir / params.path, "data.path")
        try:
            with zipfile.ZipFile(self.path) as archive:
                keys = [name.removesuffix(".npy") for name in archive.namelist() if name.endswith(".npy")]
                if params.x_key not in keys:
                    raise UserError(f"data.x_key: {self.path} has no array '{params.x_key}' "
                                    f"(it has: {', '.join(keys) or 'none'})")
                self.x = NpyMember(self.path, archive, params.x_key)
                self.y = NpyMember(self.path, archive, params.y_key) if params.y_key in keys else None
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise UserError(f"data.path: {self.path} is not a readable .npz file ({error})") from None
        for key, array in ((params.x_key, self.x), (params.y_key, self.y)):
            if array is not None and array.dtype.hasobject:
                raise UserError(f"data: array '{key}' in {self.path} holds Python objects (dtype object), which "
                                "layerscope does not read (unpickling runs code); save numbers or fixed-width "
                                "strings, e.g. np.array(labels, dtype=str)")
        if len(self.x.shape) < 2:
            raise UserError(f"data: '{params.x_key}' in {self.path} must have a sample axis and features "
                            f"(shape {self.x.shape})")
        if self.x.dtype.kind not in "biuf":
            raise UserError(f"data: '{params.x_key}' in {self.path} is not numeric (dtype {self.x.dtype})")
        if self.y is not None and len(self.y) != len(self.x):
            raise UserError(f"data: '{params.y_key}' has {len(self.y)} labels for {len(self.x)} samples in {self.path}")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def read(self, indices):
        return self.x[indices], self.read_labels(indices)

    def read_labels(self, indices):
        return self.y[indices] if self.y is not None else None

    def describe(self) -> str:
        return f"npz {self.path}"

    def describe_labels(self) -> str:
        return f"key '{self.params.y_key}'"


@hookimpl
def register_data_sources(register):
    register(NpzSource)
