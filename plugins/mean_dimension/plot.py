"""Mean-dimension figure: the mean dimension by layer, and a heatmap of the input features' total indices."""

from __future__ import annotations

import math

import numpy as np

from layerscope.plugins.reporters.labels import keep_full_name, short_names
from layerscope.plugins.reporters.plots import draw_by_layer


def total_index_layout(records: list[dict]) -> tuple[str, np.ndarray]:
    """("bars", one value per feature) or ("image", a 2-D map) for the total indices of one tensor.

    Principal components (``basis: pca``) and flat inputs whose size is not a square are features
    without a spatial layout: one bar each. A flat square input (digits' 64 pixels) is drawn as a
    square image, (H, W) grids as they are, and (C, H, W) elements summed over the channels.
    """
    grid = list(records[0]["grid"])
    values = np.zeros(grid)
    for r in records:
        values[tuple(r["position"])] = r["value"]
    if values.ndim == 1:
        side = math.isqrt(len(values))
        square = side * side == len(values) and records[0].get("basis", "input") == "input"
        return ("image", values.reshape(side, side)) if square else ("bars", values)
    return "image", values if values.ndim == 2 else values.reshape(values.shape[0], *values.shape[-2:]).sum(axis=0)


def plot_mean_dimension(records: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    draw_by_layer(left, [r for r in records if r["metric"] == "mean_dimension"])
    left.set_ylabel("mean dimension")
    left.set_title("Mean dimension by layer")
    totals = [r for r in records if r["metric"] == "total_index"]
    if totals:
        last_model = totals[-1]["model"]
        tensors = list(dict.fromkeys(r["tensor"] for r in totals if r["model"] == last_model))
        target = "nll" if "nll" in tensors else tensors[-1]
        chosen = [r for r in totals if r["model"] == last_model and r["tensor"] == target]
        kind, values = total_index_layout(chosen)
        if kind == "bars":
            right.bar(range(len(values)), values)
            right.set_xlabel("principal component" if chosen[0].get("basis") == "pca" else "feature")
            right.set_ylabel("total index")
        else:
            image = right.imshow(values, cmap="magma")
            figure.colorbar(image, ax=right, label="total index")
        layer = chosen[0]["layer"]
        title = right.set_title(
            f"Total indices of {short_names([layer])[layer]} ({last_model}, basis {chosen[0].get('basis', 'input')})",
            fontsize="medium",
        )
        keep_full_name(title, f"Total indices of {layer}")
    return figure
