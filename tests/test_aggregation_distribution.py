"""Closed forms, Monte-Carlo checks on a Relu→GlobalAveragePool→Gemm graph, detection, conformance."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from scipy import integrate, stats

import layerscope
from layerscope import LoadedModel
from layerscope.graph.tensors import describe_tensors
from layerscope.plugins.aggregation_distribution.aggregations import find_aggregations
from layerscope.plugins.aggregation_distribution.estimator import AggregationDistribution
from layerscope.plugins.aggregation_distribution.maths import (
    aggregated_moments,
    gamma_parameters,
    gaussian_kl,
    invert_rectified_moments,
    max_moments,
    rectified_gaussian_moments,
)
from layerscope.testing import check_conformance, make_batches

FLOAT = onnx.TensorProto.FLOAT


def test_rectified_gaussian_moments():
    mean, var = rectified_gaussian_moments(0.0, 1.0)
    assert mean == pytest.approx(1 / np.sqrt(2 * np.pi), abs=1e-12) and mean == pytest.approx(0.39894, abs=1e-5)
    assert var == pytest.approx(0.5 - 1 / (2 * np.pi), abs=1e-12) and var == pytest.approx(0.34085, abs=1e-5)
    z = np.random.default_rng(0).normal(0.7, 1.3, 2_000_000)
    mc = np.maximum(z, 0)
    assert rectified_gaussian_moments(0.7, 1.3) == pytest.approx((mc.mean(), mc.var()), rel=3e-3)


def test_gamma_moment_match_for_7x7_average_pooling():
    mean, var = aggregated_moments(*rectified_gaussian_moments(0.0, 1.0), 49, 49, "mean")
    shape, scale = gamma_parameters(mean, var)
    assert mean == pytest.approx(0.39894, abs=1e-5) and var == pytest.approx(0.006956, abs=1e-6)
    assert shape == pytest.approx(22.88, abs=0.01) and scale == pytest.approx(0.01744, abs=1e-5)
    total, total_var = aggregated_moments(*rectified_gaussian_moments(0.0, 1.0), 49, 49, "sum")
    assert total == pytest.approx(49 * mean) and total_var == pytest.approx(49**2 * var)


def test_kl_closed_forms():
    assert gaussian_kl(0.0, 1.0, 0.0, 1.0) == 0.0
    assert gaussian_kl(0.0, 1.0, 1.0, 1.0) == pytest.approx(0.5)
    n1, n2 = stats.norm(0.3, 1.5), stats.norm(-1.0, 0.8)
    numeric = integrate.quad(lambda x: n1.pdf(x) * (n1.logpdf(x) - n2.logpdf(x)), -30, 30)[0]
    assert gaussian_kl(0.3, 1.5**2, -1.0, 0.8**2) == pytest.approx(numeric, rel=1e-6)


@pytest.mark.parametrize("mu, s", [(0.3, 2.0), (-1.5, 0.7), (2.0, 0.5)])
def test_moment_inversion_round_trip(mu, s):
    mean, var = rectified_gaussian_moments(mu, s)
    assert invert_rectified_moments(float(mean), float(var + mean**2)) == pytest.approx((mu, s), rel=1e-6)


def test_max_of_rectified_gaussians_matches_monte_carlo():
    z = np.random.default_rng(1).normal(-0.2, 1.0, (400_000, 9))
    mc = np.maximum(z, 0).max(axis=1)
    assert max_moments(-0.2, 1.0, 9) == pytest.approx((mc.mean(), mc.var()), rel=5e-3)


# --- a real Relu → GlobalAveragePool → Flatten → Gemm graph ----------------------------------

CHANNELS, SIDE, OUTPUTS = 3, 7, 4
WEIGHT = np.array([[1.0, -0.5, 0.3], [0.2, 0.8, -1.0], [-0.7, 0.1, 0.6], [0.5, 0.5, 0.5]], dtype=np.float32)
BIAS = np.array([0.1, -0.2, 0.0, 0.3], dtype=np.float32)


def gap_model(pool: str = "GlobalAveragePool") -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["z"], ["a"], name="relu")]
    inits = [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(BIAS, "b")]
    if pool == "GlobalAveragePool":
        nodes.append(helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"))
    else:  # ReduceMean over a flattened spatial axis, then MatMul + Add
        inits.append(numpy_helper.from_array(np.array([0, CHANNELS, -1], np.int64), "shape"))
        inits.append(numpy_helper.from_array(np.array([2], np.int64), "axes"))
        nodes += [
            helper.make_node("Reshape", ["a", "shape"], ["a_flat"]),
            helper.make_node("ReduceMean", ["a_flat", "axes"], ["g"], keepdims=1, name="mean"),
        ]
    nodes.append(helper.make_node("Flatten", ["g"], ["g_flat"]))
    if pool == "GlobalAveragePool":
        nodes.append(helper.make_node("Gemm", ["g_flat", "w", "b"], ["y"], transB=1, name="fc"))
    else:
        inits.append(numpy_helper.from_array(WEIGHT.T.copy(), "wt"))
        nodes += [helper.make_node("MatMul", ["g_flat", "wt"], ["y_mm"]), helper.make_node("Add", ["y_mm", "b"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "gap",
        [helper.make_tensor_value_info("z", FLOAT, ["N", CHANNELS, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", OUTPUTS])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def synthetic_data(n=6000, seed=0):
    """z ~ N(μ_{class,c}, s_c²) independently at every position; two classes with different means."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    means = np.array([[0.1, -0.3, 0.0], [-0.1, -0.1, 0.3]])[labels]
    scales = np.array([1.0, 0.5, 2.0])
    z = means[:, :, None, None] + scales[None, :, None, None] * rng.standard_normal((n, CHANNELS, SIDE, SIDE))
    return z.astype(np.float32), labels


