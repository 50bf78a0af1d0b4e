"""Aggregation figure: predicted pdfs over empirical histograms (a channel over all samples; output node k for
class k against the rest of the classes), and predicted vs empirical one-vs-rest KL."""

from __future__ import annotations

import math

import numpy as np

from layerscope.plugins.reporters.labels import keep_full_name, short_names


def _title(ax, layer: str, what: str) -> None:
    """A panel's title: the layer's name shortened from the left (the full name the SVG's tooltip), then *what*."""
    title = ax.set_title(f"{short_names([layer])[layer]} {what}", fontsize="small")
    keep_full_name(title, f"{layer} {what}")


def _value(records: list[dict], metric: str, tensor: str, **keys) -> float:
    return next(
        r["value"]
        for r in records
        if r["metric"] == metric and r["tensor"] == tensor and all(r.get(k) == v for k, v in keys.items())
    )


def _channel_panel(ax, mine: list[dict], tensor: str, channel: int, bins: list[dict], grid: np.ndarray) -> None:
    """A channel's histogram over all samples and the prediction: the mixture of the classes' moment-matched
    Gammas, weighted by class size (or the single Gamma without labels)."""
    from scipy import stats

    components = [
        r
        for r in mine
        if r["metric"] == "predicted_mean" and r["tensor"] == tensor and r["channel"] == channel and r["class"] != "all"
    ] or [r for r in mine if r["metric"] == "predicted_mean" and r["tensor"] == tensor and r["channel"] == channel]
    total = sum(c["samples"] for c in components)
    pdf = 0
    for component in components:
        mean = component["value"]
        var = _value(mine, "predicted_var", tensor, channel=channel, **{"class": component["class"]})
        pdf = pdf + component["samples"] / total * stats.gamma.pdf(grid, mean**2 / var, scale=var / mean)
    ax.bar(
        [b["bin_center"] for b in bins],
        [b["value"] for b in bins],
        width=bins[0]["bin_width"],
        color="0.75",
        label="empirical",
    )
    ax.plot(grid, pdf, color="tab:red", label="predicted")
    _title(ax, bins[0]["layer"], f"channel {channel}")


def _node_panel(
    ax, mine: list[dict], tensor: str, node: int, bins: list[dict], rest: list[dict], grid: np.ndarray
) -> None:
    """Output node k: class k's histogram and the other classes' on their shared binning, with the two predicted
    Gaussians whose KL is ``kl_predicted``."""
    from scipy import stats

    cls = bins[0]["class"]
    keys = {"node": node, "class": cls}
    width = bins[0]["bin_width"]
    ax.bar(
        [b["bin_center"] for b in bins],
        [b["value"] for b in bins],
        width=width,
        color="tab:blue",
        alpha=0.45,
        label=f"class {cls}",
    )
    mean, var = (_value(mine, m, tensor, **keys) for m in ("node_predicted_mean", "node_predicted_var"))
    ax.plot(grid, stats.norm.pdf(grid, mean, math.sqrt(var)), color="tab:blue")
    if rest:
        ax.bar(
            [b["bin_center"] for b in rest],
            [b["value"] for b in rest],
            width=width,
            color="tab:orange",
            alpha=0.45,
            label="rest",
        )
        mean, var = (_value(mine, m, tensor, **keys) for m in ("node_rest_predicted_mean", "node_rest_predicted_var"))
        ax.plot(grid, stats.norm.pdf(grid, mean, math.sqrt(var)), color="tab:orange")
    kl = _value(mine, "kl_predicted", tensor, **keys)
    _title(ax, bins[0]["layer"], f"node {node}: class {cls} vs rest (KL {kl:.2g})")
    ax.legend(fontsize="xx-small")


def plot_aggregation(records: list[dict]):
    """One panel per recorded histogram of the last model (lines: predicted pdfs), a KL scatter, and a note of the
    constant (dead) channels left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last_model = records[-1]["model"]
    mine = [r for r in records if r["model"] == last_model]
    panels: dict[tuple, list[dict]] = {}
    rests: dict[tuple, list[dict]] = {}
    for r in mine:
        if r["metric"] == "histogram":
            key = ("channel", r["tensor"], r["channel"]) if "channel" in r else ("node", r["tensor"], r["node"])
            (rests if r.get("group") == "rest" else panels).setdefault(key, []).append(r)
    count = len(panels) + 1
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.9 * rows), layout="constrained", squeeze=False)
    flat = axes.ravel()
    for ax, ((kind, tensor, index), bins) in zip(flat, panels.items()):
        centres = [b["bin_center"] for b in bins + rests.get((kind, tensor, index), [])]
        half = bins[0]["bin_width"] / 2
        grid = np.linspace(min(centres) - half, max(centres) + half, 300)
        if kind == "channel":
            _channel_panel(ax, mine, tensor, index, bins, grid)
        else:
            _node_panel(ax, mine, tensor, index, bins, rests.get((kind, tensor, index), []), grid)
        ax.tick_params(labelsize="x-small")
    scatter = flat[len(panels)]
    predicted = {(r["tensor"], r["node"], r["class"]): r["value"] for r in mine if r["metric"] == "kl_predicted"}
    empirical = {(r["tensor"], r["node"], r["class"]): r["value"] for r in mine if r["metric"] == "kl_empirical"}
    pairs = [(predicted[k], empirical[k]) for k in predicted if k in empirical]
    if pairs:
        xs, ys = zip(*pairs)
        scatter.scatter(xs, ys, s=12)
        top = max(max(xs), max(ys))
        scatter.plot([0, top], [0, top], color="0.4", linestyle="--", linewidth=0.8)
    scatter.set_xlabel("KL predicted [nats]", fontsize="small")
    scatter.set_ylabel("KL empirical [nats]", fontsize="small")
    scatter.set_title("one-vs-rest KL per node and class", fontsize="small")
    for ax in flat[len(panels) + 1 :]:
        ax.axis("off")
    channel_panels = [key for key in panels if key[0] == "channel"]
    if channel_panels:
        flat[0].legend(fontsize="x-small")
    dead = {r["layer"]: r.get("constant_channels", 0) for r in mine if r["metric"] == "effective_m"}
    notes = [
        f"{layer}: {count} constant (dead) channel{'' if count == 1 else 's'} not drawn"
        for layer, count in dead.items()
        if count
    ]
    if notes:
        figure.supxlabel("; ".join(notes), fontsize="small")
    return figure
