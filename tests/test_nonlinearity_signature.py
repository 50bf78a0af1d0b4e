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


def low_variance_batches(batch_size=50):
    """A small-scale ReLU with a dead unit and two rarely on (act: input variance ≈ 4e-5, where the constants
    move the score by 0.02) beside a unit-scale one (relu), as batches."""
    rng = np.random.default_rng(8)
    pre = (0.003 * rng.standard_normal((200, 4)) @ rng.standard_normal((4, 4))).astype(np.float32)
    post = np.maximum(pre - pre.std(axis=0) * np.array([0, 1, 1, 50], np.float32), 0)  # the last unit never on
    cpre = rng.standard_normal((200, 3, 2, 2)).astype(np.float32) * 2
    tensors = {"pre": pre, "post": post, "cpre": cpre, "cpost": np.maximum(cpre, 0)}
    return make_batches(tensors, batch_size=batch_size), pre.astype(np.float64), post.astype(np.float64)


@pytest.mark.parametrize("jitter", ["relative", "absolute"])
def test_jitter_setting_scores_and_names_the_scores_the_other_moves(jitter):
    """Each setting records its own formula's score (the reference's rho_aff for absolute), the input variance
    and the smallest covariance eigenvalue (here the jitter: a dead unit), and one warning names the activations
    whose score the other setting moves by more than 1e-3, with both scores."""
    batches, x, y = low_variance_batches()
    estimator = feed(build(samples=200, jitter=jitter), batches)
    got = {(r["layer"], r["metric"]): r["value"] for r in estimator.finalize()}
    scale = float(np.var(x, axis=0, ddof=1).mean())
    score = reference_rho_aff(x, y, unit_scaled=jitter == "relative")
    other = reference_rho_aff(x, y, unit_scaled=jitter == "absolute")
    assert got[("act", "affinity_score")] == pytest.approx(score, abs=1e-9)
    assert abs(score - other) > 0.01
    assert got[("act", "input_variance")] == pytest.approx(scale, rel=1e-9)
    assert got[("act", "min_eigenvalue")] == pytest.approx(1e-6 * (scale if jitter == "relative" else 1.0), rel=1e-6)
    moved = [w for w in estimator.collect_warnings() if "move by more than 0.001" in w]
    assert len(moved) == 1
    assert f"act {score:.4f} → {other:.4f}" in moved[0] and "relu" not in moved[0]
    assert f"jitter: {'absolute' if jitter == 'relative' else 'relative'} instead of {jitter}" in moved[0]


def test_the_other_jitter_over_batches_compares_the_means():
    batches, x, y = low_variance_batches()
    estimator = feed(build(samples=100, batches=2), batches)
    got = {(r["layer"], r["metric"]): r["value"] for r in estimator.finalize()}
    halves = [slice(0, 100), slice(100, 200)]
    assert got[("act", "affinity_score")] == pytest.approx(
        np.mean([reference_rho_aff(x[h], y[h], unit_scaled=True) for h in halves]), abs=1e-9
    )
    other = np.mean([reference_rho_aff(x[h], y[h]) for h in halves])
    assert any(f"→ {other:.4f}" in w for w in estimator.collect_warnings())


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


@pytest.mark.slow
def test_demo_cnn_with_absolute_jitter_gives_the_reference_codes_score():
    """The demo CNN's first ReLU on all 1797 digits: the reference code's rho_aff gave 0.8491 on these samples;
    the relative default gives 0.8264, named in the warning."""
    spec = {
        "model": {"source": "demo:digits-cnn"},
        "data": {"source": "digits", "split": "all", "batch_size": 512},
        "analyses": [
            {"id": "sig", "estimator": "nonlinearity_signature", "params": {"samples": 1797, "jitter": "absolute"}}
        ],
    }
    results = layerscope.run(spec, write=False, progress=False)
    relu1 = results.select(metric="affinity_score", layer="relu1")[0]
    assert relu1["samples"] == 1797 and relu1["value"] == pytest.approx(0.849, abs=5e-4)
    assert any("relu1 0.8491 → 0.8264" in w for w in results.warnings)


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


