"""Sharded runs: (checkpoint × data shard) tasks in worker processes and on Ray give the
single-process records; the driver's merge order does not matter."""

from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

import layerscope
from layerscope.data import iter_batches, shard_spans
from layerscope.errors import SpecError, UserError
from layerscope.testing import assert_records_close

ray = pytest.importorskip("ray", reason="the ray extra is part of the test install")

# Every built-in estimator on two epochs of the demo GAP CNN (it has activations, a
# global-average-pooling layer and an output), in one spec.
EVERY_ESTIMATOR = {
    "model": {"source": "demo:digits-gap", "checkpoints": ["epoch_02", "epoch_10"]},
    "data": {"source": "digits", "split": "train", "limit": 500, "batch_size": 100},
    "analyses": [
        {"id": "binary", "estimator": "activation_entropy"},
        {"id": "hist", "estimator": "activation_entropy", "params": {"variant": "histogram", "bins": 12}},
        {"id": "ip", "estimator": "information_plane", "params": {"sigma_grid": 30, "smoothing": 0.9}},
        {"id": "nls", "estimator": "nonlinearity_signature"},
        {"id": "md", "estimator": "mean_dimension", "params": {"pairs": 60, "features": "channels"}},
        {"id": "agg", "estimator": "aggregation_distribution", "params": {"bins": 20}}]}


