"""The tracking reporters (``tensorboard``, ``mlflow``, ``wandb``) from a run, ``layerscope report``, a Monitor and
the training callbacks: every test reads what the tracker wrote back with the tracker's own reader (TensorBoard's
event protobufs, MLflow's client on its store, W&B's offline run file) and compares it with the records."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import layerscope
from layerscope.cli.main import main
from layerscope.plugins.data.digits import load_digits_split
from layerscope.results.tracking import Histogram, checkpoint_steps, scalars_and_histograms, series_name
from layerscope.util.errors import UserError

from .test_aggregation_distribution import gap_model, synthetic_data

SERIES_KEYS = ("class", "channel", "node", "feature", "group")
BIN_KEYS = ("bin", "bin_center", "bin_width")


def expected_name(record: dict) -> str:
    """The series name the documentation gives a record: analysis/metric/[network/]layer, then key_value."""
    parts = [record["analysis"], record["metric"], *([record["network"]] if "network" in record else [])]
    return "/".join([*parts, record["layer"], *(f"{k}_{record[k]}" for k in SERIES_KEYS if k in record)])


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"needs {module}")


@pytest.fixture
def aggregation_spec(tmp_path):
    """A spec on a real ONNX model with global average pooling and labelled data: aggregation_distribution
    records scalars per channel, node and class, and histograms (the ``histogram`` bins)."""
    onnx.save(gap_model(), str(tmp_path / "gap.onnx"))
    z, labels = synthetic_data(n=300)
    np.savez(tmp_path / "d.npz", x=z, y=labels)
    return {
        "name": "gap",
        "model": {"source": str(tmp_path / "gap.onnx")},
        "data": {"source": "npz", "path": str(tmp_path / "d.npz"), "batch_size": 100},
        "analyses": [
            {"id": "agg", "estimator": "aggregation_distribution", "params": {"bins": 10, "plot_channels": 2}}
        ],
        "outputs": {"dir": str(tmp_path / "out")},
    }


def digits(count: int = 120):
    x, y = load_digits_split("train")
    return torch.from_numpy(x[:count]), torch.from_numpy(y[:count])


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


ENTROPY_SPEC = {"name": "fit", "model": {}, "analyses": [{"id": "entropy", "estimator": "activation_entropy"}]}


# --- readers ----------------------------------------------------------------------------------------------


@dataclass
class TensorBoardRun:
    """What the event files of one TensorBoard run folder hold, by tag: ``(step, value)`` of each scalar, ``(step,
    HistogramProto)`` of each histogram, ``(step, width, height)`` of each image, ``(step, text)`` of each text."""

    scalars: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    histograms: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    images: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    texts: dict[str, list] = field(default_factory=lambda: defaultdict(list))


def tensorboard_runs(folder: Path) -> dict[str, TensorBoardRun]:
    """Each run folder under *folder* (a TensorBoard log dir) read, by folder name. An event file is a TFRecord
    file (each record: 8-byte length, 4-byte checksum, the data, 4-byte checksum) of TensorBoard's ``Event``
    protobufs. (TensorBoard's own EventAccumulator imports TensorFlow where it is installed: seconds; its
    TensorFlow-free mode is a switch for the whole process, which Keras's TensorBoard callback cannot run with.)"""
    from tensorboard.compat.proto import event_pb2

    runs = {}
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        run = runs[run_dir.name] = TensorBoardRun()
        for path in sorted(run_dir.glob("events.out.tfevents.*")):
            data, position = path.read_bytes(), 0
            while position < len(data):
                (length,) = struct.unpack("<Q", data[position : position + 8])
                event = event_pb2.Event.FromString(data[position + 12 : position + 12 + length])
                position += 12 + length + 4
                for value in event.summary.value:
                    kind = value.WhichOneof("value")
                    if kind == "simple_value":
                        run.scalars[value.tag].append((event.step, value.simple_value))
                    elif kind == "histo":
                        run.histograms[value.tag].append((event.step, value.histo))
                    elif kind == "image":
                        run.images[value.tag].append((event.step, value.image.width, value.image.height))
                    elif value.metadata.plugin_data.plugin_name == "text":
                        run.texts[value.tag].append((event.step, value.tensor.string_val[0].decode()))
    return runs


def wandb_records(run_dir: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``): a LevelDB-format log (a 7-byte header, then 32 KiB
    blocks of chunks, each with a 4-byte checksum, 2-byte length and 1-byte type: full, first, middle, last)
    of ``wandb_internal_pb2.Record`` protobufs."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # the service writes a finished run's file out when it stops (or when the program exits)
    (path,) = run_dir.glob("run-*.wandb")
    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zero padding at the end of a block
            position += block - position % block
            continue
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> dict[int, dict]:
    """``{step: {key: value}}`` of a W&B run's logged history (values as JSON decodes them; a value logged as
    parts, such as a histogram, as a dict of its parts)."""
    history: dict[int, dict] = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in record.history.item:
                *path, last = list(item.nested_key) or [item.key]
                place = row
                for key in path:
                    place = place.setdefault(key, {})
                place[last] = json.loads(item.value_json)
            history.setdefault(row["_step"], {}).update(row)
    return history


def wandb_run(record_type: str, run_dir: Path):
    return next(getattr(r, record_type) for r in wandb_records(run_dir) if r.WhichOneof("record_type") == record_type)


# --- series names ------------------------------------------------------------------------------------------


def test_the_series_names_the_documentation_shows_are_those_given(repo):
    """docs/results.md showed ``agg/fit_kl/pool/channel_2/class_all``; names put the class first."""
    paragraph = (repo / "docs" / "results.md").read_text().split("**Series.**")[1].split("\n\n")[0]
    examples = re.findall(r"`(\w+/\w+/\w+(?:/\w+_\w+)+)`", paragraph.split("told apart")[0])
    assert len(examples) == 2, paragraph
    for example in examples:
        analysis, metric, layer, *keys = example.split("/")
        record = {"analysis": analysis, "metric": metric, "layer": layer}
        record.update(reversed([key.rsplit("_", 1) for key in keys]))  # not in the order of the name
        assert series_name(record) == example


def test_series_names_steps_and_histograms_of_hand_made_records():
    records = [
        {"analysis": "e", "metric": "entropy", "layer": "relu1", "model": "m", "value": 0.5, "class": "all"},
        {"analysis": "e", "metric": "entropy", "layer": "relu1", "model": "m", "value": 0.25, "class": 3},
        # one layer, metric and class: told apart by the key whose values differ (head), not by samples
        {"analysis": "a", "metric": "h", "layer": "attn", "model": "m", "value": 1.0, "head": 0, "samples": 9},
        {"analysis": "a", "metric": "h", "layer": "attn", "model": "m", "value": 2.0, "head": 1, "samples": 9},
        # two bins of a density histogram (width 0.5): masses 0.5·0.4 and 0.5·1.6, edges from centre ± width/2
        *(
            {"analysis": "g", "metric": "histogram", "layer": "pool", "model": "m", "value": v, "unit": "density",
             "bin": i, "bin_center": c, "bin_width": 0.5, "channel": 2}
            for i, (c, v) in enumerate([(1.25, 1.6), (0.75, 0.4)])
        ),
    ]  # fmt: skip
    scalars, histograms = scalars_and_histograms(records)
    assert scalars == {
        "e/entropy/relu1/class_all": 0.5,
        "e/entropy/relu1/class_3": 0.25,
        "a/h/attn/head_0": 1.0,
        "a/h/attn/head_1": 2.0,
    }
    assert histograms == [Histogram("g/histogram/pool/channel_2", [0.5, 1.0, 1.5], [0.2, 0.8])]
    assert series_name({**records[0], "network": "resnet"}) == "e/entropy/resnet/relu1/class_all"
    with pytest.raises(ValueError, match="differ in nothing but their value"):
        scalars_and_histograms([records[0], {**records[0], "value": 0.7}])

    results = layerscope.Results(
        "0",
        {},
        {},
        [
            {"label": "a/epoch_2", "network": "a", "step": 2},
            {"label": "a/epoch_5", "network": "a", "step": 5},
            {"label": "b/first", "network": "b"},
            {"label": "b/second", "network": "b"},
        ],
        [{"model": label, "value": i} for i, label in enumerate(["b/second", "a/epoch_5", "b/first", "a/epoch_2"])],
    )
    steps = [(step, [r["value"] for r in records]) for step, records in checkpoint_steps(results)]
    assert steps == [(0, [2]), (1, [0]), (2, [3]), (5, [1])]  # a checkpoint without a step: its place in its network


# --- from a run --------------------------------------------------------------------------------------------


@needs("tensorboardX")
@needs("tensorboard")
def test_tensorboard_holds_every_record_of_a_run_and_its_figure(aggregation_spec, tmp_path):
    aggregation_spec["outputs"]["formats"] = ["json", "tensorboard"]
    results = layerscope.run(aggregation_spec, progress=False)
    (run,) = (tmp_path / "out" / "tensorboard").iterdir()
    assert run.name == f"gap-{results.runtime['run_id']}"
    assert results.logged_to == [f"tensorboard: {run}"] and results.artifacts == []
    events = tensorboard_runs(tmp_path / "out" / "tensorboard")[run.name]
    scalars = events.scalars
    plain = [r for r in results.records if "bin" not in r]
    assert len(scalars) == len(plain) > 100
    for record in plain:  # event files hold float32
        assert scalars[expected_name(record)] == [(0, np.float32(record["value"]))], record
    assert scalars["agg/fit_kl/gap/class_all/channel_1"]
    bins = [r for r in results.records if r["metric"] == "histogram"]
    histograms = list(events.histograms)
    assert sorted(histograms) == sorted(
        {expected_name({k: v for k, v in r.items() if k not in BIN_KEYS}) for r in bins}
    )
    for tag in histograms:
        ((step, histogram),) = events.histograms[tag]
        members = sorted((r for r in bins if expected_name(r) == tag), key=lambda r: r["bin"])
        width = members[0]["bin_width"]
        assert step == 0 and list(histogram.bucket) == [r["value"] * width for r in members]
        assert list(histogram.bucket_limit) == pytest.approx([r["bin_center"] + width / 2 for r in members])
        assert histogram.min == pytest.approx(members[0]["bin_center"] - width / 2)
    ((step, width, height),) = events.images["figures/agg"]
    assert (step, width > 400, height > 300) == (0, True, True)
    ((_, spec),) = events.texts["spec/text_summary"]
    assert '"aggregation_distribution"' in spec


@needs("tensorboardX")
@needs("tensorboard")
def test_report_logs_again_only_when_asked_and_runs_add_to_the_store(aggregation_spec, tmp_path, capsys):
    """The store in the output folder is not one of the run's files: a second run into the folder adds a run
    to it, ``layerscope report`` rebuilds the files without logging, and logs when --formats names the tracker."""
    aggregation_spec["outputs"]["formats"] = ["json", "csv", "tensorboard"]
    first = layerscope.run(aggregation_spec, progress=False)
    second = layerscope.run(aggregation_spec, progress=False)
    store = tmp_path / "out" / "tensorboard"
    names = [f"gap-{r.runtime['run_id']}" for r in (first, second)]
    assert sorted(p.name for p in store.iterdir()) == sorted(names)
    assert main(["report", str(tmp_path / "out")]) == 0
    assert len(list(store.iterdir())) == 2 and (tmp_path / "out" / "records.csv").is_file()
    assert main(["report", str(tmp_path / "out"), "--formats", "tensorboard"]) == 0  # the second run, again
    assert len(list(store.iterdir())) == 2 and len(list((store / names[1]).iterdir())) == 2  # a new event file
    runs = tensorboard_runs(store)
    first_scalars, second_scalars = runs[names[0]].scalars, runs[names[1]].scalars
    assert second_scalars == {tag: series * 2 for tag, series in first_scalars.items()}
    capsys.readouterr()


@pytest.mark.slow  # over 10 s on a 2-core machine
@needs("mlflow")
def test_mlflow_holds_metrics_params_and_files_of_a_run(aggregation_spec, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    aggregation_spec["outputs"]["formats"] = ["json", "csv", "mlflow"]
    results = layerscope.run(aggregation_spec, progress=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gap").experiment_id])
    assert run.info.run_name == f"gap-{results.runtime['run_id']}" and run.info.status == "FINISHED"
    plain = [r for r in results.records if "bin" not in r]
    assert len(run.data.metrics) == len(plain) > 100
    for record in plain:
        history = client.get_metric_history(run.info.run_id, expected_name(record))
        assert [(m.step, m.value) for m in history] == [(0, record["value"])], record
    params = run.data.params
    assert params["analyses.agg.estimator"] == "aggregation_distribution" and params["analyses.agg.params.bins"] == "10"
    assert params["data.source"] == "npz" and params["outputs.formats"] == '["json", "csv", "mlflow"]'
    assert run.data.tags["layerscope.run_id"] == results.runtime["run_id"]
    artifacts = tmp_path / "out" / "mlartifacts"
    logged = sorted(
        str(p.relative_to(next(artifacts.glob("*/artifacts")))) for p in artifacts.rglob("*") if p.is_file()
    )
    assert logged == ["plots/agg.png", "records.csv", "results.json"]  # no plots format: the figure is drawn for it
    stored = next(artifacts.glob("*/artifacts/results.json")).read_text()
    assert stored == (tmp_path / "out" / "results.json").read_text()


@needs("wandb")
def test_wandb_offline_run_holds_every_record_histogram_and_figure(aggregation_spec, tmp_path, monkeypatch):
    for variable in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    aggregation_spec["outputs"]["formats"] = ["json", "wandb"]
    results = layerscope.run(aggregation_spec, progress=False)
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    assert results.logged_to == [f"wandb: {run_dir}"]
    run = wandb_run("run", run_dir)
    assert (run.project, run.display_name) == ("gap", f"gap-{results.runtime['run_id']}")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["analyses"]["agg"]["params"]["bins"] == 10
    assert config["layerscope"]["run_id"] == results.runtime["run_id"]
    (row,) = wandb_history(run_dir).values()
    assert row["_step"] == 0
    for record in (r for r in results.records if "bin" not in r):
        assert row[expected_name(record)] == record["value"], record
    bins = [r for r in results.records if r["metric"] == "histogram" and r.get("channel") == 0]
    histogram = row["agg/histogram/gap/class_all/channel_0"]
    assert histogram["_type"] == "histogram"
    assert histogram["values"] == pytest.approx([r["value"] * r["bin_width"] for r in bins], rel=1e-6)
    assert row["figures/agg"]["_type"] == "image-file" and list(run_dir.glob("files/media/images/figures/agg_0_*.png"))


# --- Monitor and callbacks ---------------------------------------------------------------------------------


@pytest.mark.slow  # over 10 s on a 2-core machine
@needs("tensorboardX")
@needs("tensorboard")
@needs("wandb")
def test_monitor_logs_each_step_as_it_comes(tmp_path, monkeypatch):
    """The spec's tracker formats log each step at the monitor's step, while training goes on; write() logs
    the figures (at the last step) and does not log the steps again."""
    for variable in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    model, optimiser = small_net(), None
    spec = {**ENTROPY_SPEC, "outputs": {"dir": str(tmp_path / "fit"), "formats": ["json", "tensorboard", "wandb"]}}
    monitor = layerscope.Monitor(spec)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = digits()
    steps = {}
    for step in (0, 5, 9):
        steps[step] = monitor.observe(model, step=step, batch=(x, y))
        store = tmp_path / "fit" / "tensorboard"
        (events,) = tensorboard_runs(store).values()  # on disk as it comes
        assert {s for series in events.scalars.values() for s, _ in series} == set(steps)
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    results = monitor.write(tmp_path / "fit")
    monitor.close()
    assert results.artifacts == [] and len({r["value"] for r in steps[9]} - {r["value"] for r in steps[0]}) > 3
    (events,) = tensorboard_runs(store).values()
    scalars = events.scalars
    assert len(scalars) == len(steps[0])
    for record in results.records:
        assert (record["step"], np.float32(record["value"])) in scalars[expected_name(record)]
    assert all(len(series) == 3 for series in scalars.values())  # write() logged no step again
    assert [step for step, _, _ in events.images["figures/entropy"]] == [9]
    (run_dir,) = (tmp_path / "fit" / "wandb").glob("offline-run-*")
    history = wandb_history(run_dir)
    assert sorted(history) == [0, 5, 9] and "figures/entropy" in history[9]
    for step, records in steps.items():
        for record in records:
            assert history[step][expected_name(record)] == record["value"]
    with pytest.raises(UserError, match="the monitor was closed"):
        monitor.observe(model, step=10, batch=(x, y))


@pytest.mark.slow  # a Python process of its own that imports torch and wandb
@needs("tensorboardX")
@needs("wandb")
def test_a_monitor_left_open_ends_its_tracked_runs_when_the_program_exits(tmp_path, monkeypatch):
    """The callbacks leave the monitor open: at exit its trackers finish before W&B stops its service."""
    for variable in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    script = (
        "import torch, layerscope\n"
        "from tests.test_trackers import ENTROPY_SPEC, digits, small_net\n"
        f"monitor = layerscope.Monitor(ENTROPY_SPEC, log_to=['wandb', 'tensorboard'], log_dir={str(tmp_path)!r})\n"
        "model, batch = small_net(), digits()\n"
        "monitor.observe(model, step=1, batch=batch)\n"
        "monitor.observe(model, step=2, batch=batch)\n"
    )
    root = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert sorted(wandb_history(run_dir)) == [1, 2]
    assert wandb_run("exit", run_dir).exit_code == 0
    (events,) = tensorboard_runs(tmp_path / "tensorboard").values()
    assert {step for series in events.scalars.values() for step, _ in series} == {1, 2}


@pytest.mark.slow  # over 10 s on a 2-core machine
@needs("mlflow")
def test_monitor_mlflow_run_ends_as_failed_when_the_block_raises(tmp_path, monkeypatch):
    """log_to names the tracker, MLFLOW_TRACKING_URI says where its store is; leaving a ``with`` block on an
    exception ends the tracked run as failed."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "training")
    model, batch = small_net(), digits()
    with pytest.raises(RuntimeError, match="diverged"):
        with layerscope.Monitor(ENTROPY_SPEC, log_to=["mlflow"], log_dir=tmp_path / "fit") as monitor:
            first = monitor.observe(model, step=1, batch=batch)
            monitor.observe(model, step=3, batch=batch)
            raise RuntimeError("diverged")
    assert not (tmp_path / "fit").exists()  # the store is the one the variable names
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("training").experiment_id])
    assert run.info.status == "FAILED"
    for record in first:
        history = client.get_metric_history(run.info.run_id, expected_name(record))
        assert [m.step for m in history] == [1, 3] and history[0].value == record["value"]


def test_monitor_log_to_names_trackers_only(tmp_path):
    with pytest.raises(UserError, match="unknown reporter 'tensorbord'. Did you mean 'tensorboard'"):
        layerscope.Monitor(ENTROPY_SPEC, log_to=["tensorbord"])
    with pytest.raises(UserError, match="'csv' writes files rather than log to a tracker"):
        layerscope.Monitor(ENTROPY_SPEC, log_to=["csv"])


@pytest.mark.skipif(importlib.util.find_spec("pytorch_lightning") is None, reason="needs pytorch-lightning")
def test_lightning_callback_logs_through_the_trainers_logger(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    from layerscope.training.lightning_callback import MonitorCallback

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = small_net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self(x), y)
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = digits(400)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100)
    callback = MonitorCallback({**ENTROPY_SPEC, "outputs": {"formats": ["json"]}}, every=2)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=CSVLogger(tmp_path, name="logs"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Classifier(), loader)
    import pandas as pd

    (path,) = (tmp_path / "logs").rglob("metrics.csv")
    table = pd.read_csv(path)
    assert "loss" in table.columns  # the module's own metrics, in the same file
    results = callback.monitor.results()
    assert sorted({r["step"] for r in results.records}) == [2, 4]
    for record in results.records:
        logged = table.loc[table["step"] == record["step"], expected_name(record)].dropna()
        assert list(logged) == [record["value"]], record


@pytest.mark.slow  # imports TensorFlow
@needs("tensorflow")
@needs("tensorboardX")
@needs("tensorboard")
def test_keras_callback_logs_to_tensorboard_beside_keras(tmp_path):
    import keras

    from layerscope.training.keras_callback import MonitorCallback

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = (a.numpy() for a in digits(200))
    logs = tmp_path / "logs"
    callback = MonitorCallback(ENTROPY_SPEC, every=2, batch=(x[:100], y[:100]), log_to=["tensorboard"], log_dir=logs)
    board = keras.callbacks.TensorBoard(log_dir=str(logs))
    model.fit(x, y, batch_size=50, epochs=1, verbose=0, callbacks=[callback, board])
    callback.monitor.close()
    assert (logs / "train").is_dir()  # Keras's own run beside ours
    (events,) = tensorboard_runs(logs / "tensorboard").values()
    scalars = events.scalars
    records = callback.monitor.results().records
    assert sorted({r["step"] for r in records}) == [2, 4]
    for record in records:
        assert (record["step"], np.float32(record["value"])) in scalars[expected_name(record)]


# --- missing packages --------------------------------------------------------------------------------------


def test_a_tracker_without_its_package_is_a_user_error(tmp_path, tiny_onnx):
    """Run where the tracker's package cannot be imported (a meta-path finder refuses it): exit 2, one message
    with the spec's line and the install command, no results.json."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"model: {{source: {tiny_onnx}}}\ndata: {{source: synthetic, samples: 8}}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n"
        f"outputs: {{dir: {tmp_path / 'out'}, formats: [json, tensorboard, wandb]}}\n"
    )
    hide = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('tensorboardX', 'wandb'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "from layerscope.cli.main import main\n"
        f"sys.exit(main(['run', {str(spec)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out" / "results.json").exists()
    assert (
        "spec.yaml:4:" in done.stderr
        and "outputs.formats.1: the tensorboard format needs the tensorboardX" in done.stderr
    )
    assert 'pip install "layerscope[tensorboard]"' in done.stderr and 'pip install "layerscope[wandb]"' in done.stderr


# --- logging a finished run, and trackers that cannot log ---------------------------------------------------


def tiny_run_spec(tmp_path: Path, model: Path, formats: list[str]) -> Path:
    """A spec file running activation_entropy on the tiny MLP over 40 digits into ``tmp_path/out``."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: tiny\nmodel: {{source: {model}}}\ndata: {{source: digits, limit: 40}}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n"
        f"outputs: {{dir: {tmp_path / 'out'}, formats: [{', '.join(formats)}]}}\n"
    )
    return spec


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under *folder* but a tracker's store, by relative path, with its bytes."""
    stores = ("tensorboard", "mlflow.db", "mlartifacts", "wandb")
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in stores
    }


@needs("tensorboardX")
@needs("tensorboard")
def test_report_with_other_formats_keeps_the_runs_files(tmp_path, tiny_onnx, capsys):
    """``report --formats tensorboard`` logs the finished run and prints where; ``--formats parquet`` adds
    records.parquet; every file the run wrote stays as it was, and results.json lists them all."""
    assert main(["run", str(tiny_run_spec(tmp_path, tiny_onnx, ["json", "csv", "plots", "html"])), "--quiet"]) == 0
    out = tmp_path / "out"
    before = folder_files(out)
    listed = json.loads(before["results.json"])["artifacts"]
    assert {"records.csv", "report.html", "plots/e.png"} <= set(listed)
    capsys.readouterr()
    assert main(["report", str(out), "--formats", "tensorboard"]) == 0
    printed = capsys.readouterr().out
    (run,) = (out / "tensorboard").iterdir()
    assert f"logged → tensorboard: {run}" in printed
    assert tensorboard_runs(out / "tensorboard")[run.name].scalars
    after = folder_files(out)
    assert json.loads(after.pop("results.json"))["artifacts"] == listed
    assert after == {name: data for name, data in before.items() if name != "results.json"}
    assert main(["report", str(out), "--formats", "parquet"]) == 0
    assert json.loads((out / "results.json").read_text())["artifacts"] == [*listed, "records.parquet"]
    assert {n: d for n, d in folder_files(out).items() if n in after} == after
    assert "results.json, records.parquet" in capsys.readouterr().out


@needs("mlflow")
def test_mlflow_logging_a_finished_run_gets_all_its_files(tmp_path, tiny_onnx, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert main(["run", str(tiny_run_spec(tmp_path, tiny_onnx, ["json", "csv", "plots", "html"])), "--quiet"]) == 0
    out = tmp_path / "out"
    before = folder_files(out)
    assert main(["report", str(out), "--formats", "mlflow"]) == 0
    assert folder_files(out) == before
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    stored = next((out / "mlartifacts").glob("*/artifacts"))
    logged = {str(p.relative_to(stored)): p.read_bytes() for p in stored.rglob("*") if p.is_file()}
    assert logged == before and run.info.status == "FINISHED"


def tracker_settings(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """Per case: the formats, the environment and the message of a tracker set up so that it cannot log."""
    (tmp_path / "a_file").write_text("not a folder")
    return {
        "tensorboard dir is a file": (
            ["json", "tensorboard"],
            {"LAYERSCOPE_TENSORBOARD_DIR": str(tmp_path / "a_file")},
            f"outputs.formats: tensorboard: LAYERSCOPE_TENSORBOARD_DIR: {tmp_path / 'a_file'} is not a folder",
        ),
        "mlflow uri scheme": (
            ["json", "tensorboard", "mlflow"],
            {"MLFLOW_TRACKING_URI": "foo://bar"},
            "outputs.formats: mlflow: MLFLOW_TRACKING_URI: mlflow has no tracking store for 'foo://bar'",
        ),
        "wandb dir below a file": (
            ["json", "wandb"],
            {"WANDB_DIR": str(tmp_path / "a_file" / "runs")},
            f"outputs.formats: wandb: WANDB_DIR: {tmp_path / 'a_file'} is not a folder",
        ),
    }


@pytest.mark.parametrize("case", ["tensorboard dir is a file", "mlflow uri scheme", "wandb dir below a file"])
def test_a_tracker_that_cannot_log_stops_the_run_before_the_model_runs(case, tmp_path, tiny_onnx, capsys, monkeypatch):
    formats, environment, message = tracker_settings(tmp_path)[case]
    for module in {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}.values():
        if any(module.lower().startswith(f) for f in formats) and importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    spec = tiny_run_spec(tmp_path, tiny_onnx, formats)
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"layerscope: error: {re.escape(str(spec))}:5:\\d+: {re.escape(message)}.*\n", err), err
    assert not (tmp_path / "out").exists()  # no results, no tracker logged (tensorboard comes before mlflow)


@needs("tensorboardX")
def test_report_refuses_a_tracker_that_cannot_log_and_keeps_the_files(tmp_path, tiny_onnx, capsys, monkeypatch):
    assert main(["run", str(tiny_run_spec(tmp_path, tiny_onnx, ["json", "csv"])), "--quiet"]) == 0
    before = folder_files(tmp_path / "out")
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("LAYERSCOPE_TENSORBOARD_DIR", str(tmp_path / "a_file"))
    capsys.readouterr()
    assert main(["report", str(tmp_path / "out"), "--formats", "tensorboard"]) == 2
    assert capsys.readouterr().err.startswith("layerscope: error: --formats: tensorboard: LAYERSCOPE_TENSORBOARD_DIR")
    assert folder_files(tmp_path / "out") == before


@needs("tensorboardX")
@needs("wandb")
def test_a_tracker_failing_after_the_files_are_written_says_they_are_complete(tmp_path, tiny_onnx, capsys, monkeypatch):
    """W&B online without credentials (which cannot be checked beforehand) fails once the files are in place:
    exit 2, and the message says the results are complete, where, what logged already and how to log them."""
    import wandb

    wandb.teardown()  # a W&B service an earlier test started keeps the settings it started with
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR", "LAYERSCOPE_TENSORBOARD_DIR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # should it reach for the server: nothing listens
    spec = tiny_run_spec(tmp_path, tiny_onnx, ["json", "csv", "tensorboard", "wandb"])
    assert main(["run", str(spec)]) == 2
    out = tmp_path / "out"
    err = capsys.readouterr().err
    (tensorboard_run,) = (out / "tensorboard").iterdir()
    assert re.match(f"layerscope: error: {re.escape(str(spec))}:5:\\d+: outputs.formats: wandb: cannot log to ", err)
    assert "No API key configured" in err and (
        f". The run's files are complete in {out} (results.json and its artifacts); it was logged to "
        f"tensorboard: {tensorboard_run}; log them with: layerscope report {out} --formats wandb" in err
    ), err
    assert "Traceback" not in err and err.count("error:") == 1
    assert json.loads((out / "results.json").read_text())["artifacts"] == ["records.csv"]


@needs("tensorboardX")
def test_two_logs_of_a_run_in_one_second_keep_both_event_files(aggregation_spec, tmp_path):
    """tensorboardX names event files by the second and the host: a run logged again within the same second
    (``report --formats tensorboard`` right after the run) overwrote the first file."""
    import time

    from layerscope.plugins.reporters.tensorboard_tracker import TensorBoardReporter

    results = layerscope.run(aggregation_spec, write=False, progress=False)
    while True:  # two writers opened within one second of the clock
        second = int(time.time())
        reporters = [TensorBoardReporter(), TensorBoardReporter()]
        for reporter in reporters:
            reporter.start(results, tmp_path)
        if int(time.time()) == second:
            break
        for reporter in reporters:
            reporter.finish()
    for reporter in reporters:
        reporter.finish()
    (run,) = (tmp_path / "tensorboard").iterdir()
    assert len(list(run.iterdir())) == 2
