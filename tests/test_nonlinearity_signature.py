"""Known answers, activation pattern detection, and conformance."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import layerscope
from layerscope.graph.activations import find_activations
from layerscope.graph.tensors import TensorInfo, describe_tensors
from layerscope.plugins.nonlinearity_signature.estimator import NonlinearitySignature, reduce_features
from layerscope.plugins.nonlinearity_signature.maths import (
    affinity_score,
    exact_w2_squared,
    linear_cka,
    linear_r2,
    sparsity_per_sample,
)
from layerscope.testing import check_conformance, feed, make_batches

N = 1000
UNIFORM = (np.arange(N) + 0.5) / N  # evenly spread quantiles: a deterministic sample


def column(values):
    return np.asarray(values, dtype=np.float64).reshape(-1, 1)


def score(x, y, **kwargs):
    return affinity_score(column(x) if np.ndim(x) == 1 else x, column(y) if np.ndim(y) == 1 else y, **kwargs)[0]


def test_identity_and_positive_affine_maps_score_one():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 3)) @ np.array([[2.0, 0.3, 0], [0, 1.0, 0.5], [0, 0, 0.2]]) + 1.0
    assert score(x, x) == pytest.approx(1.0, abs=1e-4)
    assert score(x, 2.5 * x - 3.0) == pytest.approx(1.0, abs=1e-4)
    psd = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.3]])
    assert score(x, x @ psd + 1) == pytest.approx(1.0, abs=1e-4)


def test_negative_slope_and_rotation_score_below_one():
    rng = np.random.default_rng(1)
    skewed = rng.exponential(size=(600, 2)) * np.array([3.0, 0.5])
    assert score(skewed[:, 0], -skewed[:, 0]) < 0.9
    rotation = np.array([[0.0, -1.0], [1.0, 0.0]])  # orthogonal, not PSD
    assert score(skewed, skewed @ rotation.T) < 0.9


@pytest.mark.parametrize(
    "mean, expected", [(-1.895, 0.129), (-0.632, 0.537), (0.632, 0.799), (1.474, 0.943), (2.316, 1.000)]
)
def test_relu_of_uniform_inputs_table(mean, expected):
    x = mean - 2 + 4 * UNIFORM
    assert score(x, np.maximum(x, 0)) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize(
    "function, expected", [(lambda v: np.maximum(v, 0), 0.497), (np.tanh, 0.665), (scipy.special.expit, 0.774)]
)
def test_activations_of_gaussian_inputs(function, expected):
    x = scipy.stats.norm.ppf(UNIFORM, loc=-1.0, scale=2.0)
    assert score(x, function(x)) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("power, expected", [(1, 1.0), (3, 0.711), (5, 0.577), (11, 0.400), (21, 0.289), (41, 0.205)])
def test_odd_powers(power, expected):
    x = np.linspace(-1, 1, 1000)
    assert score(x, x**power) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("solver", ["emd", "assignment"])
def test_exact_w2_matches_sorting_in_one_dimension(solver):
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(400), rng.gamma(2.0, size=400)
    by_sorting = float(np.mean((np.sort(a) - np.sort(b)) ** 2))
    assert exact_w2_squared(column(a), column(b), solver) == pytest.approx(by_sorting, rel=1e-9)


def test_solvers_agree_in_several_dimensions():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((300, 4)), np.maximum(rng.standard_normal((300, 4)), 0)
    assert exact_w2_squared(x, y, "emd") == pytest.approx(exact_w2_squared(x, y, "assignment"), rel=1e-9)


def test_side_metrics():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 3))
    assert linear_cka(x, 3 * x + 1) == pytest.approx(1.0)
    assert linear_r2(x, x @ rng.standard_normal((3, 2))) == pytest.approx(1.0)
    values = torch.tensor([[0.0, 0.0005, 0.5, -2.0], [1.0, 1.0, 1.0, -0.001]])
    assert sparsity_per_sample(values).tolist() == [0.5, 0.25]


@pytest.mark.parametrize("case", ["random", "collinear inputs", "constant output", "more features than samples"])
def test_r2_equals_sklearns_linear_regression_score(case):
    from sklearn.linear_model import LinearRegression

    rng = np.random.default_rng(7)
    x = rng.standard_normal((200, 12))
    if case == "collinear inputs":
        x[:, 5] = 2 * x[:, 0] - x[:, 3]
    if case == "more features than samples":
        x = rng.standard_normal((20, 40))
    y = np.tanh(x[:, :6] @ rng.standard_normal((6, 5))) + 0.1 * rng.standard_normal((len(x), 5))
    if case == "constant output":
        y[:, 2] = 3.0
    assert linear_r2(x, y) == pytest.approx(float(LinearRegression().fit(x, y).score(x, y)), abs=1e-9)


def test_reductions_follow_the_reference():
    values = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    torch.testing.assert_close(reduce_features(values, -1), values.mean(dim=(2, 3)))
    tokens = torch.randn(4, 5, 6)
    assert reduce_features(tokens, -1).shape == (4, 5) and reduce_features(tokens, 1).shape == (4, 6)


# --- the estimator ------------------------------------------------------------------------------


def pair_infos():
    pre = TensorInfo("pre", "Gemm", "fc", "float32", ("N", 4), True, order=0, inputs=("x", "w"))
    post = TensorInfo("post", "Tanh", "act", "float32", ("N", 4), True, order=1, inputs=("pre",))
    conv_pre = TensorInfo("cpre", "Conv", "conv", "float32", ("N", 3, 2, 2), True, order=2, inputs=("post", "k"))
    conv_post = TensorInfo("cpost", "Relu", "relu", "float32", ("N", 3, 2, 2), True, order=3, inputs=("cpre",))
    return [pre, post, conv_pre, conv_post]


def build(samples=150, **params):
    infos = pair_infos()
    estimator = NonlinearitySignature(NonlinearitySignature.Params(samples=samples, **params), [infos[1], infos[3]])
    estimator.bind_graph(infos)
    return estimator


def pair_batches(n=240, batch=40):
    rng = np.random.default_rng(5)
    pre = rng.standard_normal((n, 4)).astype(np.float32)
    cpre = rng.standard_normal((n, 3, 2, 2)).astype(np.float32) - 0.3
    return make_batches(
        {"pre": pre, "post": np.tanh(pre), "cpre": cpre, "cpost": np.maximum(cpre, 0)}, batch_size=batch
    ), pre


def test_estimator_uses_the_first_samples_of_the_stream():
    batches, pre = pair_batches()
    records = feed(build(samples=150), batches).finalize()
    got = {(r["layer"], r["metric"]): r for r in records}
    expected = score(pre[:150], np.tanh(pre[:150]))
    assert got[("act", "affinity_score")]["value"] == pytest.approx(expected, abs=1e-12)
    assert got[("act", "affinity_score")]["position"] == 0 and got[("relu", "affinity_score")]["position"] == 1
    assert got[("relu", "affinity_score")]["op_type"] == "Relu" and got[("act", "r2")]["samples"] == 150


def test_batches_give_the_mean_and_spread_of_disjoint_batches():
    batches, pre = pair_batches()
    estimator = feed(build(samples=70, batches=4), batches)
    got = {(r["layer"], r["metric"]): r for r in estimator.finalize()}
    per_batch = [score(pre[i : i + 70], np.tanh(pre[i : i + 70])) for i in (0, 70, 140)]  # 240 samples: 3 full batches
    assert got[("act", "affinity_score")]["value"] == pytest.approx(np.mean(per_batch), abs=1e-12)
    assert got[("act", "affinity_score_std")]["value"] == pytest.approx(np.std(per_batch), abs=1e-12)
    assert got[("act", "affinity_score_std")]["value"] > 0
    cka = [
        linear_cka(pre[i : i + 70].astype(np.float64), np.tanh(pre[i : i + 70]).astype(np.float64))
        for i in (0, 70, 140)
    ]
    assert got[("act", "linear_cka")]["value"] == pytest.approx(np.mean(cka), abs=1e-12)
    assert got[("act", "affinity_score")]["batches"] == 3 and got[("act", "affinity_score")]["samples"] == 70
    assert any("only 3 of the 4 requested batches" in w for w in estimator.collect_warnings())
    check_conformance(lambda: build(samples=70, batches=3), batches)


def test_sparsity_is_measured_before_spatial_pooling():
    """Each sample's conv output is zero at half its positions; pooled channel means are never zero."""
    batches, _ = pair_batches()
    for batch in batches:
        positive = batch.tensors["cpost"].abs() + 0.5
        positive[:, :, 0, :] = 0.0  # half of every feature map
        batch.tensors["cpost"] = positive
    got = {(r["layer"], r["metric"]): r["value"] for r in feed(build(samples=150), batches).finalize()}
    assert got[("relu", "sparsity")] == pytest.approx(0.5, abs=1e-12)
    pre = np.concatenate([b.tensors["pre"].numpy() for b in batches])[:150]
    assert got[("act", "sparsity")] == pytest.approx(float((np.abs(np.tanh(pre)) <= 1e-3).mean()), abs=1e-12)


