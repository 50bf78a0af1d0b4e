"""Known answers through specs on small ONNX graphs, the PCA rewrite, and conformance."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import layerscope
from layerscope.graph.tensors import TensorInfo
from layerscope.plugins.mean_dimension.estimator import MeanDimension
from layerscope.plugins.mean_dimension.inverse_pca import fit_standardised_pca, prepend_inverse_pca
from layerscope.plugins.mean_dimension.maths import feature_groups
from layerscope.testing import check_conformance, feed, plan_batches
from layerscope.util.errors import UserError

from .conftest import tiny_mlp_proto

FLOAT = onnx.TensorProto.FLOAT


def model_file(folder, name, nodes, features, initializers):
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", FLOAT, None)],
        initializers,
    )
    path = folder / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def const(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def columns(features):
    nodes = [helper.make_node("Gather", ["x", f"i{k}"], [f"x{k + 1}"], axis=1) for k in range(features)]
    return nodes, [numpy_helper.from_array(np.array([k], np.int64), f"i{k}") for k in range(features)]


def run_md(tmp_path, model, samples, pairs, **params):
    np.savez(tmp_path / "data.npz", x=samples.astype(np.float32))
    spec = {
        "model": {"source": str(model)},
        "data": {"source": "npz", "path": str(tmp_path / "data.npz"), "batch_size": 2000},
        "analyses": [
            {
                "id": "md",
                "estimator": "mean_dimension",
                "on": {"role": "output"},
                "params": {"pairs": pairs, "features": "elements", **params},
            }
        ],
    }
    results = layerscope.run(spec, write=False, progress=False)
    (md,) = results.select(metric="mean_dimension")
    totals = [r["value"] for r in sorted(results.select(metric="total_index"), key=lambda r: r["feature"])]
    return md["value"], totals


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def test_ishigami(tmp_path, rng):
    nodes, inits = columns(3)
    nodes += [
        helper.make_node("Sin", ["x1"], ["s1"]),
        helper.make_node("Sin", ["x2"], ["s2"]),
        helper.make_node("Mul", ["s2", "s2"], ["s2sq"]),
        helper.make_node("Mul", ["s2sq", "a"], ["t2"]),
        helper.make_node("Pow", ["x3", "four"], ["x3p"]),
        helper.make_node("Mul", ["x3p", "b"], ["t3a"]),
        helper.make_node("Mul", ["t3a", "s1"], ["t3"]),
        helper.make_node("Add", ["s1", "t2"], ["u"]),
        helper.make_node("Add", ["u", "t3"], ["y"]),
    ]
    model = model_file(tmp_path, "ishigami", nodes, 3, inits + [const("a", 7.0), const("b", 0.1), const("four", 4.0)])
    md, totals = run_md(tmp_path, model, rng.uniform(-math.pi, math.pi, (30001, 3)), 30000)
    assert totals == pytest.approx([0.5576, 0.4424, 0.2437], abs=0.02)
    assert md == pytest.approx(1.2437, abs=0.02)


def test_sobol_g_function(tmp_path, rng):
    a = np.array([0, 1, 4.5, 9, 99, 99, 99, 99], dtype=np.float32)
    nodes = [
        helper.make_node("Mul", ["x", "four"], ["m"]),
        helper.make_node("Sub", ["m", "two"], ["s"]),
        helper.make_node("Abs", ["s"], ["abs"]),
        helper.make_node("Add", ["abs", "a"], ["num"]),
        helper.make_node("Div", ["num", "den"], ["factors"]),
        helper.make_node("ReduceProd", ["factors"], ["y"], axes=[1], keepdims=1),
    ]
    model = model_file(
        tmp_path, "gfun", nodes, 8, [const("four", 4.0), const("two", 2.0), const("a", a), const("den", 1 + a)]
    )
    md, totals = run_md(tmp_path, model, rng.uniform(0, 1, (30001, 8)), 30000)
    assert totals[:4] == pytest.approx([0.7871, 0.2422, 0.0343, 0.0105], abs=0.02)
    assert md == pytest.approx(1.0745, abs=0.03)


def test_additive_function_has_mean_dimension_one(tmp_path, rng):
    nodes, inits = columns(3)
    nodes += [
        helper.make_node("Sin", ["x1"], ["s"]),
        helper.make_node("Mul", ["x2", "x2"], ["q"]),
        helper.make_node("Add", ["s", "q"], ["u"]),
        helper.make_node("Add", ["u", "x3"], ["y"]),
    ]
    md, _ = run_md(tmp_path, model_file(tmp_path, "additive", nodes, 3, inits), rng.uniform(-2, 2, (20001, 3)), 20000)
    assert md == pytest.approx(1.0, abs=0.03)


def test_product_of_zero_mean_factors_has_mean_dimension_d(tmp_path, rng):
    nodes = [helper.make_node("ReduceProd", ["x"], ["y"], axes=[1], keepdims=1)]
    md, totals = run_md(tmp_path, model_file(tmp_path, "product", nodes, 3, []), rng.uniform(-1, 1, (40001, 3)), 40000)
    assert md == pytest.approx(3.0, abs=0.15)
    assert totals == pytest.approx([1.0, 1.0, 1.0], abs=0.06)


def test_ignored_feature_has_zero_index(tmp_path, rng):
    nodes, inits = columns(2)
    nodes += [helper.make_node("Mul", ["x1", "x2"], ["y"])]
    _, totals = run_md(
        tmp_path,
        model_file(tmp_path, "ignores", nodes, 3, inits),
        rng.uniform(-1, 1, (2001, 3)),
        2000,
        estimator="half_mean_square",
    )
    assert totals[2] == 0.0
    assert totals[0] > 0.5 and totals[1] > 0.5


def test_pca_rewrite_reproduces_outputs_exactly():
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((400, 64)) @ rng.standard_normal((64, 64)) * 0.3).astype(np.float32)
    x[:, 0] = 0.0  # a constant feature keeps scale 1
    pca = fit_standardised_pca(len(x), x.astype(np.float64).sum(0), x.astype(np.float64).T @ x.astype(np.float64))
    model = tiny_mlp_proto()
    original = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    rewritten = prepend_inverse_pca(model, pca)
    z = pca.transform(x).astype(np.float32)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(64), atol=1e-10)
    np.testing.assert_allclose(
        ort.InferenceSession(rewritten.SerializeToString()).run(None, {"pca_z": z})[0], original, atol=2e-5, rtol=1e-4
    )
    assert [n.op_type for n in rewritten.graph.node[:2]] == ["MatMul", "Add"]


def test_feature_groups():
    assert len(feature_groups((64,), "pixels")) == 64
    pixels = feature_groups((3, 4, 4), "pixels")
    assert len(pixels) == 16 and pixels.indices[5].tolist() == [5, 21, 37] and pixels.grid == (4, 4)
    patches = feature_groups((1, 8, 8), "patches:4")
    assert len(patches) == 4 and len(patches.indices[0]) == 16 and patches.positions[3] == [1, 1]
    assert [len(g) for g in feature_groups((2, 3, 3), "channels").indices] == [9, 9]
    with pytest.raises(ValueError):
        feature_groups((64,), "channels")


def infos():
    x = TensorInfo("x", "Input", "x", "float32", ("N", 3), True, role="input")
    hidden = TensorInfo("h", "Tanh", "hidden", "float32", ("N", 2), True, order=0, inputs=("x",))
    out = TensorInfo("out", "Gemm", "out", "float32", ("N", 4), True, order=1, inputs=("h",), role="output")
    return [x, hidden, out]


def network(rows):
    weights = np.array([[1.0, -0.5], [0.3, 2.0], [-1.0, 0.7]])
    hidden = np.tanh(rows.astype(np.float64) @ weights)
    return {"h": hidden, "out": hidden @ np.array([[1.0, 0, -1, 2], [0.5, 1, 1, 0]])}


def build(**params):
    estimator = MeanDimension(MeanDimension.Params(features="elements", **params), infos()[1:])
    estimator.bind_graph(infos())
    return estimator


def test_conformance_and_row_slices():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(-1, 1, (160, 3)), rng.integers(0, 4, 160)
    batches = plan_batches(build(pairs=150, nll=True), x, y, network, batch_size=40)
    check_conformance(lambda: build(pairs=150, nll=True), batches)
    split = plan_batches(build(pairs=150, nll=True), x, y, network, batch_size=40, parts=3)
    from layerscope.testing import assert_records_close

    assert_records_close(
        feed(build(pairs=150, nll=True), split).finalize(), feed(build(pairs=150, nll=True), batches).finalize()
    )
    records = feed(build(pairs=150, nll=True), batches).finalize()
    (count,) = {r["pairs"] for r in records if r["metric"] == "mean_dimension"}
    assert count == 150 and {r["layer"] for r in records} == {"hidden", "out", "loss (nll)"}


def test_digits_cnn_layer_by_layer_with_heatmap(tmp_path):
    spec = {
        "model": {"source": "demo:digits-cnn"},
        "data": {"source": "digits", "batch_size": 100},
        "analyses": [
            {"id": "md", "estimator": "mean_dimension", "params": {"pairs": 150, "features": "pixels", "nll": True}}
        ],
        "outputs": {"dir": str(tmp_path), "formats": ["json", "plots"]},
    }
    results = layerscope.run(spec, progress=False)
    layers = [r["layer"] for r in results.select(metric="mean_dimension")]
    assert layers == ["relu1", "relu2", "relu3", "fc2", "loss (nll)"]
    for record in results.select(metric="mean_dimension"):
        assert 0.0 < record["value"] < 20.0  # generalised indices of correlated pixels may sum below 1
    heat = results.select(metric="total_index", tensor="nll")
    assert len(heat) == 64 and heat[9]["position"] == [1, 1] and heat[0]["grid"] == [8, 8]
    assert (tmp_path / "plots" / "md.png").exists()


def test_pca_basis_through_a_spec():
    spec = {
        "model": {"source": "demo:digits-mlp"},
        "data": {"source": "digits", "batch_size": 100},
        "analyses": [
            {
                "id": "md",
                "estimator": "mean_dimension",
                "on": {"role": "output"},
                "params": {"pairs": 100, "basis": "pca", "features": "elements"},
            }
        ],
    }
    results = layerscope.run(spec, write=False, progress=False)
    (md,) = results.select(metric="mean_dimension")
    assert md["basis"] == "pca" and 0.5 < md["value"] < 10.0
    assert len(results.select(metric="total_index")) == 64
    assert results.models[0]["passes"] == 2


def test_arrays_named_by_model_input(tmp_path):
    """Data given as arrays by model input name (here npz ``inputs:``; also a dict from Python) is
    perturbed as the same data given as one array is."""
    from layerscope.plugins.data.digits import load_digits_split

    x, y = load_digits_split("test")
    np.savez(tmp_path / "data.npz", pixels=x[:120].astype(np.float32), y=y[:120])
    found = {}
    for name, data in (("array", {"x_key": "pixels"}), ("named", {"inputs": {"x": "pixels"}})):
        spec = {
            "model": {"source": "demo:digits-mlp"},
            "data": {"source": "npz", "path": str(tmp_path / "data.npz"), "batch_size": 50, **data},
            "analyses": [{"id": "md", "estimator": "mean_dimension", "params": {"pairs": 100}}],
        }
        results = layerscope.run(spec, write=False, progress=False)
        assert not results.failures, results.failures
        found[name] = {(r["layer"], r["metric"], r.get("feature")): r["value"] for r in results.records}
    assert found["named"] == found["array"] and found["array"]


def test_bad_feature_grouping_is_a_user_error():
    spec = {
        "model": {"source": "demo:digits-mlp"},
        "data": {"source": "digits"},
        "analyses": [{"id": "md", "estimator": "mean_dimension", "params": {"features": "channels"}}],
    }
    with pytest.raises(layerscope.UserError, match="channel or spatial axis"):
        layerscope.run(spec, write=False, progress=False)
    spec["analyses"][0]["params"] = {"basis": "pca", "features": "patches:2"}
    with pytest.raises(layerscope.SpecError, match="basis: pca"):
        layerscope.run(spec, write=False, progress=False)


# --- the figure -----------------------------------------------------------------------------------------------


def total_records(grid, basis="input"):
    positions = [list(p) for p in np.ndindex(*grid)]
    base = {
        "analysis": "md",
        "estimator": "mean_dimension",
        "model": "m",
        "layer": "out",
        "tensor": "out",
        "unit": "",
        "basis": basis,
    }
    return [{**base, "metric": "mean_dimension", "value": 1.2, "pairs": 9}] + [
        {
            **base,
            "metric": "total_index",
            "value": 0.1 * (i + 1),
            "feature": i,
            "position": p,
            "grid": list(grid),
            "pairs": 9,
        }
        for i, p in enumerate(positions)
    ]


@pytest.mark.parametrize(
    "grid, basis, kind, shape",
    [
        ((10,), "input", "bars", (10,)),  # a flat input of 10 features: ten bars, not one
        ((64,), "pca", "bars", (64,)),  # principal components have no spatial layout
        ((64,), "input", "image", (8, 8)),  # digits' flat 64 pixels
        ((8, 8), "input", "image", (8, 8)),
        ((2, 4, 4), "input", "image", (4, 4)),  # (C, H, W) elements: summed over channels
    ],
)
def test_total_index_panel_follows_the_features(grid, basis, kind, shape):
    import matplotlib.pyplot as plt

    from layerscope.plugins.mean_dimension.plot import plot_mean_dimension, total_index_layout

    records = total_records(grid, basis)
    got_kind, values = total_index_layout([r for r in records if r["metric"] == "total_index"])
    assert (got_kind, values.shape) == (kind, shape)
    assert values.sum() == pytest.approx(sum(r["value"] for r in records if r["metric"] == "total_index"))
    figure = plot_mean_dimension(records)
    right = figure.axes[1]
    assert len(right.patches) == (shape[0] if kind == "bars" else 0) and len(right.images) == (kind == "image")
    plt.close(figure)


def _difference_model(path) -> None:
    """y = x1 − x2 as a real ONNX graph (Gemm with weights [1, −1])."""
    weight = numpy_helper.from_array(np.array([[1.0], [-1.0]], dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], name="difference")],
        "difference",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))


def _difference_spec(tmp_path, x: np.ndarray, pairs: int) -> dict:
    _difference_model(tmp_path / "difference.onnx")
    np.savez(tmp_path / "x.npz", x=x.astype(np.float32))
    return {
        "model": {"source": str(tmp_path / "difference.onnx")},
        "data": {"source": "npz", "path": str(tmp_path / "x.npz"), "batch_size": 1000},
        "analyses": [
            {
                "id": "md",
                "estimator": "mean_dimension",
                "on": {"role": "output"},
                "params": {"pairs": pairs, "features": "elements"},
            }
        ],
    }


def test_generalised_indices_of_correlated_inputs_exceed_the_independent_bounds(tmp_path):
    """Why the declared ranges are [0, ∞) and not [0, 1] and [1, d]: with dependent features the given-data
    indices are generalised ones. For f = x1 − x2 with unit variances and correlation ρ, Var f = 2(1 − ρ) and
    Δ_1 = x1' − x1, so T_1 = T_2 = 1 / (2(1 − ρ)) = 5 at ρ = 0.9 and the mean dimension is 10 > d = 2;
    dropping such values as impossible would hide what a network computing differences of correlated
    pixels does."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20_001, 2))
    rho = 0.9
    x = np.stack([z[:, 0], rho * z[:, 0] + np.sqrt(1 - rho**2) * z[:, 1]], axis=1)
    results = layerscope.run(_difference_spec(tmp_path, x, 20_000), write=False, progress=False)
    (md,) = results.select(metric="mean_dimension")
    assert md["value"] == pytest.approx(10.0, rel=0.05)
    assert [r["value"] for r in results.select(metric="total_index")] == pytest.approx([5.0, 5.0], rel=0.05)


