"""Aggregation figure: predicted pdfs over empirical histograms, and predicted vs empirical KL."""

from __future__ import annotations

import math

import numpy as np


def plot_aggregation(records: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    last_model = records[-1]["model"]
    mine = [r for r in records if r["model"] == last_model]
    panels: dict[tuple, list[dict]] = {}
    for r in mine:
        if r["metric"] == "histogram":
            key = ("channel", r["tensor"], r["channel"]) if "channel" in r else ("node", r["tensor"], r["node"])
            panels.setdefault(key, []).append(r)
    count = len(panels) + 1
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), layout="constrained", squeeze=False)
    flat = axes.ravel()
    def predicted(metric: str, tensor: str, **keys) -> float:
        return next(r["value"] for r in mine if r["metric"] == metric and r["tensor"] == tensor
                    and all(r.get(k) == v for k, v in keys.items()))

    for ax, ((kind, tensor, index), bins) in zip(flat, panels.items()):
        centres = np.array([b["bin_center"] for b in bins])
        width = bins[0]["bin_width"]
        ax.bar(centres, [b["value"] for b in bins], width=width, color="0.75", label="empirical")
        grid = np.linspace(centres[0] - width / 2, centres[-1] + width / 2, 300)
        if kind == "channel":  # the mixture of the classes' moment-matched Gammas (or the single one)
            components = [r for r in mine if r["metric"] == "predicted_mean" and r["tensor"] == tensor
                          and r["channel"] == index and r["class"] != "all"] or \
                         [r for r in mine if r["metric"] == "predicted_mean" and r["tensor"] == tensor
                          and r["channel"] == index]
            total = sum(c["samples"] for c in components)
            pdf = 0
            for component in components:
                mean = component["value"]
                var = predicted("predicted_var", tensor, channel=index, **{"class": component["class"]})
                pdf = pdf + component["samples"] / total * stats.gamma.pdf(grid, mean**2 / var, scale=var / mean)
            ax.set_title(f"{bins[0]['layer']} channel {index}", fontsize="small")
        else:
            keys = {"node": index, "class": bins[0]["class"]}
            mean, var = (predicted(m, tensor, **keys) for m in ("node_predicted_mean", "node_predicted_var"))
            pdf = stats.norm.pdf(grid, mean, math.sqrt(var))
            ax.set_title(f"{bins[0]['layer']} node {index} | class {bins[0]['class']}", fontsize="small")
        ax.plot(grid, pdf, color="tab:red", label="predicted")
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
    for ax in flat[len(panels) + 1:]:
        ax.axis("off")
    if panels:
        flat[0].legend(fontsize="x-small")
    return figure