def test_side_metrics_can_be_left_out():
    batches, _ = pair_batches()
    metrics = {r["metric"] for r in feed(build(samples=150, side_metrics=False), batches).finalize()}
    assert metrics == {"affinity_score"}


def test_conformance():
    batches, _ = pair_batches()
    check_conformance(lambda: build(samples=150), batches)


def test_non_activation_selection_is_rejected():
    infos = pair_infos()
    estimator = NonlinearitySignature(NonlinearitySignature.Params(), [infos[0]])
    with pytest.raises(layerscope.UserError, match="activation outputs or attention probabilities; not one: pre"):
        estimator.bind_graph(infos)


def test_constant_output_is_warned_not_nan():
    batches = make_batches(
        {
            "pre": -np.abs(np.random.default_rng(0).standard_normal((100, 4))).astype(np.float32) - 1,
            "post": np.zeros((100, 4), np.float32),
            "cpre": np.zeros((100, 3, 2, 2), np.float32),
            "cpost": np.zeros((100, 3, 2, 2), np.float32),
        },
        batch_size=50,
    )
    estimator = feed(build(samples=100), batches)
    records = estimator.finalize()
    assert all(np.isfinite(r["value"]) for r in records)
    assert sum("nearly constant" in w for w in estimator.collect_warnings()) == 2