def reference_rho_aff(x: np.ndarray, y: np.ndarray, method: str = "empirical", unit_scaled: bool = False) -> float:
    """ρ_aff by the formula of the reference code's ``rho_aff`` (Bouniot et al.'s AffScoreDeep), written out
    independently in numpy float64, d × d: Σ = np.cov + 1e-6·I (or sklearn's LedoitWolf + 1e-6·I); A = 0 when
    tr Σ_y ≤ 2e-6·d, else A = R·pinv(sqrtm(R Σ_x R))·R with R = sqrtm(Σ_y), sqrtm from eigh with non-positive
    eigenvalues replaced by linspace(1e-7, 1e-6, k) (``torch_sqrtm``); T(x) = A(x − m_x) + m_y; W2² by POT's
    ``emd2`` on squared Euclidean costs (about the outputs' mean); 1 − √(W2² / (2 tr Σ_y)). *unit_scaled*:
    x and y first divided by the square root of x's mean variance (the ``relative`` setting)."""
    import ot
    from sklearn.covariance import LedoitWolf

    if unit_scaled and np.var(x, axis=0, ddof=1).mean() > 0:
        root = np.sqrt(np.var(x, axis=0, ddof=1).mean())
        x, y = x / root, y / root

    def cov(samples):
        base = LedoitWolf().fit(samples).covariance_ if method == "ledoit_wolf" else np.cov(samples, rowvar=False)
        return np.atleast_2d(base) + 1e-6 * np.eye(samples.shape[1])

    def sqrtm(matrix):
        values, vectors = np.linalg.eigh(matrix)
        positive = values > 0
        values = np.concatenate([np.linspace(1e-7, 1e-6, int((~positive).sum())), values[positive]])
        return vectors @ np.diag(np.sqrt(values)) @ vectors.T

    cov_x, cov_y = cov(x), cov(y)
    if np.trace(cov_y) > 2e-6 * cov_y.shape[0]:
        root_y = sqrtm(cov_y)
        a = root_y @ np.linalg.pinv(sqrtm(root_y @ cov_x @ root_y), rcond=1e-15) @ root_y
    else:
        a = np.zeros_like(cov_y)
    mapped = (a @ (x - x.mean(axis=0)).T).T + y.mean(axis=0)
    weights = np.full(len(x), 1.0 / len(x))
    centre = y.mean(axis=0)  # the reference's costs, about the outputs' mean: equal in exact arithmetic, but
    # without the cancellation of ‖a‖² + ‖b‖² − 2a·b, which the square root amplifies where W2 ≈ 0 (affine layers)
    cost = ot.emd2(weights, weights, ot.dist(mapped - centre, y - centre), numItermax=10_000_000)
    return 1.0 - float(np.sqrt(cost / (2.0 * np.trace(cov_y))))


