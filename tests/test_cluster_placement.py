"""Where a Ray run puts its work and which files its workers need, checked without a cluster: the actors
placed on a cluster's nodes (``ray.nodes()`` entries as Ray reports them), the files a spec names, and the
message of a worker that lacks one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from layerscope.api import prepare
from layerscope.engine.inputs import Relocation, check_present, named_files
from layerscope.engine.ray_engine import Placement, placements
from layerscope.testing.models import tiny_mlp
from layerscope.util.errors import InfrastructureError, UserError


def _node(node_id: str, cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    resources = {"CPU": cpus, "memory": 8e9, **({"GPU": gpus} if gpus else {})}
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


def _plan(tmp_path, **runtime):
    onnx.save(tiny_mlp(), tmp_path / "model.onnx")
    x = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(20) % 10)
    return prepare(
        {
            "model": {"source": str(tmp_path / "model.onnx")},
            "data": {"source": "npz", "path": str(tmp_path / "data.npz"), "batch_size": 10},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}],
            "runtime": {"engine": "ray", **runtime},
        }
    )


def test_one_actor_per_node_claims_the_node_s_cpus_and_dead_or_cpu_less_nodes_get_none(tmp_path):
    nodes = [_node("a", 8), _node("b", 4), _node("c", 16, alive=False), _node("d", 0)]
    assert placements(_plan(tmp_path), nodes, []) == [Placement(8, 0, "a"), Placement(4, 0, "b")]


@pytest.mark.parametrize(
    ("device", "expected"), [("auto", [Placement(8, 1, "g")] * 2), ("cpu", [Placement(16, 0, "g")])]
)
def test_a_gpu_node_gets_one_actor_per_gpu_sharing_its_cpus(tmp_path, device, expected):
    assert placements(_plan(tmp_path, device=device), [_node("g", 16, gpus=2)], []) == expected


def test_workers_asks_for_that_many_actors_with_equal_shares_capped_by_the_cpus(tmp_path):
    nodes = [_node("a", 8), _node("b", 4)]
    assert placements(_plan(tmp_path, workers=3), nodes, []) == [Placement(4)] * 3
    warnings: list[str] = []
    assert placements(_plan(tmp_path, workers=20), nodes, warnings) == [Placement(1)] * 12
    assert warnings == ["runtime.workers is 20 but the Ray cluster has 12 CPUs; 12 actors ran the tasks"]


def test_a_worker_without_the_spec_s_files_fails_naming_the_first_it_lacks(tmp_path):
    plan = _plan(tmp_path)
    files = named_files(plan, plan.checkpoints())
    assert [(f.key, f.path) for f in files] == [
        ("model.source", str(tmp_path / "model.onnx")),
        ("data.path", str(tmp_path / "data.npz")),
    ]
    check_present(files, "10.0.0.7")  # this machine has them
    elsewhere = Relocation(tmp_path / "other-node", set())  # a node where none of them lies
    with pytest.raises(UserError) as raised:
        check_present(files, "10.0.0.7", elsewhere)
    assert str(raised.value) == (
        f"model.source: {tmp_path / 'model.onnx'} is not on the Ray node 10.0.0.7; the nodes of a cluster read "
        "the spec's files at the same paths (a shared filesystem, or copies at the same place), or set "
        "runtime.ship: true to send them with the run"
    )


def test_shipped_files_are_read_from_the_worker_s_copies_and_named_as_the_originals(tmp_path):
    copies = tmp_path / "copies"
    relocation = Relocation(copies, {str(tmp_path / "model.onnx"), str(tmp_path / "data" / "x.npz")})
    spec = {"model": {"source": str(tmp_path / "model.onnx")}, "data": {"path": str(tmp_path / "data")}, "k": "x"}
    assert relocation.value(spec) == {
        "model": {"source": f"{copies}{tmp_path}/model.onnx"},
        "data": {"path": f"{copies}{tmp_path}/data"},  # a folder holding a shipped file
        "k": "x",
    }
    assert relocation.strip(f"cannot read {copies}{tmp_path}/model.onnx") == f"cannot read {tmp_path}/model.onnx"


def test_a_run_waits_for_its_first_workers_however_long_but_not_for_replacements():
    """A busy machine took over 60 s to start a run's first actors, which ended the run as if the cluster had no
    room; only a run that has lost its actors gives up on new ones after STARVED_SECONDS."""
    import time

    from layerscope.engine.ray_engine import STARVED_SECONDS, RayExecutor

    executor = RayExecutor.__new__(RayExecutor)  # its state only: no cluster
    executor.actors, executor.starting, executor.last_loss = [], {"ready": "an actor starting"}, "no worker was lost"
    executor.lost_one, executor.starved_since = False, time.monotonic() - 2 * STARVED_SECONDS
    executor._check_starved()
    executor.lost_one, executor.starved_since = True, time.monotonic() - 2 * STARVED_SECONDS
    with pytest.raises(InfrastructureError, match="no Ray worker could start for 60 s after the last was lost"):
        executor._check_starved()


def test_a_checkpoint_file_a_worker_lacks_is_named_at_the_checkpoints_key(tmp_path):
    """Checkpoints found by a glob were named "checkpoint ep_02", which the spec has no key for: the message
    had no file:line:col. They are named at ``model.checkpoints``."""
    for epoch in (1, 2):
        onnx.save(tiny_mlp(), tmp_path / f"ep_{epoch:02d}.onnx")
    plan = _plan(tmp_path)
    plan = prepare(
        {**plan.doc.data, "model": {"source": str(tmp_path / "ep_01.onnx"), "checkpoints": str(tmp_path / "ep_*.onnx")}}
    )
    files = named_files(plan, plan.checkpoints())
    assert [(f.key, f.path) for f in files] == [
        ("model.source", str(tmp_path / "ep_01.onnx")),
        ("data.path", str(tmp_path / "data.npz")),
        ("model.checkpoints", str(tmp_path / "ep_02.onnx")),
    ]
