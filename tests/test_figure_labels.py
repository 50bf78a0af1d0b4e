"""Readable figures for models with many long layer names: BERT-base's 25 activations and GPT-2 small's 24 (their
real names: ``tests/fixtures/transformer_layers.json``), drawn as the plots reporter draws a run's figures, alone
and compared. Every label is measured with matplotlib's renderer: inside the figure, and no two overlapping."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.text import Text

from layerscope import Results
from layerscope.host.loader import load_plugins
from layerscope.plugins.reporters.html_report import render_report
from layerscope.plugins.reporters.labels import short_names
from layerscope.plugins.reporters.plots import analysis_figure, analysis_figures
from layerscope.results.compare import combine

matplotlib.use("Agg")
LAYERS = json.loads((Path(__file__).parent / "fixtures" / "transformer_layers.json").read_text())
ANALYSES = [
    {"id": "entropy", "estimator": "activation_entropy", "params": {}},
    {"id": "signature", "estimator": "nonlinearity_signature", "params": {}},
]


def run_of(network: str) -> Results:
    """The results a run of *network* (a key of the fixture) gives for :data:`ANALYSES`: the signature of every
    activation, the entropy of every one that is not an attention softmax (all samples and 3 classes);
    the values are random, the names are the network's."""
    rng = np.random.default_rng(0)
    records = []
    for position, activation in enumerate(LAYERS[network]):
        common = {"model": "model", "layer": activation["layer"], "tensor": activation["tensor"]}
        records.append(
            {
                **common,
                "analysis": "signature",
                "estimator": "nonlinearity_signature",
                "metric": "affinity_score",
                "value": float(rng.uniform(0.7, 1.0)),
                "op_type": activation["op_type"],
                "position": position,
            }
        )
        if activation["op_type"] != "attention softmax":
            records += [
                {
                    **common,
                    "analysis": "entropy",
                    "estimator": "activation_entropy",
                    "metric": "entropy",
                    "unit": "bits",
                    "value": float(rng.uniform(0.4, 1.0)),
                    "class": label,
                    "variant": "binary",
                }
                for label in ("all", 0, 1, 2)
            ]
    return Results("0.2.0", {"name": network}, {}, [{"label": "model"}], records, analyses=ANALYSES)


RUNS = {
    "bert-base": lambda: run_of("bert-base"),
    "gpt2-small": lambda: run_of("gpt2-small"),
    "compared": lambda: combine([run_of("bert-base"), run_of("gpt2-small")], ["bert", "gpt2"]),
}


def drawn_tick_labels(axis) -> list[Text]:
    """The tick labels *axis* draws: those of ticks inside its view interval."""
    low, high = sorted(axis.get_view_interval())
    slack = 1e-9 * max(1.0, high - low)
    labels = []
    for locations, ticks in (
        (axis.get_majorticklocs(), axis.get_major_ticks),
        (axis.get_minorticklocs(), axis.get_minor_ticks),
    ):
        for tick in ticks(len(locations)):
            if low - slack <= tick.get_loc() <= high + slack:
                labels += [label for label in (tick.label1, tick.label2) if label.get_visible()]
    return labels


def drawn_texts(figure) -> list[Text]:
    """Every text the figure draws: titles, axis labels, drawn tick labels, texts and annotations, legends."""
    texts: list[Text] = list(figure.texts)  # the suptitle among them
    for axes in figure.axes:
        if not axes.get_visible():
            continue
        texts += [axes.title, axes._left_title, axes._right_title, *axes.texts]
        if axes.axison:
            for axis in (axes.xaxis, axes.yaxis):
                texts += [axis.label, axis.get_offset_text(), *drawn_tick_labels(axis)]
        legend = axes.get_legend()
        if legend is not None:
            texts += [legend.get_title(), *legend.get_texts()]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def overlaps_and_overflows(figure) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs of drawn texts whose boxes overlap, texts reaching past the figure's edges), measured on the
    renderer of a full draw."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(figure)]
    width, height = figure.canvas.get_width_height()
    outside = [
        text for text, box in boxes if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > width + 0.5 or box.y1 > height + 0.5
    ]
    overlapping = [
        (a, b)
        for index, (a, first) in enumerate(boxes)
        for b, second in boxes[index + 1 :]
        if first.overlaps(second) and first.intersection(first, second).width > 0.5
    ]
    return overlapping, outside


