"""Scale-invariant quantities do not move when every activation is scaled by 1e-30 or 1e30, and a value
outside a metric's mathematical range is never recorded."""

from __future__ import annotations

import math
import types

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import layerscope
from layerscope import Estimator, hookimpl
from layerscope.results.contract import records_in_range

#: Metrics whose quantity does not change when an activation and everything after it is scaled by c > 0
#: (not: kernel widths, sparsity's absolute 1e-3, means, variances, histogram densities).
INVARIANT = {
    "bin": {"entropy", "entropy_sum"},
    "hist": {"entropy"},
    "ip": {"I_XT", "I_TY", "H_T", "I_XT_std", "I_TY_std", "H_T_std", "H_X", "H_Y"},
    "sig": {"affinity_score", "linear_cka", "r2"},
    "md": {"mean_dimension", "total_index"},
    "agg": {"effective_m", "fit_kl", "kl_predicted", "kl_empirical"},
}


def scaled_model(c: float) -> onnx.ModelProto:
    """x → Mul(c) → Conv → Relu → Conv → Relu → GlobalAveragePool → MatMul, without biases: positively
    homogeneous, so every tensor after the Mul is exactly c times the c = 1 tensor (up to float32 rounding)."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((6, 1, 3, 3)) * 0.5,
        "w2": rng.standard_normal((8, 6, 3, 3)) * 0.3,
        "w3": rng.standard_normal((8, 10)) * 0.5,
    }
    inits = [numpy_helper.from_array(np.array(c, np.float32), "c")]
    inits += [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()]
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "w1"], ["conv1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"]),
        helper.make_node("Conv", ["relu1", "w2"], ["conv2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"]),
        helper.make_node("GlobalAveragePool", ["relu2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w3"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scaled",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def analyse(tmp_path, c: float):
    path = tmp_path / f"scaled-{c!r}.onnx"
    onnx.save(scaled_model(c), str(path))
    spec = {
        "model": {"source": str(path)},
        "data": {"source": "digits", "layout": "image", "limit": 200, "batch_size": 100},
        "analyses": [
            {"id": "bin", "estimator": "activation_entropy"},
            {"id": "hist", "estimator": "activation_entropy", "params": {"variant": "histogram"}},
            {
                "id": "ip",
                "estimator": "information_plane",
                "on": {"activation": "output"},
                "params": {"sigma_grid": 50},
            },
            {"id": "sig", "estimator": "nonlinearity_signature", "params": {"samples": 200}},
            {"id": "md", "estimator": "mean_dimension", "params": {"pairs": 40, "features": "patches:2"}},
            {"id": "agg", "estimator": "aggregation_distribution", "params": {"bins": 20}},
        ],
    }
    return layerscope.run(spec, write=False, progress=False)


def invariant_values(results) -> dict:
    keys = ("analysis", "tensor", "metric", "class", "channel", "node", "feature")
    return {
        tuple(str(r.get(k)) for k in keys): r["value"]
        for r in results.records
        if r["metric"] in INVARIANT[r["analysis"]]
    }


@pytest.fixture(scope="module")
def unscaled(tmp_path_factory):
    return analyse(tmp_path_factory.mktemp("scale"), 1.0)


@pytest.mark.parametrize(
    "c, rtol",
    [
        (2.0**-100, 1e-9),
        (2.0**100, 1e-9),  # ≈ 7.9e-31 and 1.3e30, exact in float32: the model's tensors are
        # exactly c times the unscaled ones, so only the estimators can differ
        (1e-30, 1e-4),
        (1e30, 1e-4),  # the model's float32 arithmetic rounds x·1e-30 differently from x·1
    ],
)  # (measured up to 2.7e-5 on total indices of low-variance nodes)
def test_scale_invariant_records_do_not_move(tmp_path, unscaled, c, rtol):
    scaled = analyse(tmp_path, c)
    assert not scaled.failures and not any("outside its range" in w or "non-finite" in w for w in scaled.warnings)
    assert not any("nearly constant" in w for w in scaled.warnings)
    expected, got = invariant_values(unscaled), invariant_values(scaled)
    assert set(got) == set(expected) and len(got) > 400
    assert {k[0] for k in got} == set(INVARIANT)
    worst = max(abs(got[k] - v) / max(abs(v), 1e-12) for k, v in expected.items())
    assert worst <= rtol, worst


# --- ranges --------------------------------------------------------------------------------------------------


def test_records_outside_their_range_are_dropped_and_round_off_is_clipped():
    records = [
        {"metric": "score", "layer": "a", "value": 1.0 + 1e-12},
        {"metric": "score", "layer": "b", "value": -0.3},
        {"metric": "score", "layer": "c", "value": 0.5},
        {"metric": "free", "layer": "d", "value": -7.0},
    ]
    warnings: list[str] = []
    kept = records_in_range(records, lambda r: (0.0, 1.0) if r["metric"] == "score" else None, warnings, "x (m)")
    assert [(r["layer"], r["value"]) for r in kept] == [("a", 1.0), ("c", 0.5), ("d", -7.0)]
    assert warnings == [
        "x (m): score of 'b' came out as -0.3, outside its range [0, 1]; record dropped (a numerical failure)"
    ]


class Overshooting(Estimator):
    """Records a 'probability' of 1.5 for every tensor: the engine must not let it through."""

    name = "overshooting"
    metric_ranges = {"probability": (0.0, 1.0)}

    def update(self, batch):
        pass

    def finalize(self):
        return [self.record(name, "probability", 1.5) for name in self.tensors] + [
            self.record(name, "probability", 0.25) for name in self.tensors
        ]


def test_the_engine_never_records_an_impossible_value(tiny_onnx):
    plugin = types.ModuleType("overshooting_plugin")
    plugin.register_estimators = hookimpl(lambda register: register(Overshooting))
    results = layerscope.run(
        {
            "model": {"source": str(tiny_onnx)},
            "data": {"source": "digits", "limit": 20},
            "analyses": [{"id": "o", "estimator": "overshooting", "on": {"op_type": "Relu"}}],
        },
        write=False,
        progress=False,
        plugins=(plugin,),
    )
    assert [r["value"] for r in results.records] == [0.25]
    assert any("probability" in w and "outside its range [0, 1]" in w for w in results.warnings)
    assert math.isfinite(results.records[0]["value"])
