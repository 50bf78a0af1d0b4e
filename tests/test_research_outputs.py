"""Results for analysis and comparison: to_pandas columns, steps and timings in records and
results.json, ``report --formats`` adding a format, ``compare`` drawing several runs together, the
signature of several architectures on a normalised depth axis, and the default formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import layerscope
from layerscope.cli.main import main
from layerscope.plugins.nonlinearity_signature.estimator import NonlinearitySignature

FIXTURE = Path(__file__).parent / "fixtures" / "results.json"
SIGNATURE = [{"id": "sig", "estimator": "nonlinearity_signature"}]


@pytest.fixture(scope="module")
def epochs(tmp_path_factory):
    """A json-only run of the demo MLP over three epochs (written once for the module)."""
    folder = tmp_path_factory.mktemp("epochs")
    layerscope.run(
        {
            "name": "mlp-epochs",
            "model": {"source": "demo:digits-mlp", "checkpoints": ["epoch_02", "epoch_09", "epoch_10"]},
            "data": {"limit": 200},
            "analyses": SIGNATURE + [{"id": "entropy", "estimator": "activation_entropy"}],
            "outputs": {"formats": ["json"]},
        },
        out=folder,
        progress=False,
    )
    return folder


def test_to_pandas_orders_checkpoints_by_step_and_class_as_text(epochs):
    results = layerscope.Results.load(epochs)
    frame = results.to_pandas()
    assert frame["run_id"].unique().tolist() == [results.runtime["run_id"]]
    assert sorted(frame["step"].unique().tolist()) == [2, 9, 10]
    by_index = frame.drop_duplicates("model").sort_values("checkpoint_index")
    assert by_index["model"].tolist() == ["epoch_02", "epoch_09", "epoch_10"]
    assert list(frame["class"].cat.categories) == ["all", *map(str, range(10))]
    assert frame["class"].dropna().map(type).eq(str).all()
    assert {a["id"]: a["seconds"] > 0 for a in results.analyses} == {"sig": True, "entropy": True}


def test_report_adds_a_format_to_a_json_only_run(epochs, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(epochs, folder)
    assert not (folder / "report.html").exists()
    assert main(["report", str(folder), "--formats", "html,plots"]) == 0
    assert (folder / "report.html").stat().st_size > 10_000 and (folder / "plots" / "sig.png").exists()
    assert main(["report", str(folder), "--formats", "htm"]) == 2
    assert "--formats: unknown reporter 'htm'" in capsys.readouterr().err


def test_compare_draws_several_runs_in_one_figure(epochs, tmp_path):
    cnn = tmp_path / "cnn"
    layerscope.run(
        {
            "name": "cnn",
            "model": {"source": "demo:digits-cnn"},
            "data": {"limit": 200},
            "analyses": SIGNATURE,
            "outputs": {"formats": ["json"]},
        },
        out=cnn,
        progress=False,
    )
    out = tmp_path / "compared"
    assert main(["compare", str(epochs), str(cnn), "--out", str(out)]) == 0
    combined = layerscope.Results.load(out)
    assert {r["network"] for r in combined.records} == {"mlp-epochs", "cnn"}
    assert [m["label"] for m in combined.models] == [
        "mlp-epochs/epoch_02",
        "mlp-epochs/epoch_09",
        "mlp-epochs/epoch_10",
        "cnn",
    ]
    assert (out / "plots" / "sig.png").stat().st_size > 10_000 and (out / "report.html").exists()
    figure = NonlinearitySignature.plot([r for r in combined.records if r["analysis"] == "sig"])
    (axes,) = figure.axes
    assert len(axes.lines) == 4  # a line per model
    names = {
        n: list(dict.fromkeys(r["layer"] for r in combined.records if r["network"] == n)) for n in ("mlp-epochs", "cnn")
    }
    assert names["mlp-epochs"] == names["cnn"] == ["relu1", "relu2", "relu3"]  # so the runs share the axis
    for line in axes.lines:
        assert list(line.get_xdata()) == [0, 1, 2]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["relu1 (Relu)", "relu2 (Relu)", "relu3 (Relu)"]


def test_compare_refuses_runs_whose_analyses_disagree(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        shutil.copy(FIXTURE, folder / "results.json")
    data = json.loads((second / "results.json").read_text())
    data["analyses"][0]["estimator"] = "other"
    (second / "results.json").write_text(json.dumps(data))
    assert main(["compare", str(first), str(second), "--out", str(tmp_path / "out")]) == 2
    assert "compare: analysis 'entropy' is 'activation_entropy' in one run and 'other'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()


def test_default_formats_write_the_report(tmp_path):
    results = layerscope.run(
        {
            "model": {"source": "demo:digits-mlp"},
            "data": {"limit": 100},
            "analyses": [{"id": "entropy", "estimator": "activation_entropy"}],
        },
        out=tmp_path,
        progress=False,
    )
    assert {"records.csv", "plots/entropy.png", "report.html"} <= set(results.artifacts)