def test_long_names_are_shortened_from_the_left_keeping_the_block_index():
    names = [a["layer"] for a in LAYERS["bert-base"]]
    short = short_names(names)
    assert short["encoder.layer.3.intermediate.intermediate_act_fn"] == "…layer.3.intermediate.intermediate_act_fn"
    assert short["encoder.layer.11.attention.self/val_910"] == "…layer.11.attention.self/val_910"
    assert short["pooler.activation"] == "pooler.activation"  # short enough
    assert len(set(short.values())) == len(names)
    gpt2 = [a["layer"] for a in LAYERS["gpt2-small"]]
    assert short_names(gpt2) == {name: name for name in gpt2}  # h.11.mlp.act: short enough
    # names without a block index lose leading components; names whose ends agree keep more of them
    assert short_names(
        [
            "first.encoder.attention.output.dense.act",
            "second.encoder.attention.output.dense.act",
            "second.decoder.attention.output.dense.act",
        ]
    ) == {
        "first.encoder.attention.output.dense.act": "first.encoder.attention.output.dense.act",
        "second.encoder.attention.output.dense.act": "second.encoder.attention.output.dense.act",
        "second.decoder.attention.output.dense.act": "…decoder.attention.output.dense.act",
    }
    assert short_names(["features.denseblock3.denselayer12.conv2.relu"]) == {
        "features.denseblock3.denselayer12.conv2.relu": "…denseblock3.denselayer12.conv2.relu"
    }


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("drawn_by", ["estimator", "default"])
def test_figures_of_long_layer_names_have_no_overlapping_or_cut_off_label(run, drawn_by):
    """The default report's figures (each estimator's own, and the default metric-by-layer plot of an estimator
    whose plugin is not loaded) for BERT-base, GPT-2 small, and the two compared on relative depth."""
    results = RUNS[run]()
    host = load_plugins() if drawn_by == "estimator" else None
    for analysis in results.analyses:
        records = [r for r in results.records if r["analysis"] == analysis["id"]]
        figure = analysis_figure(analysis, records, host)
        overlapping, outside = overlaps_and_overflows(figure)
        assert overlapping == [] and outside == [], (analysis["id"], overlapping[:3], outside[:3])
        shown = {t.get_text() for t in drawn_texts(figure)}
        if run == "bert-base":  # the distinctive end of a layer name
            assert any(text.startswith("…layer.3.intermediate.intermediate_act_fn") for text in shown)
        if run == "compared":  # a band of layer names per network under the relative depth axis
            assert {"bert", "gpt2", "…layer.3.intermediate.intermediate_act_fn", "h.3.mlp.act"} <= shown
        plt.close(figure)


def test_svg_titles_and_html_tables_name_the_full_layer():
    results = run_of("bert-base")
    analysis, rendered = next(analysis_figures(results, load_plugins(), ("svg",)))
    assert analysis["id"] == "entropy"
    titles = re.findall(r"<title>(.*?)</title>", rendered["svg"].decode())
    gelus = [a["layer"] for a in LAYERS["bert-base"] if a["op_type"] == "Gelu"]
    assert len(gelus) == 12 and all(short_names(gelus)[name] != name for name in gelus)
    assert sorted(titles) == sorted(gelus * 2)  # each shortened tick label, on the line plot and the heatmap
    page = render_report(results, load_plugins())
    assert "<td>encoder.layer.3.intermediate.intermediate_act_fn</td>" in page
