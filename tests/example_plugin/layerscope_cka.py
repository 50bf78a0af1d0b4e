"""layerscope-cka: linear CKA between consecutive layers, as a third-party layerscope plugin.

Linear centred kernel alignment (Kornblith et al., ICML 2019) between the activations X and
Y of two layers on the same n samples:

    CKA(X, Y) = ‖Xcᵀ Yc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F),   Xc, Yc column-centred,

computed from streamed sums (n, Σx, Σy, XᵀX, YᵀY, XᵀY), so shards merge exactly. It is 1 when
Y is an orthogonal transform of X times a scalar (plus a shift), and for one-dimensional
jointly Gaussian X, Y with correlation ρ it is ρ².
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from layerscope import ACTIVATION_OPS, Estimator, TensorBatch, hookimpl
from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use, so `layerscope plugins` stays quick


class LinearCKAParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pool: bool = Field(
        True, description="average 4-D (N, C, H, W) tensors over H×W first, as is usual for CKA on conv layers"
    )


def features(values: torch.Tensor, pool: bool) -> torch.Tensor:
    """(samples, features) in float64: spatially averaged if *pool* and the tensor is 4-D or more."""
    if pool and values.ndim >= 4:
        values = values.flatten(2).mean(dim=2)
    return values.reshape(values.shape[0], -1).to(torch.float64)


def linear_cka(n: float, sum_x, sum_y, xx, yy, xy) -> float:
    """Linear CKA from the streamed sums (see module docstring)."""
    mean_x, mean_y = sum_x / n, sum_y / n
    cross = xy - n * torch.outer(mean_x, mean_y)
    self_x = xx - n * torch.outer(mean_x, mean_x)
    self_y = yy - n * torch.outer(mean_y, mean_y)
    return float(torch.linalg.norm(cross) ** 2 / (torch.linalg.norm(self_x) * torch.linalg.norm(self_y)))


class LinearCKA(Estimator):
    """Linear CKA between every selected tensor and the next one in forward order."""

    name = "linear_cka"
    Params = LinearCKAParams
    params: LinearCKAParams  # for type checkers: self.params is a LinearCKAParams
    sums: dict[str, dict[str, torch.Tensor]]  # the state declared in setup, as type checkers see it
    default_selector = {"op_type": list(ACTIVATION_OPS)}

    def setup(self) -> None:
        names = sorted(self.tensors, key=lambda n: self.tensors[n].order)
        self.pairs = list(zip(names, names[1:]))
        self.add_state("sums", {}, "sum")  # "first|second" -> dict of sums

    def fetch_groups(self):
        return self.pairs  # both layers of a pair must come from the same forward pass

    def update(self, batch: TensorBatch) -> None:
        for first, second in self.pairs:
            if first in batch.tensors and second in batch.tensors:
                x = features(batch.tensors[first], self.params.pool)
                y = features(batch.tensors[second], self.params.pool)
                new = {
                    "n": torch.tensor(float(len(x)), dtype=torch.float64),
                    "sum_x": x.sum(0),
                    "sum_y": y.sum(0),
                    "xx": x.T @ x,
                    "yy": y.T @ y,
                    "xy": x.T @ y,
                }
                self.accumulate("sums", new, f"{first}|{second}")

    def finalize(self) -> list[dict]:
        records = []
        for first, second in self.pairs:
            sums = self.sums.get(f"{first}|{second}")
            if sums is not None:
                value = linear_cka(float(sums["n"]), sums["sum_x"], sums["sum_y"], sums["xx"], sums["yy"], sums["xy"])
                records.append(self.record(second, "linear_cka", value, "", previous=self.tensors[first].layer))
        return records


@hookimpl
def register_estimators(register):
    register(LinearCKA)
