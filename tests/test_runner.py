"""Fetch groups under the memory budget give the same numbers as one big fetch."""

from __future__ import annotations

import math

import pytest
import torch

import layerscope
from layerscope.engine.runner import connected_units, plan_groups
from layerscope.testing import assert_records_close
from layerscope.util.errors import UserError

from .conftest import blas_threads


def test_plan_groups_packs_in_order():
    sizes = {"a": 10, "b": 10, "c": 30, "d": 5}
    groups = plan_groups([("a",), ("b",), ("c",), ("d",)], sizes, batch_size=2, budget=60, splittable=set())
    assert [g.names for g in groups] == [["a", "b"], ["c"], ["d"]]
    assert all(g.micro_batch is None for g in groups)
    assert [g.names for g in plan_groups([("a",), ("b",)], sizes, 2, 40, set())] == [["a", "b"]]


def test_plan_groups_prefers_micro_batches_of_everything_when_allowed():
    sizes = {"a": 10, "b": 10, "c": 30}
    groups = plan_groups([("a",), ("b",), ("c",)], sizes, batch_size=100, budget=1000, splittable={"a", "b", "c"})
    assert [(g.names, g.micro_batch) for g in groups] == [(["a", "b", "c"], 20)]


def test_plan_groups_keeps_atomic_groups_together_and_splits_large_ones():
    sizes = {"x": 8, "y": 8, "big": 100}  # x and y belong to a per-batch estimator: no micro-batches for them
    groups = plan_groups([("x", "y"), ("big",)], sizes, batch_size=10, budget=400, splittable={"big"})
    assert [g.names for g in groups] == [["x", "y"], ["big"]]
    assert groups[1].micro_batch == 4
    with pytest.raises(UserError, match="memory_budget"):
        plan_groups([("big",)], sizes, batch_size=10, budget=400, splittable=set())


def test_overlapping_units_are_joined_so_a_pair_never_straddles_two_groups():
    units = [("relu",), ("relu_1",), ("conv", "relu"), ("conv_1", "relu_1"), ("gap",), ("relu", "conv")]
    assert connected_units(units) == [("relu", "conv"), ("relu_1", "conv_1"), ("gap",)]
    assert connected_units([("a", "b"), ("c", "d"), ("b", "c")]) == [("a", "b", "c", "d")]
    sizes = {"relu": 10, "relu_1": 10, "conv": 10, "conv_1": 10, "gap": 1}
    groups = plan_groups(connected_units(units), sizes, batch_size=1, budget=25, splittable=set())
    assert [g.names for g in groups] == [["relu", "conv"], ["relu_1", "conv_1", "gap"]]


def quickstart(budget: str, limit: int = 300):
    spec = {
        "model": {"source": "demo:digits-cnn"},
        "data": {"source": "digits", "limit": limit, "batch_size": 100},
        "analyses": [
            {"id": "bin", "estimator": "activation_entropy", "on": "all"},
            {"id": "hist", "estimator": "activation_entropy", "params": {"variant": "histogram"}},
        ],
        "runtime": {"memory_budget": budget},
    }
    return layerscope.run(spec, write=False, progress=False)


def test_budget_groups_and_micro_batches_match_unbounded_run():
    unbounded = quickstart("1GiB")
    assert unbounded.models[0]["fetch_groups"] == [1, 1]
    # one batch of every tensor is ~1.4 MiB; 40 KiB forces micro-batches of 2 samples
    bounded = quickstart("40KiB")
    assert bounded.models[0]["fetch_groups"] == [1, 1]
    assert bounded.models[0]["passes"] == 2
    assert_records_close(bounded.records, unbounded.records, rtol=1e-12, atol=1e-12)


def test_results_are_deterministic_for_a_seed():
    first, second = quickstart("1GiB", 200), quickstart("1GiB", 200)
    assert first.records == second.records


def test_densenet121_within_the_memory_budget():
    """The real densenet121 graph the onnx package ships (1,746 nodes, fixed batch 1): every Relu output,
    fetched under a budget smaller than one sample's activations, gives the unbounded run's records."""
    import os

    import onnx

    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_densenet121.onnx")
    spec = {
        "model": {"source": path},
        "data": {"source": "synthetic", "samples": 3, "shape": [3, 224, 224], "classes": 2, "batch_size": 3},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
    }
    unbounded = layerscope.run({**spec, "runtime": {"memory_budget": "1GiB"}}, write=False, progress=False)
    budget = 16 * 2**20  # one sample's 121 Relu outputs are 62.7 MB
    bounded = layerscope.run({**spec, "runtime": {"memory_budget": budget}}, write=False, progress=False)
    assert bounded.models[0]["peak_fetched_bytes"] <= budget < unbounded.models[0]["peak_fetched_bytes"]
    assert bounded.models[0]["fetch_groups"][0] > 3
    assert len({r["layer"] for r in bounded.records}) == 121
    assert_records_close(bounded.records, unbounded.records, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "vgg19", "inception_v1", "inception_v2"])