# --- pattern detection ------------------------------------------------------------------------

FLOAT = onnx.TensorProto.FLOAT


def constant(name, value):
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def decomposed_model():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        # GELU, erf form: h * 0.5 * (1 + erf(h / sqrt 2))
        helper.make_node("Div", ["h", "sqrt2"], ["g1"]),
        helper.make_node("Erf", ["g1"], ["g2"]),
        helper.make_node("Add", ["g2", "one"], ["g3"]),
        helper.make_node("Mul", ["h", "g3"], ["g4"]),
        helper.make_node("Mul", ["g4", "half"], ["gelu"]),
        # SiLU: gelu * sigmoid(gelu)
        helper.make_node("Sigmoid", ["gelu"], ["s1"]),
        helper.make_node("Mul", ["gelu", "s1"], ["silu"]),
        helper.make_node("MatMul", ["silu", "w"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["relu"]),
        # GELU, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        helper.make_node("Pow", ["relu", "three"], ["t1"]),
        helper.make_node("Mul", ["t1", "c"], ["t2"]),
        helper.make_node("Add", ["relu", "t2"], ["t3"]),
        helper.make_node("Mul", ["t3", "k"], ["t4"]),
        helper.make_node("Tanh", ["t4"], ["t5"]),
        helper.make_node("Add", ["t5", "one"], ["t6"]),
        helper.make_node("Mul", ["relu", "t6"], ["t7"]),
        helper.make_node("Mul", ["t7", "half"], ["gelu_tanh"]),
    ]
    inits = [
        numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"),
        constant("sqrt2", 2**0.5),
        constant("one", 1.0),
        constant("half", 0.5),
        constant("three", 3.0),
        constant("c", 0.044715),
        constant("k", (2 / np.pi) ** 0.5),
    ]
    graph = helper.make_graph(
        nodes,
        "acts",
        [helper.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("gelu_tanh", FLOAT, ["N", 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_decomposed_patterns_are_found_once():
    found = [(a.input, a.output, a.kind) for a in find_activations(describe_tensors(decomposed_model()))]
    assert found == [
        ("h", "gelu", "Gelu (erf form)"),
        ("gelu", "silu", "SiLU (x·sigmoid(x))"),
        ("h2", "relu", "Relu"),
        ("relu", "gelu_tanh", "Gelu (tanh form)"),
    ]


def test_exported_torch_silu_and_softplus_are_patterns():
    from layerscope.adapters.torch_export import export_to_onnx

    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4),
        torch.nn.SiLU(),
        torch.nn.Linear(4, 4),
        torch.nn.Softplus(),
        torch.nn.Linear(4, 4),
        torch.nn.GELU(),
    )
    kinds = [a.kind for a in find_activations(describe_tensors(export_to_onnx(model, np.zeros((2, 4), np.float32))))]
    assert kinds == ["SiLU (x·sigmoid(x))", "Softplus (thresholded)", "Gelu"]


def test_decomposed_model_through_a_spec(tmp_path):
    onnx.save(decomposed_model(), str(tmp_path / "acts.onnx"))
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32))
    spec = {
        "model": {"source": str(tmp_path / "acts.onnx")},
        "data": {"source": "npz", "path": str(tmp_path / "d.npz")},
        "analyses": [{"id": "sig", "estimator": "nonlinearity_signature", "params": {"samples": 256}}],
    }
    results = layerscope.run(spec, write=False, progress=False)
    scores = results.select(metric="affinity_score")
    assert [r["op_type"] for r in scores] == ["Gelu (erf form)", "SiLU (x·sigmoid(x))", "Relu", "Gelu (tanh form)"]
    assert all(0.0 < r["value"] < 1.0 for r in scores)


