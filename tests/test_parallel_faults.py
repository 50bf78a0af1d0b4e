"""Parallel runs on this machine (``runtime.workers``) that lose a worker process: the shard tasks it held
run again (``runtime.retries``) and the records equal a run in one process; a run that loses workers more
often ends with an infrastructure failure and leaves no process; a killed run resumes from every checkpoint
it had finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import layerscope
from layerscope import InfrastructureError
from layerscope.plugins.data.digits import load_digits_split
from layerscope.testing import assert_records_close

from .conftest import write_spec
from .processes import KillsItsWorker, alive, as_foreground, command_line, descendants
from .waiting import wait_until

SPEC = {
    "model": {"source": "demo:digits-mlp", "checkpoints": ["epoch_01", "epoch_05", "epoch_10"]},
    "data": {"batch_size": 100, "shuffle": False},
    "analyses": [
        {"id": "ip", "estimator": "information_plane", "params": {"sigma_grid": 30, "smoothing": 0.9}},
        {"id": "e", "estimator": "activation_entropy"},
    ],
}


def _data(tmp_path, times: int) -> KillsItsWorker:
    x, y = load_digits_split("train")
    (tmp_path / "kills").mkdir(exist_ok=True)
    return KillsItsWorker(x[:300], y[:300], tmp_path / "kills", times)


def _workers_left() -> list[int]:
    """This process's worker processes still running (its multiprocessing resource tracker aside)."""
    return [pid for pid in descendants(os.getpid()) if alive(pid) and "spawn_main" in command_line(pid)]


@pytest.mark.slow  # spawns worker processes twice: 20-40 s on two cores
def test_a_killed_worker_process_is_replaced_and_the_records_equal_a_run_in_one_process(tmp_path):
    single = layerscope.run(SPEC, data=_data(tmp_path, 0), write=False, progress=False)
    parallel = layerscope.run(
        {**SPEC, "runtime": {"workers": 3, "shards": 2}}, data=_data(tmp_path, 1), write=False, progress=False
    )
    assert sorted(p.name for p in (tmp_path / "kills").iterdir()) == ["kill-0"]  # a worker was killed
    assert any("a worker process ended abruptly" in w and "ran again" in w for w in parallel.warnings)
    assert_records_close(parallel.records, single.records, rtol=0, atol=1e-9)  # shards: other sum order
    assert not _workers_left()  # the pools, the replaced one too, are gone


@pytest.mark.slow
def test_workers_lost_more_often_than_retries_end_the_run_naming_it(tmp_path):
    spec = {**SPEC, "runtime": {"workers": 2, "shards": 2, "retries": 1}}
    with pytest.raises(InfrastructureError, match=r"a worker process ended abruptly .* twice \(runtime.retries: 1\)"):
        layerscope.run(spec, data=_data(tmp_path, 10), write=False, progress=False)
    assert len(list((tmp_path / "kills").iterdir())) == 2
    assert not _workers_left()


@pytest.mark.slow
def test_a_killed_parallel_run_resumes_from_the_checkpoints_it_saved(tmp_path):
    """A `workers: 2` run saves each checkpoint as it ends; SIGKILLed part-way, `--resume` finishes it with the
    records of a fresh run."""
    spec = write_spec(
        tmp_path,
        "model: {source: demo:digits-mlp, checkpoints: all}\n"
        "data: {source: digits, split: train, limit: 500}\n"
        "analyses: [{id: ip, estimator: information_plane, params: {sigma_grid: 60}}]\n"
        "runtime: {workers: 2}\n",
    )
    command = [sys.executable, "-m", "layerscope", "run", str(spec), "--quiet", "--out"]
    fresh = subprocess.run([*command, str(tmp_path / "fresh")], capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr
    run = subprocess.Popen([*command, str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    saved = tmp_path / "out" / ".layerscope-resume"
    wait_until(
        lambda: run.poll() is not None or list(saved.glob("checkpoint-*.pt")), timeout=600, what="a saved checkpoint"
    )
    assert run.poll() is None, "the run ended before it was killed"
    workers = descendants(run.pid)
    run.send_signal(signal.SIGKILL)
    run.wait(60)
    wait_until(lambda: not any(map(alive, workers)), timeout=30, what="the workers to end")
    kept = sorted(p.name for p in saved.glob("checkpoint-*.pt"))
    assert 1 <= len(kept) < 10 and not (tmp_path / "out" / "results.json").exists(), kept
    resumed = subprocess.run([*command, str(tmp_path / "out"), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads((tmp_path / d / "results.json").read_text())["records"] for d in ("fresh", "out")]
    assert records[1] == records[0]


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["ctrl-c", "sigterm"])
def test_an_interrupted_parallel_run_is_one_message_and_ends_every_worker(tmp_path, ending):
    """A terminal's Ctrl-C reaches every process of the foreground group: worker processes still importing
    torch printed their KeyboardInterrupt tracebacks above the run's message (3 tries in 4). The workers
    now never see it; the run ends them. SIGTERM (``timeout``, a batch scheduler) ended the run without a
    word; it now ends as an interrupt does, exit 143."""
    from layerscope.adapters.demo_zoo import ensure_trained

    ensure_trained("digits-mlp")  # trained here, not by the run: it says so on stderr
    spec = write_spec(
        tmp_path,
        "model: {source: demo:digits-mlp, checkpoints: all}\n"
        "data: {source: digits, split: train}\n"
        "analyses: [{id: ip, estimator: information_plane, params: {sigma_grid: 60}}]\n"
        "runtime: {workers: 2}\n",
    )
    run = subprocess.Popen(
        [sys.executable, "-m", "layerscope", "run", str(spec), "--quiet", "--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal gives a command
        preexec_fn=as_foreground,
    )
    workers = wait_until(
        lambda: run.poll() is not None or [p for p in descendants(run.pid) if "multiprocessing" in command_line(p)],
        timeout=120,
        what="the run's worker processes",
    )
    assert run.poll() is None, run.communicate()
    if ending == "ctrl-c":
        os.killpg(run.pid, signal.SIGINT)  # while the workers import torch and build the run
    else:
        run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    expected = (130, "interrupted") if ending == "ctrl-c" else (143, "ended by SIGTERM")
    assert run.returncode == expected[0], err
    assert err.startswith(f"layerscope: {expected[1]}; no results.json was written"), err
    assert err.count("\n") == 1, err
    wait_until(lambda: not any(map(alive, workers)), timeout=30, what="the workers to end")
