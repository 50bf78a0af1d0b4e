"""The example plugin's own tests: known answers, layerscope's conformance kit, and a spec end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

layerscope_cka = pytest.importorskip(
    "layerscope_cka", reason="install tests/example_plugin (pip install -e tests/example_plugin)"
)
from layerscope.testing import feed, make_batches, tensor_infos  # noqa: E402


def cka_of(x, y, batch_size=500):
    batches = make_batches({"a": x.astype(np.float32), "b": y.astype(np.float32)}, batch_size=batch_size)
    infos = tensor_infos(batches)
    infos = [info.__class__(**{**info.__dict__, "order": order}) for order, info in enumerate(infos)]
    estimator = layerscope_cka.LinearCKA(layerscope_cka.LinearCKA.Params(), infos)
    (record,) = feed(estimator, batches).finalize()
    return record["value"], estimator, batches


def test_correlated_gaussians_give_rho_squared():
    rng = np.random.default_rng(0)
    for rho in (0.2, 0.6, 0.9):
        x = rng.standard_normal(40_000)
        y = rho * x + np.sqrt(1 - rho**2) * rng.standard_normal(40_000)
        value, _, _ = cka_of(x[:, None], y[:, None])
        assert value == pytest.approx(rho**2, abs=0.01)


def test_orthogonal_transform_scaling_and_shift_give_one():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 5)) @ rng.standard_normal((5, 5))
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    value, _, _ = cka_of(x, 3.0 * x @ q + 7.0)
    assert value == pytest.approx(1.0, abs=1e-6)


def test_independent_layers_give_almost_zero():
    rng = np.random.default_rng(2)
    value, _, _ = cka_of(rng.standard_normal((20_000, 3)), rng.standard_normal((20_000, 3)))
    assert value < 0.01


def test_passes_layerscope_conformance(layerscope_conformance):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 4))
    _, estimator, batches = cka_of(x, np.tanh(x @ rng.standard_normal((4, 3))), batch_size=60)
    layerscope_conformance(
        lambda: layerscope_cka.LinearCKA(estimator.params, list(estimator.tensors.values())), batches
    )


def test_layerscope_plugins_lists_it():
    out = subprocess.run([sys.executable, "-m", "layerscope", "plugins"], capture_output=True, text=True, check=True)
    (entry,) = [p for p in json.loads(out.stdout) if p["name"] == "linear_cka"]
    assert entry["estimators"] == ["linear_cka"] and entry["version"] == "0.1.0"


def test_spec_end_to_end(layerscope_run, layerscope_tiny_model):
    results = layerscope_run(
        {
            "model": {"source": str(layerscope_tiny_model)},
            "data": {"source": "digits"},
            "analyses": [{"id": "cka", "estimator": "linear_cka", "on": {"op_type": ["Relu", "Tanh"]}}],
        }
    )
    (record,) = results.select(metric="linear_cka")
    assert record["layer"] == "act2" and record["previous"] == "act1" and 0.0 < record["value"] <= 1.0
    assert results.runtime["samples"] == 1797
