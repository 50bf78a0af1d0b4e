"""The ``digits`` data source: scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes).

Pixels are scaled from 0..16 to 0..1. ``split`` picks a fixed stratified 75/25 split
(``train`` / ``test``, the split the demo models are trained on) or ``all`` samples;
``layout`` gives samples as flat 64-vectors or 1×8×8 images (the runner also reshapes
automatically when the model's input shape asks for it).
"""

from __future__ import annotations

import io
from functools import lru_cache
from importlib import metadata
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from layerscope import DataSource, hookimpl
from layerscope.util.files import atomic_write, cache_dir, mark_used

SPLIT_SEED = 0


@lru_cache(maxsize=4)
def load_digits_split(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Digits as (x float32 in [0, 1] of shape (N, 64), y int64), for ``all``, ``train`` or ``test``.

    The arrays of every split are kept in layerscope's cache folder (an npz of plain arrays, read
    without pickles) per scikit-learn version, so that a run, a worker process or ``validate``
    does not import scikit-learn (over a second) once the cache holds them; an unreadable cache
    file is rebuilt."""
    path = cache_dir() / "data" / f"digits-sklearn-{metadata.version('scikit-learn')}.npz"
    try:
        if not path.is_file():  # only a regular file is opened
            raise FileNotFoundError(path)
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
        mark_used(path)
        return arrays[f"x_{split}"], arrays[f"y_{split}"]
    except (OSError, ValueError, KeyError):
        arrays = _digits_from_sklearn()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # array names, none of them savez's allow_pickle
    try:
        atomic_write(path, buffer.getvalue())
    except OSError:  # a read-only cache costs the next run the import, nothing else
        pass
    return arrays[f"x_{split}"], arrays[f"y_{split}"]


def _digits_from_sklearn() -> dict[str, np.ndarray]:
    """Every split of scikit-learn's digits: pixels scaled to [0, 1], and the fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=SPLIT_SEED)
    return {"x_all": x, "y_all": y, "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


class DigitsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["all", "train", "test"] = Field(
        "all",
        description="all samples, or the fixed stratified 75/25 train or test split (the demo models train on train)",
    )
    layout: Literal["flat", "image"] = Field("flat", description="flat 64-vectors or 1×8×8 images")


class DigitsSource(DataSource):
    name = "digits"
    Params = DigitsParams
    params: DigitsParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        self.x, self.y = load_digits_split(params.split)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def has_labels(self) -> bool:
        return True

    def read(self, indices):
        x = self.x[indices]
        if self.params.layout == "image":
            x = x.reshape(len(indices), 1, 8, 8)
        return x, self.y[indices]

    def read_labels(self, indices):
        return self.y[indices]

    def describe(self) -> str:
        return f"digits ({self.params.split})"

    def describe_labels(self) -> str:
        return "the digit"


@hookimpl
def register_data_sources(register):
    register(DigitsSource)
