"""The information-plane figure: I(X;T) against I(T;Y), one trajectory per layer, coloured by checkpoint."""

from __future__ import annotations

from collections import defaultdict


def plot_information_plane(records: list[dict]):
    """A matplotlib figure of the paper's information plane from ``information_plane`` records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    points: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for record in records:
        if record["metric"] in ("I_XT", "I_TY"):
            points[record["layer"]][record["model"]][record["metric"]] = record["value"]
    figure, axes = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
    colormap = plt.get_cmap("viridis")
    markers = "os^Dv<>ph*"
    for index, (layer, by_model) in enumerate(points.items()):
        ordered = [(models.index(m), v["I_XT"], v["I_TY"]) for m, v in by_model.items() if {"I_XT", "I_TY"} <= set(v)]
        ordered.sort()
        xs, ys = [o[1] for o in ordered], [o[2] for o in ordered]
        axes.plot(xs, ys, color="0.6", linewidth=0.8, zorder=1)
        colours = [colormap(o[0] / max(len(models) - 1, 1)) for o in ordered]
        axes.scatter(xs, ys, c=colours, marker=markers[index % len(markers)], s=36, edgecolors="black",
                     linewidths=0.4, label=layer, zorder=2)
    axes.set_xlabel("I(X;T) [bits]")
    axes.set_ylabel("I(T;Y) [bits]")
    axes.set_title("Information plane")
    axes.legend(title="layer", fontsize="small")
    if len(models) > 1:
        mappable = plt.cm.ScalarMappable(cmap=colormap, norm=plt.Normalize(0, len(models) - 1))
        bar = figure.colorbar(mappable, ax=axes, ticks=range(len(models)))
        bar.ax.set_yticklabels(models, fontsize="x-small")
        bar.set_label("checkpoint")
    return figure