def test_real_architectures_are_inspected_and_run_within_the_budget(name, capsys, tmp_path):
    """The graphs the onnx package ships: `layerscope inspect` lists them, and `layerscope run`
    analyses every activation output with 16 MiB of fetched tensors held at most (several
    fetch groups, which the summary reports, where one sample's activations exceed it)."""
    import json
    import os

    import onnx

    from layerscope.cli.main import main

    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{name}.onnx")
    assert main(["inspect", path, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["tensors"]
    budget = 16 * 2**20
    spec = {
        "model": {"source": path},
        "runtime": {"memory_budget": budget},
        "data": {"source": "synthetic", "samples": 1, "shape": [3, 224, 224], "classes": 2, "batch_size": 1},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))  # JSON is YAML
    assert main(["run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out")]) == 0
    model = json.loads((tmp_path / "out" / "results.json").read_text())["models"][0]
    activations = [t for t in listed if t["observable"] and t["op_type"] == "Relu"]
    assert len(model["tensors"]) == len(activations) > 0
    assert 0 < model["peak_fetched_bytes"] <= budget
    one_sample = sum(4 * math.prod(t["shape"][1:]) for t in activations)
    assert model["fetch_groups"][0] >= one_sample // budget + (one_sample > budget)
    summary = capsys.readouterr().out
    assert (f"fetched in up to {model['fetch_groups'][0]} groups" in summary) == (model["fetch_groups"][0] > 1)


# --- every budget gives the unbounded run's records (issue: an activation's output packed apart from its input) ---

COMBINATIONS = {
    "entropy+signature+plane": ["activation_entropy", "nonlinearity_signature", "information_plane"],
    "signature+entropy": ["nonlinearity_signature", "activation_entropy"],
    "plane+histogram+signature": ["information_plane", "histogram", "nonlinearity_signature"],
}
ANALYSES = {
    "activation_entropy": {"id": "ent", "estimator": "activation_entropy"},
    "histogram": {"id": "hist", "estimator": "activation_entropy", "params": {"variant": "histogram"}},
    "nonlinearity_signature": {"id": "sig", "estimator": "nonlinearity_signature", "params": {"samples": 100}},
    "information_plane": {"id": "ip", "estimator": "information_plane", "params": {"batch_size": 50, "sigma_grid": 20}},
}


def run_with_budget(names: list[str], budget: int):
    spec = {
        "model": {"source": "demo:digits-cnn"},
        "data": {"source": "digits", "limit": 100, "batch_size": 50},
        "analyses": [ANALYSES[name] for name in names],
        "runtime": {"memory_budget": budget},
    }
    return layerscope.run(spec, write=False, progress=False)


def smallest_legal_budget(names: list[str], low: int, high: int) -> int:
    """Bisect the smallest budget (to 1 KiB) the run accepts; below it planning refuses the run."""
    while high - low > 1024:
        middle = (low + high) // 2
        try:
            run_with_budget(names, middle)
            high = middle
        except UserError as error:
            assert "memory_budget" in str(error)
            low = middle
    return high


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_every_budget_gives_the_unbounded_records(combination):
    names = COMBINATIONS[combination]
    unbounded = run_with_budget(names, 2**30)
    assert unbounded.models[0]["fetch_groups"][0] == 1 and not unbounded.failures
    assert {r["analysis"] for r in unbounded.records} == {ANALYSES[n]["id"] for n in names}
    floor = smallest_legal_budget(names, 1024, 2**20)
    budgets = [floor, *(int(floor * 2 ** (k / 2)) for k in range(1, 6))]
    groups = set()
    for budget in budgets:
        bounded = run_with_budget(names, budget)
        assert not bounded.failures, (budget, bounded.failures)
        assert bounded.models[0]["peak_fetched_bytes"] <= budget
        assert_records_close(bounded.records, unbounded.records, rtol=0, atol=1e-9)
        groups.add(max(bounded.models[0]["fetch_groups"]))
    assert len(groups) >= 2 and max(groups) > 1, groups  # the budgets force several fetch groups


def test_a_run_puts_torch_and_blas_on_one_thread_and_restores_them():
    """Estimator maths runs on one torch thread and one BLAS thread during a run (the signature's
    eigendecompositions were 13-37x slower on BLAS's own threads on a busy 2-core machine)."""
    from layerscope.engine.threads import _blas_libraries, run_threads

    _blas_libraries.cache_clear()  # the libraries are found on first use: every one loaded by now

    before, torch_before = blas_threads(), torch.get_num_threads()
    with run_threads():
        assert set(blas_threads().values()) == {1} and torch.get_num_threads() == 1
    assert blas_threads() == before and torch.get_num_threads() == torch_before
