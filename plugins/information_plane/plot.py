"""The information-plane figure: I(X;T) against I(T;Y), one trajectory per layer (per network), coloured by
checkpoint, with ± one standard deviation over batches as error bars."""

from __future__ import annotations

from collections import defaultdict

from layerscope.plugins.reporters.labels import keep_full_name, short_names

#: Steps spanning at least this ratio (all positive) are coloured on a log scale, as log-spaced iterations are.
LOG_SPAN = 100


def checkpoint_colours(records: list[dict], plt):
    """(colour of each model, colour bar mappable, bar label, tick labels or None). When every model has a ``step``
    the colour is the step (log scale when the steps are positive and span ≥ 100×), else the checkpoint's rank."""
    models = list(dict.fromkeys(r["model"] for r in records))
    given = {r["model"]: r.get("step") for r in records}
    steps = {m: step for m, step in given.items() if isinstance(step, int)}
    colormap = plt.get_cmap("viridis")
    if len(steps) == len(models) and len(set(steps.values())) > 1:  # every model has one, not all the same
        low, high = min(steps.values()), max(steps.values())
        norm = (
            plt.matplotlib.colors.LogNorm(low, high) if low > 0 and high >= LOG_SPAN * low else plt.Normalize(low, high)
        )
        return {m: colormap(norm(steps[m])) for m in models}, plt.cm.ScalarMappable(norm, colormap), "step", None
    norm = plt.Normalize(0, max(len(models) - 1, 1))
    return (
        {m: colormap(norm(i)) for i, m in enumerate(models)},
        plt.cm.ScalarMappable(norm, colormap),
        "checkpoint",
        models,
    )


def plot_information_plane(records: list[dict]):
    """A matplotlib figure of the paper's information plane from ``information_plane`` records: per layer (and
    network, in a multi-model run) the trajectory over checkpoints in checkpoint order, each point with error bars of
    the spread over batches (``I_XT_std``, ``I_TY_std``) when it is not zero (more than one batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in records))
    networks = list(dict.fromkeys(r.get("network") for r in records))
    points: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for record in records:
        if record["metric"] in ("I_XT", "I_TY", "I_XT_std", "I_TY_std"):
            points[(record.get("network"), record["layer"])][record["model"]][record["metric"]] = record["value"]
    spread = any(
        v.get("I_XT_std", 0.0) > 0 or v.get("I_TY_std", 0.0) > 0
        for by_model in points.values()
        for v in by_model.values()
    )
    colours, mappable, bar_label, tick_labels = checkpoint_colours(records, plt)
    short = short_names(layer for _, layer in points)
    figure, axes = plt.subplots(figsize=(6.4, 4.8), layout="constrained")
    markers = "os^Dv<>ph*"
    for index, ((network, layer), by_model) in enumerate(points.items()):
        ordered = [(m, by_model[m]) for m in models if {"I_XT", "I_TY"} <= set(by_model.get(m, {}))]
        xs, ys = [v["I_XT"] for _, v in ordered], [v["I_TY"] for _, v in ordered]
        axes.plot(xs, ys, color="0.6", linewidth=0.8, zorder=1)
        if spread:
            axes.errorbar(
                xs,
                ys,
                xerr=[v.get("I_XT_std", 0.0) for _, v in ordered],
                yerr=[v.get("I_TY_std", 0.0) for _, v in ordered],
                fmt="none",
                ecolor="0.45",
                elinewidth=0.7,
                capsize=2,
                zorder=1.5,
            )
        label = f"{network}: {short[layer]}" if len(networks) > 1 else short[layer]
        axes.scatter(
            xs,
            ys,
            c=[colours[m] for m, _ in ordered],
            marker=markers[index % len(markers)],
            s=36,
            edgecolors="black",
            linewidths=0.4,
            label=label,
            zorder=2,
        )
    axes.set_xlabel("I(X;T) [bits]")
    axes.set_ylabel("I(T;Y) [bits]")
    axes.set_title("Information plane" + (" (error bars: ± std over batches)" if spread else ""))
    legend = axes.legend(title="layer", fontsize="small")
    for text, (network, layer) in zip(legend.get_texts(), points):
        keep_full_name(text, f"{network}: {layer}" if len(networks) > 1 else layer)
    if len(models) > len(networks):  # several checkpoints of a network
        bar = figure.colorbar(mappable, ax=axes, ticks=range(len(models)) if tick_labels else None)
        if tick_labels:
            bar.ax.set_yticklabels(tick_labels, fontsize="x-small")
        bar.set_label(bar_label)
    return figure