def test_degenerate_inputs_are_refused_or_left_out_never_absurd(tmp_path):
    """The tester's cases: 3 samples gave mean dimensions of 21267 and 10977; a constant layer recorded 0.0."""
    rng = np.random.default_rng(1)
    with pytest.raises(UserError, match="only 2 pairs of consecutive samples came with the data; .* at least 10"):
        layerscope.run(_difference_spec(tmp_path, rng.standard_normal((3, 2)), 10), write=False, progress=False)
    with pytest.raises(
        layerscope.SpecError, match="analyses.0.params.pairs: Input should be greater than or equal to 10"
    ):
        layerscope.validate(_difference_spec(tmp_path, rng.standard_normal((30, 2)), 3))
    equal = np.repeat(rng.standard_normal((200, 1)), 2, axis=1) + 7.0  # x1 = x2: f = 0 up to round-off
    results = layerscope.run(_difference_spec(tmp_path, equal, 150), write=False, progress=False)
    assert not results.select(metric="mean_dimension") and not results.select(metric="total_index")
    assert any("every output node is constant" in w for w in results.warnings), results.warnings


def test_constant_data_is_refused_and_dependent_features_are_flagged(tmp_path):
    """The reviewer's cases: constant data blamed every layer ("a dead or constant layer") and recorded
    nothing; 64 identical features gave mean dimensions of 1536 with no word."""
    rng = np.random.default_rng(2)
    with pytest.raises(UserError, match="every pair of consecutive samples is identical in every feature"):
        layerscope.run(_difference_spec(tmp_path, np.ones((200, 2)), 100), write=False, progress=False)
    z = rng.standard_normal((2001, 1))
    dependent = np.concatenate([z, 0.999 * z + 0.001 * rng.standard_normal((2001, 1))], axis=1)
    results = layerscope.run(_difference_spec(tmp_path, dependent, 2000), write=False, progress=False)
    (md,) = results.select(metric="mean_dimension")
    assert md["value"] > 2
    assert any("exceeds the 2 feature groups: the features are strongly dependent" in w for w in results.warnings)
