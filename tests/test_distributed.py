"""Sharded runs on Ray: (checkpoint × data shard) tasks run by Ray actors give the single-process
records; clusters started for a run, joined, or unreachable. Ray is imported by the ``ray`` fixture, not
when the module is collected."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import layerscope
from layerscope.testing import assert_records_close
from layerscope.util.errors import UserError

from .test_engines import EVERY_ESTIMATOR
from .waiting import wait_until

pytestmark = pytest.mark.slow  # every test starts or joins a Ray cluster


@pytest.fixture(scope="module", autouse=True)
def ray():
    """The ``ray`` module; every test here is skipped without it."""
    return pytest.importorskip("ray", reason="the ray extra is part of the test install")


@pytest.fixture(scope="module")
def single_process():
    return layerscope.run(EVERY_ESTIMATOR, write=False, progress=False)


@pytest.fixture(scope="module")
def ray_cluster(ray):
    """A local 2-CPU cluster shared by this module's Ray runs (a run keeps a cluster it did not start)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_gives_the_local_records_for_every_builtin_estimator(single_process, ray_cluster):
    on_ray = layerscope.run({**EVERY_ESTIMATOR, "runtime": {"engine": "ray", "shards": 2}}, write=False, progress=False)
    assert on_ray.runtime["engine"] == "ray"
    assert {r["estimator"] for r in on_ray.records} == {
        "activation_entropy",
        "information_plane",
        "nonlinearity_signature",
        "mean_dimension",
        "aggregation_distribution",
    }
    assert_records_close(on_ray.records, single_process.records, rtol=0, atol=1e-9)
    assert [m["sha256"] for m in on_ray.models] == [m["sha256"] for m in single_process.models]


def test_a_user_error_in_a_ray_worker_ends_the_run_with_its_message(tmp_path, ray_cluster):
    x = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    x[33, 5] = np.nan  # in the second shard
    np.savez(tmp_path / "data.npz", x=x, y=np.arange(40) % 10)
    spec = {
        "model": {"source": "demo:digits-mlp"},
        "data": {"source": "npz", "path": str(tmp_path / "data.npz"), "batch_size": 10, "shuffle": False},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
        "runtime": {"engine": "ray", "shards": 2},
    }
    with pytest.raises(UserError, match="sample 33 contains NaN or Inf"):
        layerscope.run(spec, write=False, progress=False)


def test_cuda_on_a_ray_cluster_without_gpus_is_a_user_error(ray_cluster):
    spec = {
        "model": {"source": "demo:digits-mlp"},
        "data": {"source": "digits", "limit": 100},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
        "runtime": {"engine": "ray", "device": "cuda"},
    }
    with pytest.raises(UserError, match="runtime.device: cuda was requested but the Ray cluster has no GPUs"):
        layerscope.run(spec, write=False, progress=False)


def test_cli_run_on_a_local_ray_cluster_and_a_cluster_that_is_not_there(tmp_path):
    """The command line starts (and stops) its own local cluster; an unreachable address exits 2."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {source: demo:digits-mlp, checkpoints: [epoch_01, epoch_02]}\n"
        "data: {source: digits, limit: 200}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n"
        "runtime: {engine: ray, workers: 2}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "layerscope", "run", str(spec), "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["runtime"]["engine"] == "ray" and [m["label"] for m in results["models"]] == ["epoch_01", "epoch_02"]

    spec.write_text(spec.read_text().replace("workers: 2", "address: '127.0.0.1:9'"))
    done = subprocess.run(
        [sys.executable, "-m", "layerscope", "run", str(spec), "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=300,
    )
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

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # its own temp folder (short: it holds sockets), so no address file outlives it in /tmp/ray
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    head = subprocess.Popen(
        [
            sys.executable,  # Ray's command line, found without PATH (the `ray` script need not be on it)
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            "--include-dashboard=false",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def head_listens() -> bool:
        assert head.poll() is None, f"ray start --head exited with {head.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    try:
        wait_until(head_listens, timeout=180, interval=0.5, what=f"the Ray head to listen on port {port}")
        spec = tmp_path / "spec.yaml"
        spec.write_text(
            "model: {source: demo:digits-mlp, checkpoints: [epoch_01, epoch_02]}\n"
            "data: {source: digits, limit: 200}\n"
            "analyses: [{id: e, estimator: activation_entropy}]\n"
            f"runtime: {{engine: ray, address: '127.0.0.1:{port}'}}\n"
        )
        done = subprocess.run(
            [sys.executable, "-m", "layerscope", "run", str(spec), "--out", str(tmp_path / "out"), "--quiet"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        results = json.loads((tmp_path / "out" / "results.json").read_text())
        assert [m["label"] for m in results["models"]] == ["epoch_01", "epoch_02"] and results["records"]
    finally:
        head.terminate()
        head.wait(120)
        shutil.rmtree(temp_dir, ignore_errors=True)
