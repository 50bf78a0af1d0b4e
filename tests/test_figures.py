"""Figures a paper can use, checked by rendering real runs: per-class entropy heatmaps, information-plane error
bars coloured by step, the affinity score's spread over batches, aggregation panels without dead channels and with
class-vs-rest nodes, the report's pivot tables, and multi-model and compared reports in headless Chromium."""

from __future__ import annotations

import re

import matplotlib
import matplotlib.pyplot as plt
import pytest

import layerscope
from layerscope.cli.main import main
from layerscope.plugins.activation_entropy.estimator import ActivationEntropy
from layerscope.plugins.aggregation_distribution.estimator import AggregationDistribution
from layerscope.plugins.information_plane.estimator import InformationPlane
from layerscope.plugins.nonlinearity_signature.estimator import NonlinearitySignature

from .test_reports import CHROMIUM, render_in_chromium

matplotlib.use("Agg")
MODELS = [
    {"label": "mlp", "source": "demo:digits-mlp", "checkpoints": ["epoch_01", "epoch_10"]},
    {"label": "cnn", "source": "demo:digits-cnn"},
]
ANALYSES = [
    {"id": "entropy", "estimator": "activation_entropy"},
    {"id": "ip", "estimator": "information_plane", "params": {"sigma_grid": 20}},
    {"id": "sig", "estimator": "nonlinearity_signature", "params": {"samples": 100, "batches": 3}},
]


@pytest.fixture(scope="module")
def models_run(tmp_path_factory):
    """A models: spec (two checkpoints of the MLP, one CNN) on 300 test digits in batches of 100."""
    folder = tmp_path_factory.mktemp("models")
    layerscope.run(
        {
            "name": "two-networks",
            "models": MODELS,
            "analyses": ANALYSES,
            "data": {"source": "digits", "split": "test", "limit": 300, "batch_size": 100},
            "outputs": {"formats": ["json", "html"]},
        },
        out=folder,
        progress=False,
    )
    return folder


@pytest.fixture(scope="module")
def gap_run(tmp_path_factory):
    """The aggregation analysis of the trained GAP CNN (one of its 8 pooled channels never fires)."""
    folder = tmp_path_factory.mktemp("gap")
    layerscope.run(
        {
            "name": "gap",
            "model": {"source": "demo:digits-gap"},
            "data": {"split": "test", "limit": 400},
            "analyses": [{"id": "agg", "estimator": "aggregation_distribution", "params": {"bins": 30}}],
            "outputs": {"formats": ["json"]},
        },
        out=folder,
        progress=False,
    )
    return folder


def records_of(folder, analysis: str) -> list[dict]:
    return [r for r in layerscope.Results.load(folder).records if r["analysis"] == analysis]


def test_entropy_draws_every_class_of_every_network(models_run):
    records = records_of(models_run, "entropy")
    figure = ActivationEntropy.plot(records)
    pooled, *heatmaps = [axes for axes in figure.axes if axes.get_label() != "<colorbar>"]
    assert len(pooled.lines) == 3  # a line per checkpoint
    layers = list(dict.fromkeys(r["layer"] for r in records))
    assert layers == ["relu1", "relu2", "relu3"]  # both networks name their layers so: they share the layer axis
    for line in pooled.lines:
        assert list(line.get_xdata()) == [0, 1, 2]
    assert [t.get_text() for t in pooled.get_xticklabels()] == layers and not pooled.texts  # each name once
    for axes, network in zip(heatmaps, ["mlp", "cnn"]):
        layers = {r["layer"] for r in records if r.get("network") == network}
        grid = axes.images[0].get_array()
        assert grid.shape == (10, len(layers))  # class × layer
        expected = next(
            r["value"]
            for r in records
            if r["model"] == axes.get_title()[len("per class (") : -1] and r["class"] == 3 and r["metric"] == "entropy"
        )
        assert expected in grid[3]
    assert len(heatmaps) == 2
    plt.close(figure)


def test_information_plane_has_error_bars_and_a_step_colour_bar(models_run):
    records = [r for r in records_of(models_run, "ip") if r.get("network") == "mlp"]
    assert {r["step"] for r in records} == {1, 10}
    figure = InformationPlane.plot(records)
    axes, bar = figure.axes
    spreads = [c for c in axes.containers if c.has_xerr and c.has_yerr]
    assert spreads and "± std over batches" in axes.get_title()
    assert bar.get_ylabel() == "step" and bar.get_ylim() == pytest.approx((1, 10)) and bar.get_yscale() == "linear"
    plt.close(figure)
    stretched = [{**r, "step": {1: 10, 10: 10_000}[r["step"]]} for r in records]  # log-spaced iterations
    figure = InformationPlane.plot(stretched)
    assert figure.axes[1].get_yscale() == "log" and figure.axes[1].get_ylim() == pytest.approx((10, 10_000))
    plt.close(figure)


def test_signature_records_and_draws_the_spread_over_batches(models_run):
    records = records_of(models_run, "sig")
    scores = [r for r in records if r["metric"] == "affinity_score"]
    assert scores and all(r["batches"] == 3 and r["samples"] == 100 for r in scores)
    spread = {(r["model"], r["tensor"]): r["value"] for r in records if r["metric"] == "affinity_score_std"}
    assert spread.keys() == {(r["model"], r["tensor"]) for r in scores} and max(spread.values()) > 0
    figure = NonlinearitySignature.plot(records)
    bars = [c for c in figure.axes[0].containers if c.has_yerr]
    assert len(bars) == 3 and "mean ± std" in figure.axes[0].get_ylabel()
    plt.close(figure)


