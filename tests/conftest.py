"""Shared fixtures: an isolated model cache and small real models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    """Demo models are trained once per test session into a private cache."""
    if "LAYERSCOPE_CACHE" not in os.environ:
        os.environ["LAYERSCOPE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture
def repo() -> Path:
    return REPO


def tiny_mlp_proto(inputs: int = 64, hidden: int = 16, outputs: int = 10, seed: int = 0):
    """A real ONNX graph x → Gemm → Relu → Gemm → Tanh → Gemm with random weights and a symbolic batch."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((inputs, hidden)).astype(np.float32) * 0.3, "b1": np.zeros(hidden, np.float32),
        "w2": rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.3, "b2": np.zeros(hidden, np.float32),
        "w3": rng.standard_normal((hidden, outputs)).astype(np.float32) * 0.3, "b3": np.zeros(outputs, np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="act1"),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2"),
        helper.make_node("Tanh", ["h2"], ["a2"], name="act2"),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["logits"], name="out"),
    ]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", inputs])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", outputs])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    """Path of a tiny real ONNX MLP (64 inputs, 10 outputs)."""
    import onnx

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_mlp_proto(), str(path))
    return path


def write_spec(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path