def reference_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Inputs and outputs where the constants matter to different degrees: unit-scale and small-scale ReLUs with
    dead units, a large-scale tanh, rank-deficient inputs, a dead layer, and more features than samples."""
    rng = np.random.default_rng(11)
    mixed = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    dead = np.maximum(mixed - np.array([0, 0, 0, 0, 50.0, 50.0]), 0)  # two units never on
    low_rank = rng.standard_normal((300, 3)) @ rng.standard_normal((3, 8))
    wide = rng.standard_normal((30, 90)) @ rng.standard_normal((90, 90)) / 10
    return {
        "relu, unit scale": (mixed, np.maximum(mixed, 0)),
        "relu with dead units, scale 0.03": (0.03 * mixed, 0.03 * dead),
        "relu, scale 3e-3": (3e-3 * mixed, np.maximum(3e-3 * mixed, 0)),
        "tanh, scale 1e3": (1e3 * mixed, 1e3 * np.tanh(mixed)),
        "rank-deficient input, scale 0.01": (0.01 * low_rank, np.maximum(0.01 * low_rank, 0)),
        "dead layer": (mixed, np.zeros_like(mixed)),
        "more features than samples, scale 0.05": (0.05 * wide, np.maximum(0.05 * wide, 0)),
    }


@pytest.mark.parametrize("method", ["empirical", "ledoit_wolf"])
@pytest.mark.parametrize("case", list(reference_cases()))
def test_absolute_jitter_is_the_reference_formula_and_relative_is_it_at_unit_scale(case, method):
    """jitter: absolute reproduces the reference's rho_aff (the issue asks for 1e-4; it agrees to round-off), and
    the default relative setting is the same formula on unit-scaled samples."""
    from layerscope.plugins.nonlinearity_signature import maths

    x, y = reference_cases()[case]
    absolute = maths.affinity(x, y, method, jitter="absolute")
    relative = maths.affinity(x, y, method, jitter="relative")
    assert absolute.score == pytest.approx(reference_rho_aff(x, y, method), abs=1e-9)
    assert relative.score == pytest.approx(reference_rho_aff(x, y, method, unit_scaled=True), abs=1e-9)
    assert absolute.input_variance == relative.input_variance == pytest.approx(np.var(x, axis=0, ddof=1).mean())


@pytest.mark.parametrize("method", ["empirical", "ledoit_wolf"])
@pytest.mark.parametrize("jitter", ["relative", "absolute"])
@pytest.mark.parametrize("case", ["relu with dead units, scale 0.03", "tanh, scale 1e3"])
def test_min_eigenvalue_is_that_of_the_covariances_used(case, jitter, method):
    """The smallest eigenvalue of Σ_X and Σ_Y, jitter included, in the samples' units: with relative the jitter
    is 1e-6·s_x there, with absolute 1e-6; a dead unit makes it the jitter itself."""
    from sklearn.covariance import LedoitWolf

    from layerscope.plugins.nonlinearity_signature import maths

    x, y = reference_cases()[case]
    scale = np.var(x, axis=0, ddof=1).mean()
    jitter_value = 1e-6 * (scale if jitter == "relative" else 1.0)
    eigenvalues = []
    for samples in (x, y):
        cov = LedoitWolf().fit(samples).covariance_ if method == "ledoit_wolf" else np.cov(samples, rowvar=False)
        eigenvalues.append(np.linalg.eigvalsh(cov + jitter_value * np.eye(cov.shape[0]))[0])
    got = maths.affinity(x, y, method, jitter=jitter).min_eigenvalue
    assert got == pytest.approx(min(eigenvalues), rel=1e-6)
    if case.startswith("relu with dead") and method == "empirical":
        assert got == pytest.approx(jitter_value, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    log_scale=st.floats(-3, 3),
    activation=st.sampled_from(["relu", "dead relu", "tanh", "affine"]),
    n=st.integers(5, 60),
    d=st.integers(1, 12),
    jitter=st.sampled_from(["relative", "absolute"]),
    seed=st.integers(0, 2**16),
)
def test_a_skipped_check_of_the_other_jitter_is_within_its_tolerance(log_scale, activation, n, d, jitter, seed):
    """The movement bound is sound: when it skips the other setting's OT problem, that setting's exact score lies
    within the tolerance; when it does not, the score it computes is the other setting's."""
    from layerscope.plugins.nonlinearity_signature import maths

    rng = np.random.default_rng(seed)
    x = 10.0**log_scale * (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d))
    y = {
        "relu": np.maximum(x, 0),
        "dead relu": np.maximum(x - 10.0 ** (log_scale + 2), 0),
        "tanh": 10.0**log_scale * np.tanh(x / 10.0**log_scale),
        "affine": 3.0 * x - 1.0,
    }[activation]
    other = "absolute" if jitter == "relative" else "relative"
    checked = maths.affinity(x, y, jitter=jitter, within=1e-3)
    exact = maths.affinity(x, y, jitter=other).score
    if checked.other_score is None:
        assert abs(exact - checked.score) <= 1e-3 + 1e-9
    else:
        assert checked.other_score == pytest.approx(exact, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 40),
    extra=st.integers(1, 120),
    activation=st.sampled_from(["relu", "gelu", "tanh", "dead", "affine"]),
    method=st.sampled_from(["empirical", "ledoit_wolf"]),
    jitter=st.sampled_from(["relative", "absolute"]),
    log_scale=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_fewer_samples_than_features_are_scored_in_their_subspace_as_densely(
    n, extra, activation, method, jitter, log_scale, seed
):
    """With 2n < d the score comes from k × k blocks in the samples' span (O(d·n²) instead of O(d³)): it
    equals the dense computation (the reference formula) up to round-off, for every activation, both
    covariances, both jitter settings at any scale, a dead layer."""
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
    x, y = 10.0**log_scale * x, 10.0**log_scale * y
    score, degenerate = maths.affinity_score(x, y, method, jitter=jitter)
    reference = reference_rho_aff(x, y, method, unit_scaled=jitter == "relative")
    # equal to 1e-8, or to the dense d × d reference's own round-off, 1e-15 × the condition number of the
    # jittered input covariance it inverts (absolute jitter on samples of variance 100 gives 7e8: 3e-8 on ρ),
    # or as W2² / (2 tr Σ_y) = (1 − ρ)² to 1e-12: near ρ = 1 (affine layers) the square root turns that
    # round-off into 3e-8 on ρ
    scale = maths.input_variance(x)
    unit = x / np.sqrt(scale) - (x / np.sqrt(scale)).mean(axis=0)
    largest = np.linalg.eigvalsh(unit.T @ unit / (n - 1))[-1]
    condition = 1 + largest / (maths.JITTER * maths.constants_unit(jitter, scale))
    tolerance = max(1e-8, 1e-15 * condition)
    assert abs(score - reference) <= tolerance or (1 - score) ** 2 == pytest.approx((1 - reference) ** 2, abs=1e-12)
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


