"""Fetch groups under the memory budget give the same numbers as one big fetch."""

from __future__ import annotations

import math

import pytest

import layerscope
from layerscope.errors import UserError
from layerscope.runner import plan_groups
from layerscope.testing import assert_records_close


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


def quickstart(budget: str, limit: int = 300):
    spec = {"model": {"source": "demo:digits-cnn"}, "data": {"source": "digits", "limit": limit, "batch_size": 100},
            "analyses": [{"id": "bin", "estimator": "activation_entropy", "on": "all"},
                         {"id": "hist", "estimator": "activation_entropy", "params": {"variant": "histogram"}}],
            "runtime": {"memory_budget": budget}}
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
    spec = {"model": {"source": path},
            "data": {"source": "synthetic", "samples": 3, "shape": [3, 224, 224], "classes": 2, "batch_size": 3},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}]}
    unbounded = layerscope.run({**spec, "runtime": {"memory_budget": "1GiB"}}, write=False, progress=False)
    budget = 16 * 2**20  # one sample's 121 Relu outputs are 62.7 MB
    bounded = layerscope.run({**spec, "runtime": {"memory_budget": budget}}, write=False, progress=False)
    assert bounded.models[0]["peak_fetched_bytes"] <= budget < unbounded.models[0]["peak_fetched_bytes"]
    assert bounded.models[0]["fetch_groups"][0] > 3
    assert len({r["layer"] for r in bounded.records}) == 121
    assert_records_close(bounded.records, unbounded.records, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet50", "vgg19", "inception_v1", "inception_v2"])
def test_real_architectures_are_inspected_and_run_within_the_budget(name, capsys, tmp_path):
    """The graphs the onnx package ships: `layerscope inspect` lists them, and `layerscope run`
    analyses every activation output with 16 MiB of fetched tensors held at most (several
    fetch groups, which the summary reports, where one sample's activations exceed it)."""
    import json
    import os

    import onnx

    from layerscope.cli import main

    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", f"light_{name}.onnx")
    assert main(["inspect", path, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["tensors"]
    budget = 16 * 2**20
    spec = {"model": {"source": path}, "runtime": {"memory_budget": budget},
            "data": {"source": "synthetic", "samples": 1, "shape": [3, 224, 224], "classes": 2, "batch_size": 1},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}]}
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
