"""Mean-dimension figure: the mean dimension by layer, and a heatmap of the input features' total indices."""

from __future__ import annotations

import math

import numpy as np


def _heatmap_grid(records: list[dict]) -> np.ndarray:
    """Total indices laid out on the input grid (a flat square input is drawn as a square)."""
    grid = list(records[0]["grid"])
    if len(grid) == 1 and math.isqrt(grid[0]) ** 2 == grid[0]:
        side = math.isqrt(grid[0])
        values = np.zeros(grid[0])
        for r in records:
            values[r["position"][0]] = r["value"]
        return values.reshape(side, side)
    values = np.zeros(grid)
    for r in records:
        values[tuple(r["position"])] = r["value"]
    return values if values.ndim == 2 else values.reshape(values.shape[0], -1).sum(axis=0, keepdims=True)


def plot_mean_dimension(records: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    means = [r for r in records if r["metric"] == "mean_dimension"]
    for model in dict.fromkeys(r["model"] for r in means):
        mine = [r for r in means if r["model"] == model]
        left.plot([r["layer"] for r in mine], [r["value"] for r in mine], marker="o", label=str(model))
    left.set_xlabel("layer")
    left.set_ylabel("mean dimension")
    left.set_title("Mean dimension by layer")
    left.tick_params(axis="x", labelrotation=45)
    if len({r["model"] for r in means}) > 1:
        left.legend(fontsize="small")
    totals = [r for r in records if r["metric"] == "total_index"]
    if totals:
        last_model = totals[-1]["model"]
        tensors = list(dict.fromkeys(r["tensor"] for r in totals if r["model"] == last_model))
        target = "nll" if "nll" in tensors else tensors[-1]
        chosen = [r for r in totals if r["model"] == last_model and r["tensor"] == target]
        grid = _heatmap_grid(chosen)
        if grid.shape[0] == 1:
            right.bar(range(grid.shape[1]), grid[0])
            right.set_xlabel("feature")
        else:
            image = right.imshow(grid, cmap="magma")
            figure.colorbar(image, ax=right, label="total index")
        right.set_title(f"Total indices of {chosen[0]['layer']} ({last_model}, basis {chosen[0].get('basis', 'input')})",
                        fontsize="medium")
    return figure