def test_aggregation_leaves_dead_channels_out_and_draws_class_against_rest(gap_run):
    records = records_of(gap_run, "agg")
    variances = {r["channel"]: r["value"] for r in records if r["metric"] == "empirical_var" and r["class"] == "all"}
    live = [c for c, v in sorted(variances.items()) if v > 1e-12]
    (layer,) = [r for r in records if r["metric"] == "effective_m"]
    assert layer["constant_channels"] == len(variances) - len(live) >= 1
    figure = AggregationDistribution.plot(records)
    titles = [axes.get_title() for axes in figure.axes]
    assert [t for t in titles if "channel" in t] == [f"pool channel {c}" for c in live[:4]]
    nodes = [axes for axes in figure.axes if "vs rest" in axes.get_title()]
    assert len(nodes) == 4
    for axes in nodes:  # class k and the rest, each a histogram and its predicted Gaussian
        assert len(axes.containers) == 2 and len(axes.lines) == 2
        low, high = axes.get_xlim()
        for container in axes.containers:
            assert sum(bar.get_height() for bar in container) > 0
            assert min(bar.get_x() for bar in container) >= low and max(bar.get_x() for bar in container) <= high
    assert f"pool: {layer['constant_channels']} constant (dead) channel" in figure.get_supxlabel()
    plt.close(figure)


def test_report_shows_records_as_pivot_tables(models_run):
    page = (models_run / "report.html").read_text()
    heading = page.index("<h3>entropy [bits] by class")
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", page[heading:]).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["layer", "model", "all", *map(str, range(10))]
    assert "<th>analysis</th>" not in page  # no raw record dump
    sig = page.index("id='analysis-sig'")
    header = re.search(r"<thead><tr>(.*?)</tr></thead>", page[sig:]).group(1)
    assert re.findall(r"<th>(.*?)</th>", header)[:4] == ["layer", "model", "affinity_score", "affinity_score_std"]


def tensor_tables(page: str) -> dict[str, list[str]]:
    """The model summary of a report: the models each table names -> the layers it lists."""
    summary = page[page.index("<h2 id='model'>") : page.index("<h2 id='analysis-")]
    tables = re.findall(r"<p>Tensors analysed in (.*?):</p><table.*?<tbody>(.*?)</tbody>", summary)
    return {models: re.findall(r"<tr><td>(.*?)</td>", rows) for models, rows in tables}


def test_multi_model_and_compared_reports_list_every_model_and_run(models_run, gap_run, tmp_path):
    """Every model's tensors (a table per network, its checkpoints together) and, for compare, each run's
    provenance."""
    run = layerscope.Results.load(models_run)
    layers = {m["label"]: [t["layer"] for t in m["tensors"]] for m in run.models}
    assert list(layers) == ["mlp/epoch_01", "mlp/epoch_10", "cnn"]
    assert tensor_tables((models_run / "report.html").read_text()) == {
        "mlp/epoch_01, mlp/epoch_10": layers["mlp/epoch_01"],
        "cnn": layers["cnn"],
    }
    compared = tmp_path / "compared"
    assert main(["compare", str(models_run), str(gap_run), "--out", str(compared), "--formats", "json,html"]) == 0
    combined = layerscope.Results.load(compared)
    runs = {"two-networks": run, "gap": layerscope.Results.load(gap_run)}
    assert [r["label"] for r in combined.runtime["compared"]] == list(runs)
    for entry, original in zip(combined.runtime["compared"], runs.values()):
        assert entry == {"label": entry["label"], "layerscope": original.layerscope, **original.runtime}
    for key in ("onnxruntime", "onnxruntime_package", "torch", "device", "seed"):
        assert combined.runtime[key] == run.runtime[key] is not None  # the runs agree, so the whole has it
    assert combined.spec["specs"] == {label: r.spec for label, r in runs.items()}
    page = (compared / "report.html").read_text()
    provenance = page[page.index("<h2 id='provenance'>") : page.index("<h3>Models</h3>")]
    assert re.findall(r"<th>(.*?)</th>", provenance) == ["", "two-networks", "gap"]
    for key in ("onnxruntime", "onnxruntime_package", "torch", "device", "seed", "run_id"):
        row = re.search(rf"<tr><td>{key}</td>(.*?)</tr>", provenance).group(1)
        assert re.findall(r"<td>(.*?)</td>", row) == [str(r.runtime[key]) for r in runs.values()]
    assert list(tensor_tables(page)) == [
        "two-networks/mlp/epoch_01, two-networks/mlp/epoch_10",
        "two-networks/cnn",
        "gap",
    ]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_multi_model_and_compared_reports_render_in_chromium(models_run, gap_run, tmp_path):
    loaded, errors, pixels = render_in_chromium(models_run / "report.html", tmp_path / "one")
    assert loaded == len(ANALYSES) and errors == [] and pixels.std() > 0.05
    compared = tmp_path / "compared"
    assert main(["compare", str(models_run), str(gap_run), "--out", str(compared), "--formats", "json,html"]) == 0
    loaded, errors, pixels = render_in_chromium(compared / "report.html", tmp_path / "two")
    assert loaded == len(ANALYSES) + 1 and errors == [] and pixels.std() > 0.05
