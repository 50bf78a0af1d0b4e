"""Reporter ``plots``: one figure per analysis (PNG and SVG under ``plots/``), drawn headless.

An estimator supplies its own figure through ``Estimator.plot(records)``; for the others
the default is the main metric by layer, one line per model (checkpoint). Every figure is grown
to fit its labels (:mod:`layerscope.plugins.reporters.fit`); layer names are shortened from the
left, their full names the SVG's tooltips (:mod:`layerscope.plugins.reporters.labels`).
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

from layerscope import Reporter, Results, hookimpl
from layerscope.util.files import atomic_write, inside

from .fit import fit_to_labels
from .labels import label_layers, layer_bands, svg_with_titles

DPI = 120


def _layers_by_network(records: list[dict]) -> dict[object, list[str]]:
    """Each network's layers (``network`` of the records, None in a single-network run) in record (forward)
    order, over all of its models."""
    layers: dict[object, dict[str, None]] = defaultdict(dict)
    for record in records:
        layers[record.get("network")][record["layer"]] = None
    return {network: list(names) for network, names in layers.items()}


def draw_by_layer(axes, records: list[dict]) -> None:
    """*records* (one metric) as a line per model over its layers in record (forward) order. Models whose
    networks have the same layers (the checkpoints of one network, or networks of one architecture) share the
    layer axis, its tick labels the layer names shortened from the left
    (:func:`~layerscope.plugins.reporters.labels.label_layers`). Networks with different layers (a ``models:``
    spec, ``layerscope compare``) are drawn on a relative depth axis (0: a network's first layer, 1: its last),
    with each network's layer names in a band of its own under the plot
    (:func:`~layerscope.plugins.reporters.labels.layer_bands`)."""
    series: dict[str, dict[str, float]] = defaultdict(dict)
    network_of = {}
    for record in records:
        series[record["model"]][record["layer"]] = record["value"]
        network_of[record["model"]] = record.get("network")
    layers = _layers_by_network(records)
    shared = len({tuple(names) for names in layers.values()}) == 1
    positions = {
        network: {layer: (i if shared else i / max(1, len(names) - 1)) for i, layer in enumerate(names)}
        for network, names in layers.items()
    }
    for model, by_layer in series.items():
        where = positions[network_of[model]]
        axes.plot([where[layer] for layer in by_layer], list(by_layer.values()), marker="o", label=str(model))
    if shared:
        names = next(iter(layers.values()))
        label_layers(axes, range(len(names)), names)
        axes.set_xlabel("layer")
    else:
        axes.set_xlim(-0.03, 1.03)
        layer_bands(axes, {network: [(where[n], n) for n in layers[network]] for network, where in positions.items()})
        axes.set_xlabel("relative depth (0: first layer, 1: last)")
    if len(series) > 1:
        axes.legend(fontsize="small")


def default_plot(records: list[dict]):
    """The first metric of the records (class ``all``) against layer, one line per model (:func:`draw_by_layer`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = records[0]["metric"]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    draw_by_layer(axes, [r for r in records if r["metric"] == metric and r.get("class", "all") == "all"])
    axes.set_ylabel(f"{metric} [{records[0].get('unit') or '-'}]")
    return figure


def analysis_figure(analysis: dict, records: list[dict], host):
    """The figure of one *analysis* (an entry of ``Results.analyses``) from its *records*: the estimator's
    own plot when its plugin is loaded (in *host*) and provides one, else :func:`default_plot`; titled
    with the analysis and grown to fit its labels (:func:`~layerscope.plugins.reporters.fit.fit_to_labels`)."""
    estimator = (
        host.estimators.get(analysis["estimator"]) if host and analysis["estimator"] in host.estimators else None
    )
    figure = (estimator.plot(records) if estimator else None) or default_plot(records)
    figure.suptitle(f"{analysis['id']} ({analysis['estimator']})", fontsize="medium")
    fit_to_labels(figure)
    return figure


def analysis_figures(results: Results, host, formats: tuple[str, ...] = ("png", "svg")):
    """Yield ``(analysis, {format: bytes})`` for every analysis with records (:func:`analysis_figure`); in the
    SVG every shortened layer name has its full name as title (a tooltip). The bytes carry no creation date,
    so rebuilding from ``results.json`` gives identical files."""
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "layerscope"  # stable element ids in SVG output
    for analysis in results.analyses:
        records = [r for r in results.records if r["analysis"] == analysis["id"]]
        if not records:
            continue
        figure = analysis_figure(analysis, records, host)
        rendered = {}
        for suffix in formats:
            buffer = io.BytesIO()
            metadata = {"Date": None} if suffix == "svg" else {"Software": None}
            figure.savefig(buffer, format=suffix, dpi=DPI, metadata=metadata)
            rendered[suffix] = svg_with_titles(figure, buffer.getvalue()) if suffix == "svg" else buffer.getvalue()
        plt.close(figure)
        yield analysis, rendered


class PlotReporter(Reporter):
    name = "plots"

    def write(self, results: Results, out_dir: Path) -> list[str]:
        written = []
        for analysis, rendered in analysis_figures(results, self.host):
            for suffix, data in rendered.items():
                relative = f"plots/{analysis['id']}.{suffix}"
                atomic_write(inside(out_dir, relative), data)
                written.append(relative)
        return written


@hookimpl
def register_reporters(register):
    register(PlotReporter)
