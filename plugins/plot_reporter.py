"""Reporter ``plots``: one figure per analysis (PNG and SVG under ``plots/``), drawn headless.

An estimator supplies its own figure through ``Estimator.plot(records)``; for the others
the default is the main metric by layer, one line per model (checkpoint).
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

from layerscope import Reporter, Results, hookimpl
from layerscope.results import atomic_write


def default_plot(records: list[dict]):
    """The first metric of the records against layer (in record order), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = records[0]["metric"]
    series: dict[str, dict[str, float]] = defaultdict(dict)
    for record in records:
        if record["metric"] == metric and record.get("class", "all") == "all":
            series[record["model"]][record["layer"]] = record["value"]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for model, by_layer in series.items():
        axes.plot(list(by_layer), list(by_layer.values()), marker="o", label=model)
    axes.set_xlabel("layer")
    axes.set_ylabel(f"{metric} [{records[0].get('unit') or '-'}]")
    axes.tick_params(axis="x", labelrotation=45)
    if len(series) > 1:
        axes.legend(fontsize="small")
    return figure


class PlotReporter(Reporter):
    name = "plots"

    def write(self, results: Results, out_dir: Path) -> list[str]:
        import matplotlib.pyplot as plt

        written = []
        for analysis in results.analyses:
            records = [r for r in results.records if r["analysis"] == analysis["id"]]
            if not records:
                continue
            estimator = self.host.estimators.get(analysis["estimator"]) if self.host else None
            figure = (estimator.plot(records) if estimator else None) or default_plot(records)
            figure.suptitle(f"{analysis['id']} ({analysis['estimator']})", fontsize="medium")
            for suffix in ("png", "svg"):
                buffer = io.BytesIO()
                figure.savefig(buffer, format=suffix, dpi=120)
                relative = f"plots/{analysis['id']}.{suffix}"
                atomic_write(out_dir / relative, buffer.getvalue())
                written.append(relative)
            plt.close(figure)
        return written


@hookimpl
def register_reporters(register):
    register(PlotReporter)