@pytest.fixture(scope="module")
def single_process():
    return layerscope.run(EVERY_ESTIMATOR, write=False, progress=False)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU cluster shared by this module's Ray runs (a run keeps a cluster it did not start)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_shard_spans_cover_the_stream_in_whole_batches():
    for samples, batch, shards in itertools.product([1, 99, 100, 101, 1000, 1347], [1, 7, 100], [1, 2, 3, 8]):
        spans = shard_spans(samples, batch, shards)
        assert spans[0][0] == 0 and spans[-1][1] == samples
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(first % batch == 0 for first, _ in spans)
        sizes = [-(-(stop - first) // batch) for first, stop in spans]
        assert len(spans) == min(shards, -(-samples // batch)) and max(sizes) - min(sizes) <= 1


def test_a_shard_reads_the_look_ahead_past_its_end():
    from layerscope.plugins.data.synthetic import SyntheticSource

    source = SyntheticSource(SyntheticSource.Params(samples=10, shape=[2], classes=2), base_dir=None)
    order = np.arange(10)
    (first, *_), whole = shard_spans(10, 3, 2), list(iter_batches(source, order, 3, lookahead=2))
    shard = list(iter_batches(source, order, 3, lookahead=2, span=(0, 6)))
    assert [start for start, _, _ in shard] == [0, 3] and first == (0, 6)
    assert np.array_equal(shard[1][1], whole[1][1]) and len(shard[1][1]) == 5  # 3 samples + 2 of the next shard


def test_worker_processes_with_data_shards_give_the_single_process_records(single_process):
    spec = {**EVERY_ESTIMATOR, "runtime": {"workers": 2, "shards": 3}}
    parallel = layerscope.run(spec, write=False, progress=False, resume=True)
    assert [m["label"] for m in parallel.models] == ["epoch_02", "epoch_10"]
    assert any(w.startswith("--resume continues runs made in one process") for w in parallel.warnings)
    assert_records_close(parallel.records, single_process.records, rtol=0, atol=1e-9)


def test_ray_gives_the_local_records_for_every_builtin_estimator(single_process, ray_cluster):
    on_ray = layerscope.run({**EVERY_ESTIMATOR, "runtime": {"engine": "ray", "shards": 2}}, write=False,
                            progress=False)
    assert on_ray.runtime["engine"] == "ray"
    assert {r["estimator"] for r in on_ray.records} == {"activation_entropy", "information_plane",
                                                        "nonlinearity_signature", "mean_dimension",
                                                        "aggregation_distribution"}
    assert_records_close(on_ray.records, single_process.records, rtol=0, atol=1e-9)
    assert [m["sha256"] for m in on_ray.models] == [m["sha256"] for m in single_process.models]


def test_the_order_in_which_the_driver_merges_shards_does_not_change_records(single_process):
    """Shards of both checkpoints run in this process; the driver merges them in every order."""
    from layerscope.api import prepare
    from layerscope.data import sample_order
    from layerscope.progress import Progress
    from layerscope.sharding import ShardWorker, analyse_sharded

    plan = prepare(EVERY_ESTIMATOR)
    spec = plan.spec
    order = sample_order(len(plan.data), spec.data.limit, spec.data.shuffle, spec.runtime.seed)
    worker = ShardWorker(plan, order, plan.data.read(order[:2])[0])
    checkpoints = plan.adapter.checkpoints(spec.model, spec)
    for permutation in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]:
        def run_tasks(tasks, permutation=permutation):
            # each task travels as a copy, as to a worker process; three shards per checkpoint, in job order
            outcomes = [worker.run(pickle.loads(pickle.dumps(task))) for task in tasks]
            return [outcomes[3 * (i // 3) + permutation[i % 3]] for i in range(len(outcomes))]

        outcomes = analyse_sharded(plan, checkpoints, order, 3, run_tasks, Progress(0, enabled=False))
        records = [r for outcome in outcomes for r in outcome[0]]
        assert_records_close(records, single_process.records, rtol=0, atol=1e-9)


def test_a_user_error_in_a_ray_worker_ends_the_run_with_its_message(tmp_path, ray_cluster):
    x = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    x[33, 5] = np.nan  # in the second shard
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(40) % 10)
    spec = {"model": {"source": "demo:digits-mlp"}, "data": {"source": "npz", "path": str(tmp_path / "data.npz"),
                                                             "batch_size": 10, "shuffle": False},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}], "runtime": {"engine": "ray", "shards": 2}}
    with pytest.raises(UserError, match="sample 33 contains NaN or Inf"):
        layerscope.run(spec, write=False, progress=False)


def test_cuda_on_a_ray_cluster_without_gpus_is_a_user_error(ray_cluster):
    spec = {"model": {"source": "demo:digits-mlp"}, "data": {"source": "digits", "limit": 100},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}],
            "runtime": {"engine": "ray", "device": "cuda"}}
    with pytest.raises(UserError, match="runtime.device: cuda was requested but the Ray cluster has no GPUs"):
        layerscope.run(spec, write=False, progress=False)


def test_runtime_errors_name_the_key(monkeypatch):
    base = {"model": {"source": "demo:digits-mlp"}, "analyses": [{"id": "e", "estimator": "activation_entropy"}]}
    with pytest.raises(SpecError, match="runtime: address is only used with engine: ray"):
        layerscope.validate({**base, "runtime": {"address": "auto"}}, with_model=False)
    with pytest.raises(SpecError, match="runtime.shards"):
        layerscope.validate({**base, "runtime": {"shards": 0}}, with_model=False)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(SpecError, match=r'runtime.engine: the ray engine needs Ray: pip install "layerscope\[ray\]"'):
        layerscope.validate({**base, "runtime": {"engine": "ray"}}, with_model=False)


def test_cli_run_on_a_local_ray_cluster_and_a_cluster_that_is_not_there(tmp_path):
    """The command line starts (and stops) its own local cluster; an unreachable address exits 2."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {source: demo:digits-mlp, checkpoints: [epoch_01, epoch_02]}\n"
                    "data: {source: digits, limit: 200}\n"
                    "analyses: [{id: e, estimator: activation_entropy}]\n"
                    "runtime: {engine: ray, workers: 2}\n")
    done = subprocess.run([sys.executable, "-m", "layerscope", "run", str(spec), "--out", str(tmp_path / "out"),
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["runtime"]["engine"] == "ray" and [m["label"] for m in results["models"]] == ["epoch_01", "epoch_02"]

    spec.write_text(spec.read_text().replace("workers: 2", "address: '127.0.0.1:9'"))
    done = subprocess.run([sys.executable, "-m", "layerscope", "run", str(spec), "--out", str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "runtime.address: cannot join the Ray cluster at '127.0.0.1:9'" in done.stderr
    assert not (tmp_path / "bad" / "results.json").exists()


def test_cli_joins_an_existing_cluster_with_token_authentication(tmp_path):
    """`runtime.address` joins a head started with `ray start` (token authentication, Ray's default)."""
    import os
    import secrets
    import shutil
    import socket
    import tempfile
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # its own temp folder (short: it holds sockets), so no address file outlives it in /tmp/ray
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    head = subprocess.Popen(["ray", "start", "--head", "--block", "--num-cpus=2", f"--port={port}",
                             f"--temp-dir={temp_dir}", "--disable-usage-stats", "--include-dashboard=false"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        spec = tmp_path / "spec.yaml"
        spec.write_text("model: {source: demo:digits-mlp, checkpoints: [epoch_01, epoch_02]}\n"
                        "data: {source: digits, limit: 200}\n"
                        "analyses: [{id: e, estimator: activation_entropy}]\n"
                        f"runtime: {{engine: ray, address: '127.0.0.1:{port}'}}\n")
        done = subprocess.run([sys.executable, "-m", "layerscope", "run", str(spec), "--out", str(tmp_path / "out"),
                               "--quiet"], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        results = json.loads((tmp_path / "out" / "results.json").read_text())
        assert [m["label"] for m in results["models"]] == ["epoch_01", "epoch_02"] and results["records"]
    finally:
        head.terminate()
        head.wait(120)
        shutil.rmtree(temp_dir, ignore_errors=True)
