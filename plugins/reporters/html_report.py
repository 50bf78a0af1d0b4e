"""Reporter ``html``: one self-contained ``report.html`` (images embedded, no network needed).

Sections: provenance (spec, model sources and hashes, versions, provider, seed, timings,
warnings, failures; for ``layerscope compare`` each run's), a model summary (the analysed
tensors of every model, with layer, op type, shape and the analyses that read them), and per
analysis its parameters, its figure and its records as sortable pivot tables
(:mod:`layerscope.plugins.reporters.pivot`: a row per layer, a column per metric, or per class
for a metric recorded per class; every record is in ``records.csv``). The page holds no
generation time, so rebuilding it from ``results.json`` (``layerscope report RUN_DIR``) gives
the same bytes.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from layerscope import Reporter, Results, hookimpl
from layerscope.util.files import atomic_write

from .pivot import pivot_records
from .plots import analysis_figures

TABLE_ROWS = 400  # rows shown per pivot table (every record is in results.json and records.csv)
HIDDEN_METRICS = {"histogram"}  # plot data, not worth a table row
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem}
h1{font-size:1.6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.6rem 0}
td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}
th{background:#f3f3f3}table.sortable th{cursor:pointer}table.sortable th:after{content:" ⇅";color:#999}
img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:.6rem;overflow:auto;font-size:.8rem}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.4rem .8rem}.warn{color:#8a5300}.fail{color:#b00020}
.scroll{max-height:28rem;overflow:auto}
"""
SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(header, column){
    header.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.from(body.rows);
      var ascending = header.dataset.order !== 'asc'; header.dataset.order = ascending ? 'asc' : 'desc';
      rows.sort(function(a, b){
        var x = a.cells[column].textContent, y = b.cells[column].textContent, p = parseFloat(x), q = parseFloat(y);
        var order = (!isNaN(p) && !isNaN(q)) ? p - q : x.localeCompare(y);
        return ascending ? order : -order;
      });
      rows.forEach(function(row){ body.appendChild(row); });
    });
  });
});
window.addEventListener('load', function(){
  var images = Array.from(document.images);
  document.body.dataset.imagesLoaded = images.filter(function(i){ return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.images = images.length;
});
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def table(rows: list[dict], columns: list[str], sortable: bool = True) -> str:
    """An HTML table of *rows* (dicts) with *columns*."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c, ''))}</td>" for c in columns) + "</tr>" for row in rows)
    return (
        f'<table class="{"sortable" if sortable else ""}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


#: The runtime entries the provenance table shows, after the layerscope version (those the results have:
#: results of older versions lack the newer entries).
FACTS = ("onnxruntime", "onnxruntime_package", "torch", "provider", "device", "seed", "samples", "seconds")


def _facts(results: Results) -> tuple[list[dict], list[str]]:
    """The provenance table's rows and columns: a value column, or for ``layerscope compare`` (whose runtime
    keeps every run's, ``runtime.compared``) a column per run, with each run's id."""
    compared = results.runtime.get("compared")
    if not compared:
        rows: list[dict] = [{"": "layerscope", "value": results.layerscope}]
        rows += [{"": key, "value": results.runtime[key]} for key in FACTS if key in results.runtime]
        return rows, ["", "value"]
    labels = [str(run.get("label")) for run in compared]
    rows = [
        {"": key, **{label: run.get(key) for label, run in zip(labels, compared)}}
        for key in ("layerscope", "run_id", *FACTS)
        if key not in FACTS or any(key in run for run in compared)
    ]
    return rows, ["", *labels]


def _provenance(results: Results) -> str:
    facts, columns = _facts(results)
    models = [{**m, "sha256": m.get("sha256", "")[:16]} for m in results.models]
    parts = [
        "<h2 id='provenance'>Provenance</h2>",
        table(facts, columns, sortable=False),
        "<h3>Models</h3>",
        table(models, ["label", "source", "framework", "sha256", "provider", "passes", "fetch_groups"], sortable=False),
    ]
    if results.warnings:
        parts.append(
            "<h3>Warnings</h3><ul>"
            + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in results.warnings)
            + "</ul>"
        )
    if results.failures:
        parts.append(
            "<h3>Failures</h3>"
            + table(results.failures, ["analysis", "estimator", "plugin", "model", "phase", "error"], sortable=False)
        )
    parts.append(
        "<details><summary>Spec (resolved)</summary><pre>"
        + html.escape(json.dumps(results.spec, indent=2))
        + "</pre></details>"
    )
    return "\n".join(parts)


def _model_summary(results: Results) -> str:
    """The tensors analysed in every model: a table per run of models with the same tensors (the checkpoints
    of one network), in model order."""
    groups: list[tuple[list[str], list[dict]]] = []  # (model labels, their tensors)
    for model in results.models:
        tensors = model.get("tensors")
        if not tensors:
            continue
        if groups and groups[-1][1] == tensors:
            groups[-1][0].append(str(model["label"]))
        else:
            groups.append(([str(model["label"])], tensors))
    parts = []
    for labels, tensors in groups:
        rows = [
            {
                **t,
                "shape": "×".join("?" if d is None else str(d) for d in (t.get("shape") or [])),
                "analyses": ", ".join(t.get("analyses", [])),
            }
            for t in tensors
        ]
        named = ", ".join(labels) if len(labels) <= 3 else f"{labels[0]} … {labels[-1]} ({len(labels)} models)"
        parts.append(
            f"<p>Tensors analysed in {html.escape(named)}:</p>"
            + table(rows, ["layer", "name", "op_type", "shape", "analyses"])
        )
    return "<h2 id='model'>Model summary</h2>" + "".join(parts) if parts else ""


def _analysis(analysis: dict, records: list[dict], figure: bytes | None) -> str:
    shown = [r for r in records if r["metric"] not in HIDDEN_METRICS]
    parts = [
        f"<h2 id='analysis-{html.escape(analysis['id'])}'>{html.escape(analysis['id'])} "
        f"<small>({html.escape(analysis['estimator'])})</small></h2>"
    ]
    if analysis.get("reconstructed"):
        parts.append(f"<p class='note'>Reconstructed method: {html.escape(analysis['reconstructed'])}</p>")
    parts.append("<p>Parameters: <code>" + html.escape(json.dumps(analysis.get("params", {}))) + "</code></p>")
    if figure:
        parts.append(
            f"<img alt='{html.escape(analysis['id'])}' src='data:image/png;base64,{base64.b64encode(figure).decode()}'>"
        )
    for pivot in pivot_records(shown):
        note = (
            f" (first {TABLE_ROWS} of {len(pivot.rows)} rows; every record is in records.csv)"
            if len(pivot.rows) > TABLE_ROWS
            else ""
        )
        parts.append(
            f"<h3>{html.escape(pivot.title)}{note}</h3>"
            f"<div class='scroll'>{table(pivot.rows[:TABLE_ROWS], pivot.columns)}</div>"
        )
    return "\n".join(parts)


def render_report(results: Results, host=None) -> str:
    """The whole self-contained page."""
    figures = {analysis["id"]: rendered["png"] for analysis, rendered in analysis_figures(results, host, ("png",))}
    name = html.escape(str(results.spec.get("name", "analysis")))
    contents = "".join(
        f"<li><a href='#analysis-{html.escape(a['id'])}'>{html.escape(a['id'])}</a></li>" for a in results.analyses
    )
    sections = [
        _analysis(a, [r for r in results.records if r["analysis"] == a["id"]], figures.get(a["id"]))
        for a in results.analyses
    ]
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>layerscope · {name}</title>"
        f"<style>{STYLE}</style></head><body><h1>layerscope report · {name}</h1>"
        f"<ul><li><a href='#provenance'>Provenance</a></li><li><a href='#model'>Model summary</a></li>{contents}</ul>"
        + _provenance(results)
        + _model_summary(results)
        + "".join(sections)
        + f"<script>{SCRIPT}</script></body></html>\n"
    )


class HtmlReporter(Reporter):
    name = "html"

    def write(self, results: Results, out_dir: Path) -> list[str]:
        atomic_write(out_dir / "report.html", render_report(results, self.host))
        return ["report.html"]


@hookimpl
def register_reporters(register):
    register(HtmlReporter)
