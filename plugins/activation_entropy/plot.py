"""Activation-entropy figure: the entropy by layer (all samples, a line per checkpoint) and, per class, a
heatmap of class × layer for the last checkpoint — the per-class view the method is about."""

from __future__ import annotations

import numpy as np

from layerscope.plugins.reporters.labels import label_layers
from layerscope.plugins.reporters.plots import draw_by_layer
from layerscope.results.contract import class_order

ALL = "all"
#: Heatmaps with at most this many cells print their values.
ANNOTATED_CELLS = 160


def plot_activation_entropy(records: list[dict]):
    """Left: ``entropy`` of the pooled samples (class ``all``) by layer, a line per model (checkpoint;
    :func:`~layerscope.plugins.reporters.plots.draw_by_layer`). Then, when
    the records have classes, a heatmap per network (one in a single-model run) of the entropy of every class
    (rows) at every layer (columns), for the network's last checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entropy = [r for r in records if r["metric"] == "entropy"]
    models = list(dict.fromkeys(r["model"] for r in entropy))
    classes = [c for c in class_order(r["class"] for r in entropy) if c != ALL]
    last = {r.get("network"): r["model"] for r in entropy}  # each network's last checkpoint
    heatmaps = list(last.items()) if classes else []
    figure, panels = plt.subplots(
        1,
        1 + len(heatmaps),
        squeeze=False,
        layout="constrained",
        figsize=(6.4 + 5.6 * len(heatmaps), max(4.0, 0.32 * len(classes) + 1.8)),
    )
    pooled = panels[0][0]
    draw_by_layer(pooled, [r for r in entropy if r["class"] == ALL])
    unit = entropy[0].get("unit") or "bits"
    variant = entropy[0].get("variant", "binary")
    pooled.set_ylabel(f"entropy [{unit}]" + (" (mean over neurons)" if variant == "binary" else ""))
    pooled.set_title("all samples")
    shown = [r["value"] for r in entropy if r["class"] != ALL and r["model"] in dict(heatmaps).values()]
    scale = (min(shown), max(shown)) if shown else (0.0, 1.0)  # one colour scale: networks compare by colour
    for axes, (_, model) in zip(panels[0][1:], heatmaps):
        _class_heatmap(figure, axes, [r for r in entropy if r["model"] == model], classes, unit, scale)
        axes.set_title(f"per class ({model})" if len(models) > 1 else "per class")
    return figure


def _class_heatmap(figure, axes, records: list[dict], classes: list, unit: str, scale: tuple[float, float]) -> None:
    """Class × layer entropy of one model's records on the colour *scale* (low, high), values printed on small
    grids; the layer names shortened from the left (:func:`~layerscope.plugins.reporters.labels.label_layers`)."""
    layers = list(dict.fromkeys(r["layer"] for r in records))
    cells = {(r["class"], r["layer"]): r["value"] for r in records}
    grid = np.array([[cells.get((c, layer), np.nan) for layer in layers] for c in classes])
    image = axes.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest", vmin=scale[0], vmax=scale[1])
    label_layers(axes, range(len(layers)), layers)
    axes.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize="small")
    axes.set_ylabel("class")
    if grid.size <= ANNOTATED_CELLS:
        middle = sum(scale) / 2
        for (row, column), value in np.ndenumerate(grid):
            if np.isfinite(value):
                axes.text(
                    column,
                    row,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if value > middle else "white",
                )
    figure.colorbar(image, ax=axes, label=f"entropy [{unit}]")
