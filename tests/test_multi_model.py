"""Specs with several models (``models:``): each model's records equal a run of that model alone,
records and results.json name the model, and nothing is carried from one model to the next."""

from __future__ import annotations

import pytest

import layerscope
from layerscope.util.errors import SpecError, UserError

ANALYSES = [
    {"id": "ip", "estimator": "information_plane", "params": {"smoothing": 0.9, "sigma_grid": 30}},
    {"id": "entropy", "estimator": "activation_entropy"},
]
DATA = {"source": "digits", "split": "test", "limit": 200}
MODELS = [
    {"label": "mlp", "source": "demo:digits-mlp", "checkpoints": ["epoch_01", "epoch_02"]},
    {"label": "cnn", "source": "demo:digits-cnn", "checkpoints": ["epoch_01", "epoch_02"]},
    {"label": "cnn-last", "source": "demo:digits-cnn"},
]


def values(results, **keys):
    return {
        (r["step"] if "step" in r else None, r["analysis"], r["tensor"], r["metric"], r.get("class")): r["value"]
        for r in results.select(**keys)
    }


def test_each_model_of_a_multi_model_spec_equals_its_own_run():
    together = layerscope.run({"models": MODELS, "data": DATA, "analyses": ANALYSES}, write=False, progress=False)
    assert [m["label"] for m in together.models] == [
        "mlp/epoch_01",
        "mlp/epoch_02",
        "cnn/epoch_01",
        "cnn/epoch_02",
        "cnn-last",
    ]
    assert [m.get("network") for m in together.models] == ["mlp", "mlp", "cnn", "cnn", "cnn-last"]
    for entry in MODELS:
        alone = layerscope.run(
            {"model": {k: v for k, v in entry.items() if k != "label"}, "data": DATA, "analyses": ANALYSES},
            write=False,
            progress=False,
        )
        expected, got = values(alone), values(together, network=entry["label"])
        assert got.keys() == expected.keys() and got
        for key, value in expected.items():  # cnn's first epoch carries no width over from mlp's last
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (entry["label"], key)


def test_models_spec_errors_name_the_entry(tmp_path):
    spec = tmp_path / "spec.yaml"
    analyses = "analyses: [{id: e, estimator: activation_entropy}]\n"
    cases = [
        (
            "models:\n  - {label: a, source: demo:digits-mlp}\n  - {label: a, source: demo:digits-cnn}\n",
            r"spec.yaml:1:1: models: label 'a' is used twice",
        ),
        (
            "models:\n  - {label: a, source: demo:digits-mlp}\n  - {source: demo:digits-cnn}\n",
            r"spec.yaml:3:5: models.1.label: required key is missing",
        ),
        (
            "models:\n  - {label: a, source: demo:digits-mlp}\n  - {label: b, source: net.bin}\n",
            r"spec.yaml:3:\d+: models.1.source: no adapter loads 'net.bin'",
        ),
        (
            "models:\n  - {label: a, source: demo:digits-mlp, weights: x.pt}\n",
            r"spec.yaml:2:\d+: models.0.weights: unknown key 'weights'",
        ),
        (
            "model: {source: demo:digits-mlp}\nmodels:\n  - {label: a, source: demo:digits-mlp}\n",
            r"spec.yaml:2:1: models: give model \(one model\) or models",
        ),
        ("data: {limit: 10}\n", r"model: required key is missing \(or models"),
    ]
    for text, message in cases:
        spec.write_text(text + analyses)
        with pytest.raises(SpecError, match=message):
            layerscope.validate(spec, with_model=False)
    spec.write_text("models:\n  - {label: a, source: demo:digits-mlp}\n  - {label: b, source: demo:nope}\n" + analyses)
    with pytest.raises(UserError, match=r"spec.yaml:3:5: models.1.source: unknown demo model 'nope'"):
        layerscope.validate(spec)
