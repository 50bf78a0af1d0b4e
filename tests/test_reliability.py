"""Awkward real-world models, hostile specs, numerical hygiene, security and a memory soak."""

from __future__ import annotations

import gc
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import layerscope
from layerscope.api import prepare
from layerscope.testing import assert_records_close
from layerscope.testing.models import tiny_mlp
from layerscope.util.errors import SpecError, UserError

from .conftest import write_spec
from .processes import as_foreground, marked
from .waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def run(model: onnx.ModelProto | str, tmp_path, data=None, **analysis):
    path = model if isinstance(model, str) else str(tmp_path / "model.onnx")
    if not isinstance(model, str):
        onnx.save(model, path)
    spec = {
        "model": {"source": path},
        "data": data or {"source": "digits", "limit": 120, "shuffle": False},
        "analyses": [{"id": "e", "estimator": "activation_entropy", **analysis}],
    }
    return layerscope.run(spec, write=False, progress=False)


def with_input_shape(model: onnx.ModelProto, dims) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.input[:]
    copy.graph.input.append(helper.make_tensor_value_info("x", FLOAT, dims))
    del copy.graph.output[:]
    copy.graph.output.append(helper.make_tensor_value_info("logits", FLOAT, [dims[0], 10]))
    return copy


# --- models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7])
def test_fixed_batch_models_match_the_dynamic_one(tmp_path, batch):
    dynamic = run(tiny_mlp(), tmp_path)
    fixed = run(with_input_shape(tiny_mlp(), [batch, 64]), tmp_path)
    assert fixed.records == dynamic.records


def test_a_fixed_batch_model_gives_per_batch_estimators_whole_batches(tmp_path):
    """A batch-1 model runs sample by sample, but the information plane still sees batches of 40."""
    spec = {
        "data": {"source": "digits", "limit": 120, "batch_size": 40},
        "analyses": [
            {"id": "ip", "estimator": "information_plane", "params": {"batch_size": 40, "sigma": 2.0, "sigma_x": 4.0}}
        ],
    }
    results = []
    for name, model in [("dynamic", tiny_mlp()), ("fixed", with_input_shape(tiny_mlp(), [1, 64]))]:
        (tmp_path / name).mkdir()
        onnx.save(model, tmp_path / name / "model.onnx")
        results.append(
            layerscope.run(
                {**spec, "model": {"source": str(tmp_path / name / "model.onnx")}}, write=False, progress=False
            )
        )
    dynamic, fixed = results
    assert not fixed.warnings and {r["metric"] for r in fixed.records} >= {"I_XT", "I_TY"}
    assert_records_close(fixed.records, dynamic.records, rtol=0, atol=1e-9)


