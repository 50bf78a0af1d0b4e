"""Small real ONNX models for tests (built with onnx.helper, run by onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def tiny_mlp(inputs: int = 64, hidden: int = 16, outputs: int = 10, seed: int = 0) -> onnx.ModelProto:
    """x → Gemm → Relu → Gemm → Tanh → Gemm (layers fc1, act1, fc2, act2, out), random weights, symbolic batch."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((inputs, hidden)).astype(np.float32) * 0.3,
        "b1": np.zeros(hidden, np.float32),
        "w2": rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.3,
        "b2": np.zeros(hidden, np.float32),
        "w3": rng.standard_normal((hidden, outputs)).astype(np.float32) * 0.3,
        "b3": np.zeros(outputs, np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="act1"),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2"),
        helper.make_node("Tanh", ["h2"], ["a2"], name="act2"),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["logits"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", outputs])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
