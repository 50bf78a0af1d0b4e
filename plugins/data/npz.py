"""The ``npz`` data source: arrays from a NumPy ``.npz`` file (``x`` and optional ``y``)."""

from __future__ import annotations

import zipfile

import numpy as np
from pydantic import BaseModel, ConfigDict

from layerscope import DataSource, hookimpl
from layerscope.errors import UserError


class NpzParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    x_key: str = "x"
    y_key: str = "y"


class NpzSource(DataSource):
    name = "npz"
    Params = NpzParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        path = base_dir / params.path
        if not path.exists():
            raise UserError(f"data.path: file not found: {path}")
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise UserError(f"data.path: {path} is not a readable .npz file ({error})") from None
        if params.x_key not in archive.files:
            raise UserError(f"data.x_key: {path} has no array '{params.x_key}' (it has: {', '.join(archive.files) or 'none'})")
        self.x = archive[params.x_key]
        self.y = archive[params.y_key] if params.y_key in archive.files else None
        if self.x.ndim < 2:
            raise UserError(f"data: '{params.x_key}' in {path} must have a sample axis and features (shape {self.x.shape})")
        if not (np.issubdtype(self.x.dtype, np.number) or self.x.dtype == np.bool_):
            raise UserError(f"data: '{params.x_key}' in {path} is not numeric (dtype {self.x.dtype})")
        if self.y is not None and len(self.y) != len(self.x):
            raise UserError(f"data: '{params.y_key}' has {len(self.y)} labels for {len(self.x)} samples in {path}")
        self.path = path

    def __len__(self) -> int:
        return len(self.x)

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def read(self, indices):
        return self.x[indices], (self.y[indices] if self.y is not None else None)

    def describe(self) -> str:
        return f"npz {self.path}"


@hookimpl
def register_data_sources(register):
    register(NpzSource)