def silero_spec(**analysis) -> dict:
    """silero-vad's own ONNX (inputs: input, state, sr): audio chunks from the data, the recurrent state
    and the sampling rate as constants (the state's batch axis is its second, so batches of one)."""
    import silero_vad

    source = str(Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx")
    return {
        "model": {"source": source},
        "data": {
            "source": "synthetic",
            "samples": 6,
            "shape": [512],
            "classes": 2,
            "std": 0.1,
            "batch_size": 1,
            "constants": {"state": np.zeros((2, 1, 128), np.float32).tolist(), "sr": 16000},
        },
        "analyses": [{"id": "e", "estimator": "activation_entropy", **analysis}],
    }


def test_a_stateful_model_with_constant_inputs_is_analysed_where_observable():
    results = layerscope.run(silero_spec(on={"name": "output"}), write=False, progress=False)
    assert {r["tensor"] for r in results.records} == {"output"} and results.records
    assert results.models[0]["inputs"] == [{"name": "input", "dtype": "float32", "shape": [None, None]}]
    assert results.models[0]["constants"] == ["sr", "state"]
    # what lives inside its If bodies is refused by name, with the reason
    with pytest.raises(UserError, match=r"inside the If body of node"):
        layerscope.run(silero_spec(on={"op_type": "Sigmoid"}), write=False, progress=False)
    bad = silero_spec()
    del bad["data"]["constants"]["sr"]
    with pytest.raises(
        UserError, match=r"the model has 2 data inputs \(input, sr\), but data source 'synthetic.*' gives one array"
    ):
        layerscope.run(bad, write=False, progress=False)


def test_inspect_shows_what_is_observable_in_a_model_with_if_bodies():
    import silero_vad

    from layerscope.graph.tensors import describe_tensors

    model = onnx.load(str(Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"))
    tensors = describe_tensors(model)
    hidden = [t for t in tensors if "inside the If body" in t.reason]
    assert len(hidden) > 50 and not any(t.observable for t in hidden)
    assert any(t.observable and t.role == "output" for t in tensors)


def test_fp16_model_is_analysed(tmp_path):
    weight = numpy_helper.from_array((np.random.default_rng(0).standard_normal((64, 8)) * 0.3).astype(np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["a"])],
        "f16",
        [helper.make_tensor_value_info("x", FLOAT16, ["N", 64])],
        [helper.make_tensor_value_info("a", FLOAT16, ["N", 8])],
        [weight],
    )
    results = run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path)
    assert all(np.isfinite(r["value"]) for r in results.records) and results.select(metric="entropy")


def test_bf16_model_on_the_cpu_provider_is_refused_naming_the_op(tmp_path):
    import ml_dtypes

    values = (np.random.default_rng(0).standard_normal((64, 8)) * 0.3).astype(ml_dtypes.bfloat16)
    weight = helper.make_tensor("w", onnx.TensorProto.BFLOAT16, [64, 8], values.view(np.uint16).ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["a"])],
        "bf16",
        [helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, ["N", 64])],
        [helper.make_tensor_value_info("a", onnx.TensorProto.BFLOAT16, ["N", 8])],
        [weight],
    )
    with pytest.raises(UserError, match=r"MatMul.*no kernel for that op and element type"):
        run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path)