def test_outputs_far_from_the_origin_keep_an_affine_layer_at_one():
    """MobileNetV3-small's disagreement with straightforward hooks (up to 0.23 on its squeeze-excite
    Hardsigmoids): at unit input scale those outputs sit 7.5e7 from the origin with a spread of 0.62, and
    squared distances computed as ‖a‖² + ‖b‖² − 2a·b lost every digit. An affine layer there (Hardsigmoid's
    linear range, inputs varying 1e-7 around 0.3) must score 1 up to the jitter; uncentred costs gave 0.952."""
    rng = np.random.default_rng(0)
    x = 0.3 + 1e-7 * rng.standard_normal((128, 24)) @ rng.standard_normal((24, 24))
    score, _ = affinity_score(x, np.clip(x / 6 + 0.5, 0, 1))
    assert score == pytest.approx(1.0, abs=1e-4)


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-1e6, 1e6), seed=st.integers(0, 2**16))
def test_the_score_ignores_where_the_outputs_lie(shift, seed):
    """ρ_aff is unchanged by a constant added to the outputs (W2 and the covariances are translation
    invariant), however far that moves them from the origin compared with their spread."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 8))
    y = np.tanh(x @ rng.standard_normal((8, 8)))
    assert affinity_score(x, y + shift)[0] == pytest.approx(affinity_score(x, y)[0], abs=1e-6)


def test_inputs_that_vary_at_float32_round_off_only_are_named(tmp_path):
    """An activation whose inputs differ between samples by a few float32 steps (MobileNetV3-small's deep
    Hardswish inputs, spatially averaged over random images: 3e-7 of their magnitude) gets a score of
    round-off: it is named in a warning, and an input with a real spread is not."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Relu", ["x"], ["flat"], name="flat"),
        helper.make_node("Tanh", ["x"], ["wide"], name="wide"),
    ]
    graph = helper.make_graph(
        nodes,
        "round-off",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", 8]) for n in ("flat", "wide")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path / "m.onnx")
    near = (1.0 + rng.integers(-3, 4, (64, 8)) * np.spacing(np.float32(1.0))).astype(np.float32)
    spec = {
        "model": {"source": str(tmp_path / "m.onnx")},
        "data": {"source": "npz", "path": str(tmp_path / "d.npz"), "batch_size": 64},
        "analyses": [{"id": "s", "estimator": "nonlinearity_signature", "params": {"samples": 64}}],
    }
    np.savez(tmp_path / "d.npz", x=near, y=np.zeros(64, np.int64))
    warned = [w for w in layerscope.run(spec, write=False, progress=False).warnings if "round-off" in w]
    assert len(warned) == 1 and "flat (2e-07)" in warned[0] and "wide" in warned[0]
    np.savez(tmp_path / "d.npz", x=near + rng.standard_normal((64, 8)).astype(np.float32), y=np.zeros(64, np.int64))
    assert not [w for w in layerscope.run(spec, write=False, progress=False).warnings if "round-off" in w]
