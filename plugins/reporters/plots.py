"""Reporter ``plots``: one figure per analysis (PNG and SVG under ``plots/``), drawn headless.

An estimator supplies its own figure through ``Estimator.plot(records)``; for the others
the default is the main metric by layer, one line per model (checkpoint).
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

from layerscope import Reporter, Results, hookimpl
from layerscope.util.files import atomic_write, inside


def draw_by_layer(axes, records: list[dict]) -> None:
    """*records* (one metric) as a line per model over its layers in record (forward) order. Models of one
    network share the layer axis; models of different networks (a ``models:`` spec, ``layerscope compare``)
    have different layers, so each is drawn on a relative depth axis (0: its first layer, 1: its last),
    every point labelled with its own layer name."""
    series: dict[str, dict[str, float]] = defaultdict(dict)
    for record in records:
        series[record["model"]][record["layer"]] = record["value"]
    compared = len({r.get("network") for r in records}) > 1
    for model, by_layer in series.items():
        layers = list(by_layer)
        xs = [i / max(1, len(layers) - 1) for i in range(len(layers))] if compared else layers
        axes.plot(xs, list(by_layer.values()), marker="o", label=str(model))
        for x, layer in zip(xs, layers) if compared else ():
            axes.annotate(
                layer, (x, by_layer[layer]), fontsize=6, rotation=45, xytext=(2, 3), textcoords="offset points"
            )
    if compared:
        axes.set_xlim(-0.03, 1.1)
        axes.set_xlabel("relative depth (0: first layer, 1: last)")
    else:
        axes.set_xlabel("layer")
        axes.tick_params(axis="x", labelrotation=45)
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


def analysis_figures(results: Results, host, formats: tuple[str, ...] = ("png", "svg")):
    """Yield ``(analysis, {format: bytes})`` for every analysis with records: the estimator's own
    plot when its plugin is loaded and provides one, else :func:`default_plot`. The bytes carry
    no creation date, so rebuilding from ``results.json`` gives identical files."""
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.rcParams["svg.hashsalt"] = "layerscope"  # stable element ids in SVG output
    for analysis in results.analyses:
        records = [r for r in results.records if r["analysis"] == analysis["id"]]
        if not records:
            continue
        estimator = (
            host.estimators.get(analysis["estimator"]) if host and analysis["estimator"] in host.estimators else None
        )
        figure = (estimator.plot(records) if estimator else None) or default_plot(records)
        figure.suptitle(f"{analysis['id']} ({analysis['estimator']})", fontsize="medium")
        rendered = {}
        for suffix in formats:
            buffer = io.BytesIO()
            metadata = {"Date": None} if suffix == "svg" else {"Software": None}
            figure.savefig(buffer, format=suffix, dpi=120, metadata=metadata)
            rendered[suffix] = buffer.getvalue()
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