def test_int8_qdq_model_is_analysed(tmp_path):
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array((np.random.default_rng(1).standard_normal((64, 8)) * 0.3).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"]),
        helper.make_node("MatMul", ["xd", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("a", FLOAT, ["N", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    results = run(model, tmp_path)
    assert results.select(metric="entropy", layer=results.records[0]["layer"])
    quantised = run(model, tmp_path, on={"name": "xq"})  # the int8 tensor itself is observable
    assert all(np.isfinite(r["value"]) for r in quantised.records)


# --- numerical hygiene --------------------------------------------------------------------------


def test_nan_activations_are_warned_and_never_reported_as_nan(tmp_path):
    nodes = [helper.make_node("Log", ["x"], ["logx"]), helper.make_node("Relu", ["logx"], ["a"])]
    graph = helper.make_graph(
        nodes,
        "nan",
        [helper.make_tensor_value_info("x", FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("a", FLOAT, ["N", 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32))
    results = run(
        model,
        tmp_path,
        data={"source": "npz", "path": str(tmp_path / "d.npz")},
        on={"op_type": ["Log", "Relu"]},
        params={"variant": "histogram"},
    )
    assert any("tensor 'logx'" in w and "NaN or Inf" in w for w in results.warnings)
    assert results.records
    assert all(np.isfinite(r["value"]) for r in results.records)
    assert not results.failures


def test_classes_with_one_sample_and_constant_features(tmp_path):
    x = np.zeros((30, 64), np.float32)
    x[:, 0] = np.arange(30)
    y = np.array([0] * 29 + [1])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    results = run(tiny_mlp(), tmp_path, data={"source": "npz", "path": str(tmp_path / "d.npz")})
    assert {r["class"] for r in results.records} == {"all", 0, 1}
    assert all(np.isfinite(r["value"]) for r in results.records)


# --- hostile specs ---------------------------------------------------------------------------------

LOCATED = re.compile(r"^.+:\d+:\d+: ")
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
BASE = {
    "version": 1,
    "model": {"source": "demo:digits-cnn"},
    "data": {"source": "digits", "batch_size": 100},
    "analyses": [{"id": "e", "estimator": "activation_entropy", "params": {"variant": "binary"}}],
    "runtime": {"device": "cpu", "memory_budget": "1GiB", "seed": 0},
    "outputs": {"dir": "results"},
}


def _check_spec(tmp_path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        prepare(str(path))
    except SpecError as error:
        assert error.messages and all(LOCATED.match(m) for m in error.messages), error.messages
    except UserError as error:
        assert str(error)  # a named problem (e.g. an unreadable data file)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(
        [
            ("model",),
            ("model", "source"),
            ("data",),
            ("data", "batch_size"),
            ("analyses",),
            ("analyses", 0),
            ("analyses", 0, "params"),
            ("analyses", 0, "on"),
            ("runtime",),
            ("runtime", "memory_budget"),
            ("outputs", "formats"),
            ("version",),
            ("extra",),
        ]
    ),
    value=VALUES,
)
def test_mutated_specs_validate_or_fail_with_a_location(tmp_path, path, value):
    import copy

    import yaml

    spec = copy.deepcopy(BASE)
    target = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    _check_spec(tmp_path, yaml.safe_dump(spec, allow_unicode=True))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.lists(
        st.sampled_from(
            list("abc:-[]{}'\"#&*!|>%@`,?\n\t 01.")
            + ["!!python/object ", "on:", "model:", "analyses:", "\n  - ", "id: "]
        ),
        max_size=40,
    ).map("".join)
)
def test_arbitrary_text_never_crashes_the_loader(tmp_path, text):
    _check_spec(tmp_path, text)


def test_analysis_ids_cannot_escape_the_output_folder(tmp_path):
    spec = write_spec(
        tmp_path, "model: {source: demo:digits-cnn}\nanalyses: [{id: ../../escape, estimator: activation_entropy}]\n"
    )
    with pytest.raises(SpecError, match=r"analyses\.0\.id"):
        prepare(str(spec))


# --- a soak -------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))


@pytest.mark.slow
def test_quickstart_twenty_times_in_one_process_does_not_grow():
    spec = str(REPO / "specs" / "quickstart.yaml")
    resident = []
    for _ in range(20):
        layerscope.run(spec, write=False, progress=False)
        gc.collect()
        resident.append(_rss())
    settled = resident[4]  # after warm-up (imports, arenas, caches)
    assert resident[-1] - settled < 24 * 2**20, [r // 2**20 for r in resident]


# --- interrupted runs ---------------------------------------------------------------------------------

IP_SPEC = {
    "model": {"source": "demo:digits-mlp", "checkpoints": ["epoch_01", "epoch_05", "epoch_10"]},
    "data": {"source": "digits", "split": "train", "limit": 300},
    "analyses": [
        {"id": "ip", "estimator": "information_plane", "params": {"sigma_grid": 30, "smoothing": 0.9}},
        {"id": "e", "estimator": "activation_entropy"},
    ],
}


def _interrupted_run(tmp_path):
    """Output folder of a run interrupted after its first checkpoint (its resume file saved)."""
    import types

    from layerscope import hookimpl

    def interrupt(model, batch_index, samples):
        if model == "epoch_05":
            raise KeyboardInterrupt

    plugin = types.ModuleType("interrupter")
    plugin.after_batch = hookimpl(interrupt)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        layerscope.run({**IP_SPEC, "outputs": {"dir": str(out)}}, progress=False, plugins=(plugin,))
    return out


def test_resume_continues_an_interrupted_run_with_identical_records(tmp_path):
    import types

    from layerscope import hookimpl

    reference = layerscope.run({**IP_SPEC, "outputs": {"dir": str(tmp_path / "ref")}}, progress=False)
    out = _interrupted_run(tmp_path)
    assert not (out / "results.json").exists()
    assert sorted(p.name for p in (out / ".layerscope-resume").iterdir()) == ["checkpoint-0000.pt"]
    computed = []
    counter = types.ModuleType("counter")
    counter.after_batch = hookimpl(lambda model, batch_index, samples: computed.append(model))
    resumed = layerscope.run({**IP_SPEC, "outputs": {"dir": str(out)}}, progress=False, resume=True, plugins=(counter,))
    assert "epoch_01" not in computed and "epoch_05" in computed  # the first checkpoint was not recomputed
    assert resumed.records == reference.records
    assert (out / "results.json").exists() and not (out / ".layerscope-resume").exists()


class _Planted:
    """Unpickling this runs a shell command: what a hostile resume file would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("planting", ["torch.save", "raw pickle", "garbage", "other spec", "fifo"])
def test_a_planted_or_foreign_resume_file_never_runs_code_and_is_recomputed(tmp_path, planting):
    import pickle

    import torch

    reference = layerscope.run({**IP_SPEC, "outputs": {"dir": str(tmp_path / "ref")}}, progress=False)
    out = _interrupted_run(tmp_path)
    saved = out / ".layerscope-resume" / "checkpoint-0000.pt"
    marker = tmp_path / "pwned"
    if planting == "torch.save":
        torch.save({"key": "x", "label": "epoch_01", "outcome": _Planted(marker)}, saved)
    elif planting == "raw pickle":
        saved.write_bytes(pickle.dumps(_Planted(marker)))
    elif planting == "garbage":
        saved.write_bytes(b"PK\x03\x04 not really a zip file" * 10)
    elif planting == "fifo":
        saved.unlink()
        __import__("os").mkfifo(saved)
    else:
        state = torch.load(saved, weights_only=True)
        torch.save({**state, "key": "0" * 64}, saved)
    (out / ".layerscope-resume" / "checkpoint-0000.pkl").write_bytes(pickle.dumps(_Planted(marker)))  # old name
    resumed = layerscope.run({**IP_SPEC, "outputs": {"dir": str(out)}}, progress=False, resume=True)
    assert not marker.exists()
    assert resumed.records == reference.records
    expected = (
        "another spec, checkpoint or layerscope version"
        if planting == "other spec"
        else "could not be read as a resume file"
    )
    assert any(expected in w and "checkpoint epoch_01 was recomputed" in w for w in resumed.warnings), resumed.warnings


def test_a_resume_folder_that_is_a_file_does_not_stop_the_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".layerscope-resume").write_text("not a folder")
    results = layerscope.run({**IP_SPEC, "outputs": {"dir": str(out)}}, progress=False, resume=True)
    assert len(results.models) == 3 and (out / "results.json").exists()
    assert not (out / ".layerscope-resume").exists()


@pytest.mark.slow
def test_ctrl_c_leaves_no_results_json(tmp_path):
    import signal
    import subprocess
    import sys

    spec = write_spec(
        tmp_path,
        "model: {source: demo:digits-cnn, checkpoints: all}\n"
        "data: {source: digits}\n"
        "analyses: [{id: ip, estimator: information_plane}]\n"
        f"outputs: {{dir: {tmp_path / 'out'}}}\n",
    )
    layerscope.run(
        {
            "model": {"source": "demo:digits-cnn"},
            "data": {"source": "digits", "limit": 10},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}],
        },
        write=False,
        progress=False,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "layerscope", "run", str(spec), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_foreground,
    )
    # interrupt once the first checkpoint is saved, mid-run
    wait_until(
        lambda: (tmp_path / "out" / ".layerscope-resume").exists() or process.poll() is not None,
        timeout=120,
        what="the run to save its first checkpoint (or end)",
    )
    assert process.poll() is None, f"the run ended before it was interrupted: {process.communicate()}"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def _running(pid: int) -> bool:
    """Whether process *pid* exists and has not ended (a zombie, ended but not reaped, has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # gone, or reaped while being read
        return False


def _has_loaded(pid: int, library: str) -> bool:
    """Whether process *pid* has a shared library whose path contains *library* mapped."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _worker_processes(parent: int) -> list[int]:
    """Pids of the multiprocessing workers *parent* spawned (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if entry.name.isdigit() and int(fields[1]) == parent and b"spawn_main" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.slow
def test_worker_processes_end_when_the_driver_is_killed(tmp_path):
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    spec = write_spec(
        tmp_path,
        "model: {source: demo:digits-cnn}\ndata: {source: digits}\n"
        "analyses: [{id: ip, estimator: information_plane, params: {sigma_grid: 20000}}]\n"
        f"runtime: {{workers: 2, shards: 2}}\noutputs: {{dir: {tmp_path / 'out'}}}\n",
    )
    layerscope.run(
        {
            "model": {"source": "demo:digits-cnn"},
            "data": {"source": "digits", "limit": 10},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}],
        },
        write=False,
        progress=False,
    )
    mark = f"{os.getpid()}-{tmp_path.name}"
    stderr = tmp_path / "stderr.txt"
    driver = subprocess.Popen(
        [sys.executable, "-m", "layerscope", "run", str(spec), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=stderr.open("w"),
        env={**os.environ, "LAYERSCOPE_TEST_RUN": mark},
    )

    def assert_driver_runs() -> None:
        assert driver.poll() is None, f"the run ended (exit code {driver.returncode}) before it was killed"

    workers = wait_until(
        lambda: assert_driver_runs() or _worker_processes(driver.pid),
        timeout=120,
        what="the run's worker process to start",
    )
    # Kill the driver once every worker is past its start-up and runs a shard task (a width pass of
    # some 15 s): onnxruntime, which loads the task's model, is imported by the task, not at start-up.
    wait_until(
        lambda: assert_driver_runs() or all(_has_loaded(pid, "onnxruntime_pybind11_state") for pid in workers),
        timeout=120,
        what="the workers to start their shard tasks",
    )
    assert_driver_runs()
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    try:
        wait_until(
            lambda: not any(_running(pid) for pid in workers),
            timeout=5,
            what="the workers to end: a worker outlived its killed driver",
        )
    finally:
        for pid in filter(_running, workers):
            with contextlib.suppress(ProcessLookupError):  # ended since
                os.kill(pid, signal.SIGKILL)
    # Nothing reports the killed driver: no worker's traceback about its lost connection, no warning from
    # multiprocessing's resource tracker (the last of the run's processes to end) about the semaphores it removed.
    wait_until(lambda: not marked("LAYERSCOPE_TEST_RUN", mark), timeout=30, what="the run's processes to end")
    assert stderr.read_text() == ""


@pytest.mark.slow
def test_model_over_2gb_with_external_data(tmp_path):
    """A 2.2 GB initializer in a sparse external file (nothing written but the graph) is memory-mapped."""
    rows = 550_000_000 // 8  # 2.2 GB of float32 in an (rows, 8) table
    data = tmp_path / "big.bin"
    with open(data, "wb") as handle:
        handle.truncate(rows * 8 * 4)  # sparse: reads as zeros
    table = onnx.TensorProto(name="table", data_type=FLOAT, dims=[rows, 8], data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(rows * 8 * 4))):
        table.external_data.add(key=key, value=value)
    weight = numpy_helper.from_array((np.random.default_rng(0).standard_normal((64, 8)) * 0.3).astype(np.float32), "w")
    index = numpy_helper.from_array(np.arange(3, dtype=np.int64), "index")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Gather", ["table", "index"], ["rows3"]),
        helper.make_node("ReduceMean", ["rows3"], ["offset"], keepdims=1, axes=[0]),
        helper.make_node("Add", ["h", "offset"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["a"]),
    ]
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("a", FLOAT, ["N", 8])],
        [weight, index, table],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10), str(tmp_path / "big.onnx")
    )
    assert (tmp_path / "big.onnx").stat().st_size < 10_000 and data.stat().st_blocks * 512 < 10**6
    results = run(str(tmp_path / "big.onnx"), tmp_path)
    assert results.models[0]["weights_apart_bytes"] == rows * 8 * 4  # read by onnxruntime, not held in memory
    small = onnx.load(str(tmp_path / "big.onnx"), load_external_data=False)
    del small.graph.initializer[2:]
    small.graph.initializer.append(numpy_helper.from_array(np.zeros((3, 8), np.float32), "table"))
    small.graph.node[2].input[0] = "table"  # the same model with a tiny all-zero table gives the same numbers
    del small.graph.node[1]
    small.graph.node[1].input[0] = "table"
    strip = lambda records: [{k: v for k, v in r.items() if k != "model"} for r in records]  # noqa: E731
    assert strip(results.records) == strip(run(small, tmp_path).records)


def test_the_finiteness_check_tells_overflowing_sums_from_real_nan_and_inf():
    import torch

    from layerscope.engine.checkpoint_run import all_finite

    huge = torch.full((1000,), 3e38, dtype=torch.float32)  # the sum overflows, every value is finite
    assert all_finite(huge) and all_finite(torch.zeros(3, dtype=torch.bfloat16)) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.ones(4, 5)
        values[2, 3] = bad
        assert not all_finite(values)


def _checkpoint_run(tmp_path, interrupt_at: str | None):
    """A run of three ONNX checkpoints on an npz file, interrupted when it reaches *interrupt_at*."""
    import types

    from layerscope import hookimpl

    def interrupt(model, batch_index, samples):
        if model == interrupt_at:
            raise KeyboardInterrupt

    plugin = types.ModuleType("interrupter")
    plugin.after_batch = hookimpl(interrupt)
    spec = {
        "model": {"source": str(tmp_path / "epoch_1.onnx"), "checkpoints": str(tmp_path / "epoch_*.onnx")},
        "data": {"source": "npz", "path": str(tmp_path / "data.npz"), "batch_size": 50},
        "analyses": [
            {
                "id": "ip",
                "estimator": "information_plane",
                "params": {"sigma_grid": 20, "smoothing": 0.9, "batch_size": 50},
            }
        ],
        "outputs": {"dir": str(tmp_path / "run")},
    }
    return spec, (plugin,)


def _write_inputs(tmp_path, data_seed: int, weights_seed: int = 0):
    from .conftest import tiny_mlp_proto

    rng = np.random.default_rng(data_seed)
    np.savez(tmp_path / "data.npz", x=rng.random((150, 64), dtype=np.float32), y=rng.integers(0, 3, 150))
    for epoch in (1, 2, 3):
        onnx.save(tiny_mlp_proto(seed=10 * weights_seed + epoch), str(tmp_path / f"epoch_{epoch}.onnx"))


@pytest.mark.parametrize("changed", ["data", "data in place, its size and time kept", "checkpoint"])
def test_resume_recomputes_when_the_data_or_a_checkpoint_changed(tmp_path, changed):
    """The tester replaced the data file of a killed run: 400 of 1010 records of the resumed run came from
    the old data, with no warning. Resume files are now bound to the data and checkpoint files, also when
    a file is rewritten in place at the same size and its modification time set back (touch -r)."""
    _write_inputs(tmp_path, data_seed=0)
    spec, interrupter = _checkpoint_run(tmp_path, interrupt_at="epoch_3")
    with pytest.raises(KeyboardInterrupt):
        layerscope.run(spec, progress=False, plugins=interrupter)
    saved = sorted(p.name for p in (tmp_path / "run" / ".layerscope-resume").iterdir())
    assert saved == ["checkpoint-0000.pt", "checkpoint-0001.pt"]
    if changed == "data":
        _write_inputs(tmp_path, data_seed=1)
    elif changed.startswith("data in place"):
        data, before = tmp_path / "data.npz", (tmp_path / "data.npz").stat()
        rng = np.random.default_rng(1)
        with open(data, "r+b") as file:  # same arrays, new values, same bytes count, written in place
            np.savez(file, x=rng.random((150, 64), dtype=np.float32), y=rng.integers(0, 3, 150))
        assert data.stat().st_size == before.st_size
        os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:  # epoch_2 retrained: epoch_1's saved results still hold, epoch_2's (and what it carried over) do not
        from .conftest import tiny_mlp_proto

        onnx.save(tiny_mlp_proto(seed=99), str(tmp_path / "epoch_2.onnx"))
    resumed = layerscope.run(spec, progress=False, resume=True)
    fresh = layerscope.run({**spec, "outputs": {"dir": str(tmp_path / "fresh")}}, progress=False)
    assert resumed.records == fresh.records
    recomputed = [w for w in resumed.warnings if "changed since checkpoint" in w]
    expected = ["epoch_1", "epoch_2"] if changed.startswith("data") else ["epoch_2"]
    assert [re.search(r"since checkpoint (\S+) was saved", w)[1] for w in recomputed] == expected, resumed.warnings


# --- the outputs swap ----------------------------------------------------------------------------


class _Numbered:
    """A reporter writing three files that carry the run's number (in results.spec)."""

    name = "numbered"

    def write(self, results, out_dir):
        for name in ("a.txt", "b.txt", "plots/c.txt"):
            (out_dir / name).parent.mkdir(exist_ok=True)
            (out_dir / name).write_text(str(results.spec["n"]))
        return ["a.txt", "b.txt", "plots/c.txt"]


def _numbered_results(n: int):
    return layerscope.Results(layerscope="test", spec={"n": n}, runtime={}, models=[], records=[])


def _snapshot(folder: Path) -> set[str]:
    """The run numbers in the folder's files, read through one handle on the folder (as a reader that
    lists a folder and reads what it listed sees it)."""
    import json
    import os

    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:

        def read(name: str) -> str:
            descriptor = os.open(name, os.O_RDONLY, dir_fd=handle)
            with os.fdopen(descriptor) as file:
                return file.read()

        numbers = {read(name) for name in ("a.txt", "b.txt", "plots/c.txt")}
        return numbers | {str(json.loads(read("results.json"))["spec"]["n"])}
    finally:
        os.close(handle)


def test_a_reader_always_sees_one_run_s_complete_set(tmp_path):
    """The tester's case: kill -9 during the final move left the old results.json beside the new
    records.csv and report.html. Whoever reads the folder now sees one run's files, never a mix."""
    import threading

    from layerscope.results.outputs import output_folder

    out = tmp_path / "out"
    with output_folder(out) as folder:
        folder.write(_numbered_results(0), [_Numbered()])
    (out / "mine.txt").write_text("the user's own notes")
    mixed, reads, done = [], [0], threading.Event()

    def reader():
        while not done.is_set():
            try:
                numbers = _snapshot(out)
            except FileNotFoundError:  # it opened the previous folder, removed while it read: read again
                continue
            except Exception as error:  # the assertion below reports it
                mixed.append(error)
                return
            reads[0] += 1
            if len(numbers) != 1:
                mixed.append(numbers)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(1, 60):
            with output_folder(out) as folder:
                folder.write(_numbered_results(n), [_Numbered()])
    finally:
        done.set()
        thread.join()
    assert not mixed and reads[0] > 10, (mixed[:3], reads)
    assert _snapshot(out) == {"59"} and (out / "mine.txt").read_text() == "the user's own notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left beside it
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # the folder keeps an ordinary mode


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.parametrize("killed", ["before the exchange", "after the exchange"])
def test_a_run_killed_while_swapping_leaves_a_complete_set_and_no_stale_folder(tmp_path, monkeypatch, killed):
    from layerscope.results import outputs

    out = tmp_path / "out"
    with outputs.output_folder(out) as folder:
        folder.write(_numbered_results(1), [_Numbered()])
    exchange = outputs._rename_exchange

    def killed_there(a, b):
        if killed == "after the exchange":
            exchange(a, b)
        raise SystemExit("killed")

    monkeypatch.setattr(outputs, "_rename_exchange", killed_there)
    monkeypatch.setattr(outputs.shutil, "rmtree", lambda *args, **kwargs: None)  # a killed run cleans nothing
    with pytest.raises(SystemExit), outputs.output_folder(out) as folder:
        folder.write(_numbered_results(2), [_Numbered()])
    assert _snapshot(out) == ({"1"} if killed == "before the exchange" else {"2"})
    assert len(list(tmp_path.glob(".out.layerscope-staging-*"))) == 1
    monkeypatch.undo()
    with outputs.output_folder(out) as folder:
        folder.write(_numbered_results(3), [_Numbered()])
    assert _snapshot(out) == {"3"} and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_staging_folder_left_inside_by_an_older_run_is_removed(tmp_path):
    from layerscope.results.outputs import output_folder

    stale = tmp_path / "out" / ".layerscope-staging-abc123"
    stale.mkdir(parents=True)
    (stale / "records.csv").write_text("old")
    with output_folder(tmp_path / "out") as folder:
        folder.write(_numbered_results(1), [_Numbered()])
    assert not stale.exists() and _snapshot(tmp_path / "out") == {"1"}


def test_runs_without_an_output_folder_never_collide(tmp_path, monkeypatch):
    """The tester's case: two concurrent layerscope.run(...) calls with no outputs.dir collided on ./results
    with a lock error. Each now writes a folder of its own, named after the spec and the run id; a run
    started while the other holds its folder (from inside its after_batch hook) completes too."""
    import types

    from layerscope import hookimpl

    monkeypatch.chdir(tmp_path)
    spec = {
        "name": "digits entropy",
        "model": {"source": "demo:digits-cnn"},
        "data": {"source": "digits", "limit": 100, "batch_size": 50},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
    }
    inner: list = []

    def run_another(model, batch_index, samples):
        if not inner:
            inner.append(layerscope.run(spec, progress=False))

    plugin = types.ModuleType("concurrent")
    plugin.after_batch = hookimpl(run_another)
    outer = layerscope.run(spec, progress=False, plugins=(plugin,))
    folders = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert folders == sorted(f"digits_entropy-{r.runtime['run_id']}" for r in (outer, *inner)), folders
    assert all((tmp_path / "results" / f / "results.json").exists() for f in folders)
    assert outer.records == inner[0].records
    with pytest.raises(UserError, match="--resume continues a run in the folder it wrote to"):
        layerscope.run(spec, progress=False, resume=True)
    assert not layerscope.run(spec, progress=False, write=False).out_dir


def test_a_worker_whose_driver_died_while_it_started_exits(tmp_path):
    """A worker takes its driver's id from the driver: a driver killed while the worker was still starting
    (before its initializer ran) had already handed it to another parent, and a worker that took its
    parent's id then watched init and lived on (two orphans were seen alive after 120 s)."""
    import subprocess
    import sys
    import time

    probe = (
        "import time; from layerscope.engine.process_pool import _exit_with_parent; "
        "_exit_with_parent(driver=2**22 + 17, interval=0.05); time.sleep(60)"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", probe], timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 30


def test_a_folder_the_new_run_leaves_empty_is_not_kept(tmp_path):
    """A run writing json only after one that wrote plots left an empty plots/ folder behind."""
    from layerscope.results.outputs import output_folder

    out = tmp_path / "out"
    with output_folder(out) as folder:
        folder.write(_numbered_results(1), [_Numbered()])
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("kept")
    with output_folder(out) as folder:
        folder.write(_numbered_results(2), [])
    assert sorted(p.name for p in out.iterdir()) == ["notes", "results.json"]
    assert (out / "notes" / "mine.txt").read_text() == "kept"


def test_a_lock_taken_on_a_removed_lock_file_is_taken_again(tmp_path, monkeypatch):
    """The holder removes the lock file when it lets go. A run that opened the file just before and locks it
    just after holds a removed file: it must see so and lock the file now at the path, so that a third run
    is refused (it would otherwise create a new file, lock it, and write the folder at the same time)."""
    import fcntl

    from layerscope.results.outputs import FolderLock

    path = tmp_path / ".layerscope.lock"
    holder, racer, third = FolderLock(path), FolderLock(path), FolderLock(path)
    assert holder.acquire()
    flock, calls = fcntl.flock, []

    def holder_lets_go_first(fd, operation):  # between the racer's open and its flock
        if not calls:
            holder.release()
        calls.append(fd)
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", holder_lets_go_first)
    assert racer.acquire() and len(calls) == 2  # the removed file, then the new one
    monkeypatch.setattr(fcntl, "flock", flock)
    assert not third.acquire()
    racer.release()
    assert not path.exists() and third.acquire()
    third.release()


def test_a_signal_after_the_results_are_written_does_not_end_the_command():
    """Ctrl-C in the last moments of a finished run killed the process by signal while the interpreter shut
    down (exit -2, no message), its results complete: once they are written, late signals are held."""
    import subprocess
    import sys

    script = (
        "import os, signal; from layerscope.util.processes import ignore_late_signals; ignore_late_signals(); "
        "[os.kill(os.getpid(), s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]; print('done')"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "done\n" and done.stderr == "", done
    unheld = subprocess.run(
        [sys.executable, "-c", script.replace("ignore_late_signals(); ", "")], capture_output=True, timeout=60
    )
    assert unheld.returncode != 0  # without it, the first signal ends the process (KeyboardInterrupt)
