"""The quick start through the real command line, and the Python API."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

import layerscope


@pytest.mark.slow
def test_quickstart_cli(repo, tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "layerscope", "run", str(repo / "specs/quickstart.yaml"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["runtime"]["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert results["runtime"]["samples"] == 450
    entropies = {r["layer"]: r["value"] for r in results["records"] if r["metric"] == "entropy" and r["class"] == "all"}
    assert set(entropies) == {"relu1", "relu2", "relu3"}
    assert all(0.0 < v < 1.0 for v in entropies.values())
    per_class = [r for r in results["records"] if r["metric"] == "entropy" and r["class"] != "all"]
    assert len(per_class) == 3 * 10 and sum(r["samples"] for r in per_class) == 3 * 450
    assert results["analyses"][0]["reconstructed"]
    assert "relu3" in proc.stdout  # the terminal summary
    with open(out / "records.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(results["records"])
    # rebuilding the reports from results.json gives the same files
    before = (out / "records.csv").read_text()
    (out / "records.csv").unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "layerscope", "report", str(out)], capture_output=True, text=True)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (out / "records.csv").read_text() == before


@pytest.mark.parametrize("quiet", [False, True])
def test_run_quiet_prints_only_warnings_and_where_the_results_are(tmp_path, capsys, monkeypatch, tiny_onnx, quiet):
    """Samples of 3e38 overflow the tiny MLP's float32 tensors to Inf: the run warns."""
    import numpy as np

    from layerscope.cli.main import main

    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapped

    np.savez(tmp_path / "big.npz", x=np.full((20, 64), 3e38, np.float32))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {source: tiny.onnx}\ndata: {source: npz, path: big.npz}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\noutputs: {formats: [json]}\n"
    )
    assert main(["run", str(spec), "--out", str(tmp_path / "out"), *(["--quiet"] if quiet else [])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ("layerscope · " in "\n".join(lines)) is not quiet  # the summary table's title
    assert lines[-1].endswith(f" records → {tmp_path / 'out' / 'results.json'}")
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert warnings and all("NaN or Inf" in line for line in warnings)
    assert len(lines) == len(warnings) + 1 if quiet else len(lines) > len(warnings) + 5


def test_python_api_and_pandas(tmp_path):
    spec = {
        "model": {"source": "demo:digits-mlp"},
        "data": {"source": "digits", "split": "test"},
        "analyses": [{"id": "pat", "estimator": "activation_entropy", "params": {"variant": "pattern"}}],
        "outputs": {"dir": str(tmp_path / "api")},
    }
    results = layerscope.run(spec, progress=False)
    frame = results.to_pandas()
    assert set(frame["metric"]) == {"entropy", "distinct_patterns"}
    assert (tmp_path / "api" / "results.json").exists()
    loaded = layerscope.Results.load(tmp_path / "api")
    assert loaded.records == results.records


@pytest.mark.slow
def test_validate_command_describes_checks(repo):
    proc = subprocess.run(
        [sys.executable, "-m", "layerscope", "validate", str(repo / "specs/quickstart.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "entropy selects 3 tensors" in proc.stdout


def test_inspect_command(repo):
    proc = subprocess.run(
        [sys.executable, "-m", "layerscope", "inspect", "demo:digits-cnn", "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    tensors = {t["name"]: t for t in json.loads(proc.stdout)["tensors"]}
    assert tensors["relu"]["layer"] == "relu1" and tensors["relu"]["shape"] == ["batch", 8, 8, 8]


def test_every_example_spec_validates_against_its_model(repo):
    specs = sorted((repo / "specs").glob("*.yaml"))
    assert len(specs) >= 5
    for spec in specs:
        checked = layerscope.validate(spec)
        assert any("selects" in line for line in checked), spec


def test_the_own_model_walk_through_gives_the_record_count_it_shows(repo):
    """README.md and the getting-started page printed 52 records for specs/own-model/own-model.yaml; the
    run gives 56 (entropy's per-class records of both layers and the signature's)."""
    import re

    results = layerscope.run(repo / "specs" / "own-model" / "own-model.yaml", write=False, progress=False)
    for page in (repo / "README.md", repo / "docs" / "getting-started.md"):
        shown = re.findall(r"^(\d+) records → results/own-model/results.json$", page.read_text(), re.MULTILINE)
        assert shown == [str(len(results.records))], page
