"""The ``synthetic`` data source: seeded Gaussian or uniform samples with optional labels.

``distribution: normal`` (the default) draws N(mean, std²) per value; ``distribution: uniform``
draws U(low, high) per value (the inputs the mean-dimension test functions are defined on).

Sample *i* is drawn from its own generator (``SeedSequence(seed, spawn_key=(0, i))``), so
any subset, order or shard reads the same values. With ``classes: k`` the label is the argmax of a fixed
random linear projection, so labels depend on the data.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from layerscope import DataSource, hookimpl
from layerscope.data.source import check_allocation
from layerscope.util.params import Count


class SyntheticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: Count = Field(1000, description="how many samples")
    shape: list[Count] = Field(default_factory=lambda: [64], description="the shape of one sample")
    classes: StrictInt = Field(
        10, ge=0, description="labels: the argmax of a fixed random projection onto this many classes; 0 for no labels"
    )
    distribution: Literal["normal", "uniform"] = Field(
        "normal", description="normal: N(mean, std²); uniform: U(low, high)"
    )
    mean: float = Field(0.0, description="distribution normal: the mean")
    std: float = Field(1.0, gt=0, description="distribution normal: the standard deviation")
    low: float = Field(0.0, description="distribution uniform: the lower bound")
    high: float = Field(1.0, description="distribution uniform: the upper bound")

    @model_validator(mode="after")
    def _parameters_of_the_distribution(self) -> SyntheticParams:
        own = {"normal": {"mean", "std"}, "uniform": {"low", "high"}}
        foreign = sorted(self.model_fields_set & (own["normal"] | own["uniform"]) - own[self.distribution])
        if foreign:
            raise ValueError(
                f"{', '.join(foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to "
                f"distribution: {self.distribution} (it takes {' and '.join(sorted(own[self.distribution]))})"
            )
        if self.distribution == "uniform" and not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class SyntheticSource(DataSource):
    name = "synthetic"
    Params = SyntheticParams
    params: SyntheticParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        features = math.prod(params.shape)
        check_allocation(features * 4, f"data.shape: one sample of shape {params.shape}")
        check_allocation(
            features * max(params.classes, 1) * 8,
            f"data.classes: the labelling projection of {features} features onto {params.classes} classes",
        )
        projection_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        self.projection = projection_rng.standard_normal((features, max(params.classes, 1)))

    def __len__(self) -> int:
        return self.params.samples

    @property
    def has_labels(self) -> bool:
        return self.params.classes > 0

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        """One sample's values from its own generator."""
        p = self.params
        if p.distribution == "uniform":
            return rng.uniform(p.low, p.high, p.shape)
        return p.mean + p.std * rng.standard_normal(p.shape)

    def read(self, indices):
        p = self.params
        x = np.stack(
            [
                self._draw(np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(0, int(i)))))
                for i in indices
            ]
        ).astype(np.float32)
        y = (x.reshape(len(x), -1) @ self.projection).argmax(axis=1) if p.classes > 0 else None
        return x, y


@hookimpl
def register_data_sources(register):
    register(SyntheticSource)
