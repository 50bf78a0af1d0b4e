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


# --- a cluster of two nodes on this machine: a node lost, the head lost, files not shared ----------------
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # Ray's command line, found without PATH
MARK = "LAYERSCOPE_TEST_RUN"  # set in a run's environment to find the processes it leaves


def _hides_folders() -> list[str] | None:
    """The command that runs a program in a mount namespace of its own with an empty folder over "$0" (so a
    Ray node started with it lacks that folder's files), or None where mount namespaces are not allowed."""
    import os
    import shutil
    import tempfile

    if shutil.which("unshare") is None:
        return None
    command = ["unshare", "--mount", *(["--map-root-user"] if os.geteuid() else [])]
    command += ["sh", "-c", 'mount -t tmpfs tmpfs "$0" && shift && exec "$0" "$@"']
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run([*command, folder, "true"], capture_output=True)
    return command if probe.returncode == 0 else None


def _start_node(arguments: list[str], env: dict, log, hide: tuple[list[str], str] | None = None) -> subprocess.Popen:
    """`ray start --block` with *arguments*, its output in the file *log*; with *hide* (the command of
    :func:`_hides_folders`, a folder) the node does not see that folder's files."""
    command = [*RAY, "start", "--block", "--disable-usage-stats", *arguments]
    if hide is not None:
        command = [*hide[0], hide[1], *command]
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _two_node_inputs(folder) -> None:
    """Ten checkpoints of the demo MLP as ONNX files and the digits training split as an npz, in *folder*."""
    import shutil

    from layerscope.adapters.demo_zoo import ensure_trained
    from layerscope.plugins.data.digits import load_digits_split

    (folder / "ckpt").mkdir(parents=True)
    for model in sorted(ensure_trained("digits-mlp").glob("epoch_*.onnx")):
        shutil.copy(model, folder / "ckpt" / model.name)
    x, y = load_digits_split("train")
    np.savez(folder / "digits.npz", x=x, y=y)


def _spec(folder, name: str, runtime: str) -> str:
    """A spec named *name* in *folder*: information planes of the checkpoints in ckpt/ on digits.npz."""
    path = folder / f"{name}.yaml"
    path.write_text(
        "name: two-nodes\n"
        "model: {source: ckpt/epoch_01.onnx, checkpoints: 'ckpt/epoch_*.onnx'}\n"
        "data: {source: npz, path: digits.npz, batch_size: 100}\n"
        "analyses: [{id: ip, estimator: information_plane, params: {alpha: 1.01, sigma: alignment, batch_size: 100}}]\n"
        f"runtime: {runtime}\n"
    )
    return str(path)


