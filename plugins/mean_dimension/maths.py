"""Given-data total Sobol indices and the mean dimension (Hahn, Feinauer & Borgonovo).

For consecutive pairs (x_j, x_{j+1}) of a shuffled data stream and each feature group u,
the finite change Δ_u^{(j)} = f(x_j with u taken from x_{j+1}) − f(x_j) estimates the
(generalised) total index of every output node,

    T_u = Var_j(Δ_u) / (2 Var_j f(x_j))      (``variance``, the reference code's choice), or
    T_u = ½ E_j[Δ_u²] / Var_j f(x_j)         (``half_mean_square``, the Jansen form),

with population variances, and the mean dimension ν = Σ_u T_u (Σ_i T_i for single
features). Statistics are streamed as sums so shards merge exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use: listing plugins does not load it


@dataclass(frozen=True)
class FeatureGroups:
    """Flat-index groups of one sample's features and a readable position for each."""

    indices: list[np.ndarray]
    positions: Sequence[Sequence[int | np.integer]]  # numpy integers where np.unravel_index gives them
    grid: tuple[int, ...]  # the shape positions refer to (for heatmaps)

    def __len__(self) -> int:
        return len(self.indices)


def feature_groups(sample_shape: tuple[int, ...], features: str, channels_last: bool = False) -> FeatureGroups:
    """Groups for ``elements`` | ``pixels`` | ``channels`` | ``patches:k`` over a (C,H,W), (H,W) or flat sample.

    ``pixels`` are spatial positions with all their channels; ``channels`` the slices along
    the channel axis; ``patches:k`` k×k spatial blocks with all channels. With
    *channels_last* the sample is (H,W,C) (a Keras input): indices still address the flat
    sample as stored, positions are given as for (C,H,W).
    """
    flat = np.arange(math.prod(sample_shape)).reshape(sample_shape)
    if channels_last and len(sample_shape) == 3:
        flat = np.moveaxis(flat, -1, 0)
        sample_shape = flat.shape
    if features == "elements" or (features == "pixels" and len(sample_shape) < 3):
        return FeatureGroups(
            [np.array([i]) for i in flat.ravel()],
            [list(np.unravel_index(i, sample_shape)) for i in range(flat.size)],
            sample_shape,
        )
    if len(sample_shape) < 2:
        raise ValueError(f"features: {features} needs samples with a channel or spatial axis, not shape {sample_shape}")
    if features == "channels":
        return FeatureGroups(
            [flat[c].ravel() for c in range(sample_shape[0])], [[c] for c in range(sample_shape[0])], (sample_shape[0],)
        )
    spatial = flat if len(sample_shape) == 2 else flat.reshape(sample_shape[0], *sample_shape[-2:])
    height, width = spatial.shape[-2:]
    k = 1 if features == "pixels" else int(features.split(":", 1)[1])
    indices, positions = [], []
    for top in range(0, height, k):
        for left in range(0, width, k):
            indices.append(spatial[..., top : top + k, left : left + k].ravel())
            positions.append([top // k, left // k])
    return FeatureGroups(indices, positions, (math.ceil(height / k), math.ceil(width / k)))


def plan_rows(base: np.ndarray, neighbours: np.ndarray, groups: FeatureGroups) -> np.ndarray:
    """(P·(G+1), D) rows: the P base rows, then for each pair p (pair-major) and group u, base_p
    with u taken from neighbour_p. Built in one allocation and one scattered assignment."""
    pairs, features = base.shape
    rows = np.empty((pairs * (len(groups) + 1), features), dtype=base.dtype)
    rows[:pairs] = base
    perturbed = rows[pairs:].reshape(pairs, len(groups), features)
    perturbed[:] = base[:, None, :]
    group_of = np.concatenate([np.full(len(index), u) for u, index in enumerate(groups.indices)])
    feature_of = np.concatenate(groups.indices)
    perturbed[:, group_of, feature_of] = neighbours[:, feature_of]
    return rows


def total_indices(
    count: float,
    f_sum: torch.Tensor,
    f_squares: torch.Tensor,
    delta_sum: torch.Tensor,
    delta_squares: torch.Tensor,
    estimator: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T of shape (groups, nodes), Var f of shape (nodes,)) from streamed sums over *count* pairs."""
    variance_f = f_squares / count - (f_sum / count) ** 2
    mean_square = delta_squares / count
    numerator = mean_square - (delta_sum / count) ** 2 if estimator == "variance" else mean_square
    return numerator / (2.0 * variance_f), variance_f