def test_demo_signature_over_checkpoints(tmp_path):
    spec = {
        "model": {"source": "demo:digits-cnn", "checkpoints": ["epoch_01", "epoch_10"]},
        "data": {"source": "digits", "batch_size": 256},
        "analyses": [{"id": "sig", "estimator": "nonlinearity_signature", "params": {"samples": 512}}],
        "outputs": {"dir": str(tmp_path), "formats": ["json", "plots"]},
    }
    results = layerscope.run(spec, progress=False)
    for model in ("epoch_01", "epoch_10"):
        scores = results.select(metric="affinity_score", model=model)
        assert [r["layer"] for r in scores] == ["relu1", "relu2", "relu3"]
        assert all(0.3 < r["value"] <= 1.0 for r in scores)
    assert (tmp_path / "plots" / "sig.png").exists()


SATURATING = {
    "model": {"source": "demo:digits-cnn"},
    "data": {"source": "digits", "limit": 400, "batch_size": 50},
    "analyses": [{"id": "nls", "estimator": "nonlinearity_signature", "params": {"samples": 60}}],
}


def _counted_run(spec, **options):
    """The run's records and how many batches went through the model (the after_batch hook)."""
    import types

    from layerscope import hookimpl

    batches = []
    counter = types.SimpleNamespace(after_batch=hookimpl(lambda model, batch_index, samples: batches.append(samples)))
    return layerscope.run(spec, write=False, progress=False, plugins=(counter,), **options).records, batches


def test_a_saturated_signature_stops_reading_the_stream(monkeypatch):
    """samples: 60 of 400 in batches of 50: only the batches starting at 0 and 50 can be kept, so the
    model runs on those two; the records equal a run fed every batch."""
    records, batches = _counted_run(SATURATING)
    assert batches == [50, 50]
    monkeypatch.setattr(NonlinearitySignature, "saturated", lambda self, start: False)
    every_batch, all_batches = _counted_run(SATURATING)
    assert len(all_batches) == 8 and records == every_batch


def test_a_saturated_estimator_is_not_fed_while_others_still_read(monkeypatch):
    """Beside an estimator that reads every batch the stream runs to its end, the signature is no
    longer fed after its samples, and each analysis's records equal its run alone."""
    fed = []
    update = NonlinearitySignature.update
    monkeypatch.setattr(
        NonlinearitySignature, "update", lambda self, batch: fed.append(batch.start) or update(self, batch)
    )
    entropy = {"id": "ent", "estimator": "activation_entropy"}
    both, batches = _counted_run({**SATURATING, "analyses": [*SATURATING["analyses"], entropy]})
    assert len(batches) == 8 and sorted(set(fed)) == [0, 50]
    alone, _ = _counted_run(SATURATING)
    assert [r for r in both if r["analysis"] == "nls"] == alone
    assert [r for r in both if r["analysis"] == "ent"] == _counted_run({**SATURATING, "analyses": [entropy]})[0]