def _run(spec: str, out, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "layerscope", "run", spec, "--out", str(out), "--quiet", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _records(out) -> list[dict]:
    return json.loads((out / "results.json").read_text())["records"]


def _saved(out) -> list:
    return sorted((out / ".layerscope-resume").glob("checkpoint-*.pt"))


def test_a_two_node_cluster_survives_a_lost_node_and_a_lost_head_ends_the_run_cleanly(tmp_path):
    """Two `ray start` on this machine, the second node in a mount namespace where the run's files are
    missing: a run needs `runtime.ship` there; a run loses that node part-way and still gives the records of
    a run in one process; a run that loses the head exits 3 naming it, having saved the checkpoints it
    finished, and `--resume` (on this machine) completes it with the same records."""
    import os
    import secrets
    import shutil
    import socket
    import tempfile

    from .processes import command_line, descendants, kill_tree, marked

    inputs = tmp_path / "inputs"
    _two_node_inputs(inputs)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # the head declares a node dead after 3 missed checks 0.5 s apart (default: 5 missed 3 s apart)
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_failure_threshold": "3",
    }
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: it holds sockets
    hide = _hides_folders()
    head = _start_node(
        ["--head", "--num-cpus=1", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false"],
        env,
        tmp_path / "head.log",
    )
    worker = None
    try:
        wait_until(
            lambda: "Ray runtime started" in (tmp_path / "head.log").read_text(), timeout=180, what="the Ray head"
        )
        worker = _start_node(
            [f"--address=127.0.0.1:{port}", "--num-cpus=1"],
            env,
            tmp_path / "worker.log",
            (hide, str(inputs)) if hide else None,
        )
        wait_until(
            lambda: "Ray runtime started" in (tmp_path / "worker.log").read_text(),
            timeout=180,
            what="the second Ray node",
        )
        cluster = f"{{engine: ray, address: '127.0.0.1:{port}'"
        local = tmp_path / "local"
        assert _run(_spec(inputs, "local", "{seed: 0}"), local, env).wait(300) == 0

        if hide:  # the second node lacks the files: named, exit 2
            failed = _run(_spec(inputs, "unshared", cluster + "}"), tmp_path / "unshared", env)
            _, err = failed.communicate(timeout=300)
            assert failed.returncode == 2 and "Traceback" not in err, err
            assert "is not on the Ray node" in err and str(inputs / "ckpt" / "epoch_01.onnx") in err, err

        # the second node is lost while it runs a task: its tasks run again on the head's worker
        run = _run(_spec(inputs, "shipped", cluster + ", ship: true}"), tmp_path / "lost-node", env)
        wait_until(
            lambda: (
                run.poll() is not None
                or any(command_line(pid).startswith("ray::_ShardActor.run") for pid in descendants(worker.pid))
            ),
            timeout=300,
            what="a task on the second node",
        )
        assert run.poll() is None, run.communicate()
        kill_tree(worker)
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        warnings = json.loads((tmp_path / "lost-node" / "results.json").read_text())["warnings"]
        assert any("a Ray worker on node" in w and "was lost" in w for w in warnings), warnings
        assert_records_close(_records(tmp_path / "lost-node"), _records(local), rtol=0, atol=1e-9)

        # the head is lost part-way: exit 3 naming it, checkpoints saved, nothing of the run left running
        mark = secrets.token_hex(8)
        run = _run(_spec(inputs, "shipped", cluster + ", ship: true}"), tmp_path / "lost-head", {**env, MARK: mark})
        wait_until(lambda: _saved(tmp_path / "lost-head") or run.poll() is not None, timeout=300, what="a checkpoint")
        assert run.poll() is None, run.communicate()
        kill_tree(head)
        _, err = run.communicate(timeout=120)
        assert run.returncode == 3 and "Traceback" not in err, err
        assert "layerscope: infrastructure failure: runtime.engine: lost the Ray cluster: its head at" in err, err
        assert not (tmp_path / "lost-head" / "results.json").exists() and _saved(tmp_path / "lost-head")
        assert not marked(MARK, mark)
        resumed = _run(_spec(inputs, "local", "{seed: 0}"), tmp_path / "lost-head", env, "--resume")
        assert resumed.wait(300) == 0, resumed.communicate()
        assert_records_close(_records(tmp_path / "lost-head"), _records(local), rtol=0, atol=1e-9)
    finally:
        for node in (worker, head):
            if node is not None and node.poll() is None:
                kill_tree(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.parametrize("ending", ["raylet killed", "interrupted", "supervisor killed"])
def test_a_ray_run_ended_from_outside_says_why_and_leaves_no_process(tmp_path, ending):
    """Ray ends a driver whose raylet stops at once, from C++: the run exited 1 with no message of its own.
    Ctrl-C, which also reached Ray's processes, exited 1 in 2 of 6 tries, and Ray's agents outlived a killed
    run. The run's process now watches a child that runs the run: each way of ending it gives its exit
    status and one message, and leaves none of the processes the run started."""
    import os
    import secrets
    import signal

    from .processes import as_foreground, command_line, marked

    _two_node_inputs(tmp_path)
    mark = secrets.token_hex(8)
    stderr = tmp_path / "stderr.txt"
    run = subprocess.Popen(
        [sys.executable, "-m", "layerscope", "run", _spec(tmp_path, "ray", "{engine: ray}"), "--quiet"],
        env={**os.environ, "LAYERSCOPE_TEST_RUN": mark},
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=stderr.open("w"),
        preexec_fn=as_foreground,
    )

    def started(name: str) -> list[int]:
        return [pid for pid in marked("LAYERSCOPE_TEST_RUN", mark) if name in command_line(pid)]

    wait_until(lambda: run.poll() is not None or started("ray::_ShardActor"), timeout=300, what="the run's Ray actors")
    assert run.poll() is None, stderr.read_text()
    if ending == "raylet killed":
        for pid in started("raylet"):
            os.kill(pid, signal.SIGKILL)
    elif ending == "interrupted":
        run.send_signal(signal.SIGINT)  # as Ctrl-C does: the terminal signals the process it started
    else:
        run.kill()
    code = run.wait(120)
    wait_until(lambda: not marked("LAYERSCOPE_TEST_RUN", mark), timeout=30, what="the run's processes to end")
    err = stderr.read_text()
    assert "Traceback" not in err and not (tmp_path / "results.json").exists(), err
    if ending == "raylet killed":
        assert code == 3 and "layerscope: infrastructure failure: runtime.engine:" in err, err
    elif ending == "interrupted":
        assert code == 130 and "layerscope: interrupted; no results.json was written" in err, err
    else:  # the run, no longer watched, was interrupted and stopped its cluster
        assert code == -signal.SIGKILL and "layerscope: interrupted" in err, err


def test_a_local_cluster_that_cannot_start_is_an_infrastructure_failure(tmp_path):
    """`ray.init` raised a bare Exception (a raylet killed while the cluster started: "the current node timed
    out during startup"), which ended the run as "a bug in layerscope". Here Ray's folder is under a file."""
    import os

    (tmp_path / "a-file").touch()
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {source: demo:digits-mlp}\ndata: {source: digits, limit: 200}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\nruntime: {engine: ray}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "layerscope", "run", str(spec), "--out", str(tmp_path / "out")],
        env={**os.environ, "RAY_TMPDIR": str(tmp_path / "a-file" / "ray")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(
        "layerscope: infrastructure failure: runtime.engine: could not start a local Ray cluster for the run: "
        "[Errno 20] Not a directory"
    ), done.stderr
    assert not (tmp_path / "out" / "results.json").exists()