@pytest.mark.parametrize("fit", ["input", "output"])
def test_predictions_match_monte_carlo_through_a_spec(tmp_path, fit):
    onnx.save(gap_model(), str(tmp_path / "gap.onnx"))
    z, labels = synthetic_data()
    np.savez(tmp_path / "d.npz", x=z, y=labels)
    spec = {
        "model": {"source": str(tmp_path / "gap.onnx")},
        "data": {"source": "npz", "path": str(tmp_path / "d.npz"), "batch_size": 500},
        "analyses": [{"id": "agg", "estimator": "aggregation_distribution", "params": {"fit": fit}}],
        "outputs": {"dir": str(tmp_path / "out"), "formats": ["json", "plots"]},
    }
    results = layerscope.run(spec, progress=False)
    (m_eff,) = results.select(metric="effective_m")
    assert m_eff["value"] == pytest.approx(49, rel=0.1)  # positions are independent here

    def get(metric, **keys):
        return results.select(metric=metric, **keys)[0]["value"]

    for channel in range(CHANNELS):
        get_channel = functools.partial(get, channel=channel)
        assert get_channel("predicted_mean") == pytest.approx(get_channel("empirical_mean"), rel=0.02, abs=0.005)
        assert get_channel("predicted_var") == pytest.approx(get_channel("empirical_var"), rel=0.12)
        assert 0 <= get_channel("fit_kl") < 0.2
    for cls in (0, 1):
        for node in range(OUTPUTS):
            get_node = functools.partial(get, node=node, **{"class": cls})
            assert get_node("node_predicted_mean") == pytest.approx(get_node("node_empirical_mean"), abs=0.02)
            assert get_node("node_predicted_var") == pytest.approx(get_node("node_empirical_var"), rel=0.15)
            assert get_node("kl_predicted") == pytest.approx(get_node("kl_empirical"), rel=0.35, abs=0.1)
    assert results.analyses[0]["reconstructed"].startswith("Ong, Husain & Bober")
    assert (tmp_path / "out" / "plots" / "agg.png").exists()