def test_shards_past_the_kept_samples_read_nothing():
    """In a sharded run, the shards that start past the kept samples neither read nor run anything,
    and the merged records equal the single-process run's."""
    from layerscope.api import prepare
    from layerscope.data.source import shard_spans
    from layerscope.engine.checkpoint_run import ShardWorker
    from layerscope.engine.lifecycle import Isolation, SequentialExecutor, drive
    from layerscope.engine.outcomes import finish_checkpoint

    plan = prepare(SATURATING)
    checkpoints = plan.checkpoints()
    spans = shard_spans(len(plan.order), plan.spec.data.batch_size, 4)  # 0–100, 100–200, 200–300, 300–400
    worker = ShardWorker(plan, checkpoints, spans, plan.order, plan.example())
    outcomes, states = [], {}

    def run_task(task):
        outcomes.append(worker.run(task))
        return outcomes[-1]

    drive(
        1,
        SequentialExecutor(run_task, 4),
        lambda label: Isolation(label, plan.host.origin_of),
        finished=states.__setitem__,
    )
    records = finish_checkpoint(plan, states[0], checkpoints[0]).records
    assert [outcome.fetches[0]["groups"] for outcome in outcomes] == [1, 0, 0, 0]  # no session past the first shard
    single, _ = _counted_run(SATURATING)
    assert [(r["layer"], r["metric"]) for r in records] == [(r["layer"], r["metric"]) for r in single]
    np.testing.assert_allclose([r["value"] for r in records], [r["value"] for r in single], rtol=0, atol=1e-9)


def _dense_affinity(x: np.ndarray, y: np.ndarray, method: str) -> float:
    """The d × d computation the subspace one replaces: covariances, Monge map, exact W2² (module docstring)."""
    from layerscope.plugins.nonlinearity_signature import maths

    x, y = maths.unit_scale(x, y)
    cov_x, cov_y = maths.covariance(x, method), maths.covariance(y, method)
    mapped = y.mean(axis=0) + (x - x.mean(axis=0)) @ maths.monge_map(cov_x, cov_y)
    return 1.0 - float(np.sqrt(maths.exact_w2_squared(mapped, y) / (2.0 * np.trace(cov_y))))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 40),
    extra=st.integers(1, 120),
    activation=st.sampled_from(["relu", "gelu", "tanh", "dead", "affine"]),
    method=st.sampled_from(["empirical", "ledoit_wolf"]),
    seed=st.integers(0, 2**16),
)
def test_fewer_samples_than_features_are_scored_in_their_subspace_as_densely(n, extra, activation, method, seed):
    """With 2n < d the score comes from k × k blocks in the samples' span (O(d·n²) instead of O(d³)): it
    equals the dense computation up to round-off, for every activation, both covariances, a dead layer."""
    from layerscope.plugins.nonlinearity_signature import maths

    d = 2 * n + extra
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + rng.standard_normal(d)
    y = {
        "relu": np.maximum(x, 0),
        "gelu": x * 0.5 * (1 + np.tanh(0.8 * x)),
        "tanh": np.tanh(x),
        "dead": np.zeros_like(x),
        "affine": 2.0 * x + 1.0,
    }[activation]
    score, degenerate = maths.affinity_score(x, y, method)
    assert score == pytest.approx(_dense_affinity(x, y, method), abs=1e-8)
    assert degenerate == (activation == "dead")
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    dense = np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    cka = np.linalg.norm(yc.T @ xc) ** 2 / dense if dense > 0 else 0.0
    assert maths.linear_cka(x, y) == pytest.approx(cka, rel=1e-9, abs=1e-12)


def test_ledoit_wolf_shrinkage_from_the_gram_matrix_equals_sklearn():
    from sklearn.covariance import ledoit_wolf_shrinkage

    from layerscope.plugins.nonlinearity_signature.maths import ledoit_wolf_shrinkage as from_gram

    rng = np.random.default_rng(3)
    for n, d in [(10, 5), (30, 300), (200, 40)]:
        x = rng.standard_normal((n, d)) * rng.random(d) + rng.standard_normal(d)
        assert from_gram(x) == pytest.approx(ledoit_wolf_shrinkage(x), rel=1e-10, abs=1e-15)
