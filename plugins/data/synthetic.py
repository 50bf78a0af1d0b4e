"""The ``synthetic`` data source: seeded standard-Gaussian samples with optional labels.

Sample *i* is drawn from its own generator (``SeedSequence(seed, spawn_key=(0, i))``), so
any subset, order or shard reads the same values. With ``classes: k`` the label is the argmax of a fixed
random linear projection, so labels depend on the data.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from layerscope import DataSource, hookimpl
from layerscope.data import check_allocation


class SyntheticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: PositiveInt = Field(1000, description="how many samples")
    shape: list[PositiveInt] = Field(default_factory=lambda: [64], description="the shape of one sample")
    classes: int = Field(10, ge=0, description="labels: the argmax of a fixed random projection onto this many "
                                               "classes; 0 for no labels")
    mean: float = Field(0.0, description="mean of the Gaussian")
    std: float = Field(1.0, gt=0, description="standard deviation of the Gaussian")


class SyntheticSource(DataSource):
    name = "synthetic"
    Params = SyntheticParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        features = math.prod(params.shape)
        check_allocation(features * 4, f"data.shape: one sample of shape {params.shape}")
        check_allocation(features * max(params.classes, 1) * 8, f"data.classes: the labelling projection of "
                                                                f"{features} features onto {params.classes} classes")
        projection_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        self.projection = projection_rng.standard_normal((features, max(params.classes, 1)))

    def __len__(self) -> int:
        return self.params.samples

    @property
    def has_labels(self) -> bool:
        return self.params.classes > 0

    def read(self, indices):
        p = self.params
        x = np.stack([np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(0, int(i)))).standard_normal(p.shape)
                      for i in indices])
        x = (p.mean + p.std * x).astype(np.float32)
        y = (x.reshape(len(x), -1) @ self.projection).argmax(axis=1) if p.classes > 0 else None
        return x, y


@hookimpl
def register_data_sources(register):
    register(SyntheticSource)