def test_detection_reads_weights_through_reduce_mean_and_matmul():
    for pool in ("GlobalAveragePool", "ReduceMean"):
        model = gap_model(pool)
        (found,) = find_aggregations(LoadedModel(model, "m", "test"), describe_tensors(model))
        assert (found.kind, found.positions, found.activation, found.activation_input) == ("mean", 49, "Relu", "z")
        assert found.linear_output == "y"
        np.testing.assert_allclose(found.weight, WEIGHT, atol=1e-7)
        np.testing.assert_allclose(found.bias, BIAS, atol=1e-7)


def test_detection_on_demo_models_and_exported_adaptive_pooling():
    from layerscope.adapters.demo_zoo import EPOCHS, ensure_trained, epoch_label
    from layerscope.adapters.torch_export import export_to_onnx

    cnn = onnx.load(str(ensure_trained("digits-cnn") / f"{epoch_label(EPOCHS)}.onnx"))
    assert (
        find_aggregations(LoadedModel(cnn, "m", "test"), describe_tensors(cnn)) == []
    )  # 2×2 max pooling is not global
    gap = onnx.load(str(ensure_trained("digits-gap") / f"{epoch_label(EPOCHS)}.onnx"))
    (found,) = find_aggregations(LoadedModel(gap, "m", "test"), describe_tensors(gap))
    assert (found.layer, found.positions, found.weight.shape) == ("pool", 64, (10, 32))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    )
    proto = export_to_onnx(model, np.zeros((2, 1, 6, 6), np.float32))
    (found,) = find_aggregations(LoadedModel(proto, "m", "test"), describe_tensors(proto))
    assert found.positions == 16 and found.layer == "2"
    np.testing.assert_allclose(found.weight, model[4].weight.detach().numpy(), atol=1e-7)


def test_demo_cnn_has_no_aggregation_to_analyse():
    spec = {
        "model": {"source": "demo:digits-cnn"},
        "data": {"source": "digits", "limit": 50},
        "analyses": [{"id": "agg", "estimator": "aggregation_distribution"}],
    }
    with pytest.raises(layerscope.UserError, match="matches no tensor"):
        layerscope.run(spec, write=False, progress=False)


def test_an_effective_m_clipped_to_the_positions_is_warned(tmp_path):
    """Positions with different means and little noise: Var a / Var g far exceeds M = 49."""
    onnx.save(gap_model(), str(tmp_path / "gap.onnx"))
    rng = np.random.default_rng(1)
    offsets = np.where(np.arange(SIDE * SIDE).reshape(SIDE, SIDE) % 2 == 0, 2.0, -2.0)
    z = (offsets + 0.05 * rng.standard_normal((400, CHANNELS, SIDE, SIDE))).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=z)
    results = layerscope.run(
        {
            "model": {"source": str(tmp_path / "gap.onnx")},
            "data": {"source": "npz", "path": str(tmp_path / "d.npz"), "batch_size": 200},
            "analyses": [{"id": "agg", "estimator": "aggregation_distribution"}],
        },
        write=False,
        progress=False,
    )
    assert results.select(metric="effective_m")[0]["value"] == 49
    (warning,) = [w for w in results.warnings if "effective_m" in w]
    assert "outside [1, 49]" in warning and "negatively correlated" in warning and "use 49" in warning


def test_conformance():
    model = gap_model()
    tensors = describe_tensors(model)
    z, labels = synthetic_data(n=600, seed=3)
    names = ["z", "a", "g", "y"]
    outputs = ort.InferenceSession(_expose(model, names).SerializeToString()).run(names[1:], {"z": z})
    batches = make_batches(dict(zip(names, [z, *outputs])), labels, batch_size=150)

    def make():
        estimator = AggregationDistribution(
            AggregationDistribution.Params(bins=20), [t for t in tensors if t.name == "g"]
        )
        estimator.bind_graph(tensors, LoadedModel(model, "gap", "test"))
        return estimator

    check_conformance(make, batches, rtol=1e-7, atol=1e-9)


def _expose(model, names):
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in names[1:]:
        if name != "y":
            exposed.graph.output.append(helper.make_tensor_value_info(name, FLOAT, None))
    return exposed
