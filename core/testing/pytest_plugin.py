"""pytest fixtures for estimator authors, loaded automatically once layerscope is installed
(``pytest11`` entry point).

- ``layerscope_tiny_model``: path of a tiny real ONNX MLP (64 inputs, layers fc1/act1/fc2/act2/out);
- ``layerscope_digits``: scikit-learn's digits as (x float32 in [0, 1] of shape (1797, 64), y);
- ``layerscope_run``: run a spec dict (paths relative to a temporary folder) with extra plugin objects;
- ``layerscope_conformance``: :func:`layerscope.testing.check_conformance`.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def layerscope_tiny_model(tmp_path):
    import onnx

    from .models import tiny_mlp

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_mlp(), str(path))
    return path


@pytest.fixture(scope="session")
def layerscope_digits():
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()  # pixels scaled as the ``digits`` data source scales them
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


@pytest.fixture
def layerscope_run(tmp_path, monkeypatch):
    """``run(spec_dict, *plugins)`` → :class:`layerscope.Results`, written under a temporary folder."""
    import layerscope

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAYERSCOPE_CACHE", os.environ.get("LAYERSCOPE_CACHE", str(tmp_path / "cache")))

    def run(spec: dict, *plugins):
        spec = {"outputs": {"dir": str(tmp_path / "results")}, **spec}
        return layerscope.run(spec, progress=False, plugins=plugins)

    return run


@pytest.fixture
def layerscope_conformance():
    from . import check_conformance

    return check_conformance
