"""The paper gallery (specs/papers/): every spec and the training script run, at a reduced size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import layerscope
from layerscope.spec.yaml_locations import load_yaml

PAPERS = Path(__file__).parent.parent / "specs" / "papers"
# monitor.yaml is read by train.py; training.yaml (30 checkpoints) runs in test_paper_gallery.py
SPECS = sorted(p for p in PAPERS.glob("*/*.yaml") if p.name not in ("monitor.yaml", "training.yaml"))


def test_every_entry_has_a_readme_and_a_runnable_spec():
    entries = sorted(p.name for p in PAPERS.iterdir() if p.is_dir())
    assert entries == [
        "activation-entropy",
        "aggregation",
        "information-plane",
        "mean-dimension",
        "nonlinearity-signature",
    ]
    for entry in entries:
        text = (PAPERS / entry / "README.md").read_text()
        for heading in ("## The paper", "## Here", "**Does the claim hold here?", "## Differences"):
            assert heading in text, (entry, heading)


@pytest.mark.parametrize("path", SPECS, ids=[p.parent.name for p in SPECS])
def test_paper_spec_runs_reduced(path):
    spec = load_yaml(path.read_text(), str(path)).data  # YAML 1.2, as layerscope reads it (on: is a key)
    spec["data"]["limit"] = 200
    for analysis in spec["analyses"]:
        params = analysis.setdefault("params", {})
        if analysis["estimator"] == "mean_dimension":
            params["pairs"] = 60
        if analysis["estimator"] == "nonlinearity_signature":
            params["samples"] = 200
    assert layerscope.validate(path)  # the spec as shipped
    results = layerscope.run(spec, write=False, progress=False)
    assert results.records and not results.failures


def test_information_plane_training_script(tmp_path):
    loaded = importlib.util.spec_from_file_location("ip_train", PAPERS / "information-plane" / "train.py")
    script = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(script)
    results = script.main(["--iterations", "4", "--every", "2", "--out", str(tmp_path / "ip")])
    assert sorted({r["step"] for r in results.records}) == [2, 4]
    assert (tmp_path / "ip" / "report.html").exists() and (tmp_path / "ip" / "plots" / "ip.png").exists()
    metrics = {r["metric"] for r in results.records}
    assert {"I_XT", "I_TY", "sigma", "sigma_optimal"} <= metrics
