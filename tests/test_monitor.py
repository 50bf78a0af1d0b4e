"""layerscope.Monitor: analyses of a live model during training, exported once, equal to a run over the
same weights saved as checkpoints; the Keras and PyTorch Lightning callbacks built on it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import layerscope
from layerscope.adapters import torch_export
from layerscope.engine import checkpoint_run
from layerscope.plugins.data.digits import load_digits_split
from layerscope.testing import assert_records_close
from layerscope.util.errors import UserError

NETS = textwrap.dedent("""
    import torch
    from torch import nn

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(144, 32), nn.Tanh(), nn.Linear(32, 10))

    def batchnorm_cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Flatten(), nn.Linear(144, 32), nn.Tanh(), nn.Linear(32, 10))

    class Block(nn.Module):  # ResNet's basic block: convolutions without bias, each followed by a BatchNorm
        def __init__(self, width):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

    def resnet_like():
        torch.manual_seed(0)
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1, bias=False),
                             nn.BatchNorm2d(32), nn.ReLU(), Block(32), nn.Flatten(), nn.Linear(32 * 64, 10))
""")

ANALYSES = [
    {"id": "ip", "estimator": "information_plane", "params": {"smoothing": 0.9, "sigma_grid": 40}},
    {"id": "entropy", "estimator": "activation_entropy"},
    {"id": "signature", "estimator": "nonlinearity_signature"},
]


@pytest.fixture
def nets(tmp_path, monkeypatch):
    (tmp_path / "monitored_nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("monitored_nets", None)
    import monitored_nets

    return monitored_nets


def digits(start: int, count: int = 100):
    x, y = load_digits_split("train")
    return torch.from_numpy(x[start : start + count]), torch.from_numpy(y[start : start + count])


def train_step(model, optimiser, x, y) -> None:
    optimiser.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimiser.step()


def counting(monkeypatch, function: str, module=torch_export) -> list:
    """Calls of ``<module>.<function>`` from now on (one entry each)."""
    calls = []
    real = getattr(module, function)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, function, counted)
    return calls


@pytest.mark.parametrize("net", ["cnn", "batchnorm_cnn"])
def test_monitor_equals_a_run_over_saved_checkpoints_and_exports_once(nets, tmp_path, monkeypatch, net):
    """Exported once and described once (shape inference at the first step only); optimised three times in four
    steps: the export, the second step's swap, and the second optimisation that checks how the optimised graph's
    weights follow from the module's (copied, or BatchNorm folded into the convolution), after which they are
    computed into it without the optimiser. The sessions of the first step are kept and their weights refilled at
    every later one: three sessions (two fetch groups and the signature's pass) and one more for each to check its
    first reuse."""
    exports, optimised = counting(monkeypatch, "export_unoptimized"), counting(monkeypatch, "optimized")
    described = counting(monkeypatch, "describe_tensors", checkpoint_run)
    model = getattr(nets, net)()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = digits(0)
    budget = {"memory_budget": "120KiB"}  # the information plane's batches are fetched in two groups
    monitor = layerscope.Monitor({"model": {}, "data": {"shuffle": False}, "runtime": budget, "analyses": ANALYSES})
    for step in range(4):
        train_step(model, optimiser, *digits(100 + 100 * step))
        monitor.observe(model, step=step * 10, batch=probe)
        torch.save(model.state_dict(), tmp_path / f"step_{step * 10}.pt")
        assert model.training  # the monitor leaves the training mode as it was
    assert len(exports) == 1 and len(optimised) == 3 and len(described) == 1
    kept = monitor._sessions
    assert kept.trusted is True and (kept.made, kept.reused) == (6, 9)
    monitored = monitor.results()
    assert monitor.steps == [0, 10, 20, 30] and monitored.runtime["monitor"] == {"steps": [0, 10, 20, 30]}
    assert [m["fetch_groups"][0] for m in monitored.models] == [2] * 4

    spec = {
        "model": {"python": f"monitored_nets:{net}", "checkpoints": str(tmp_path / "step_*.pt")},
        "data": {"shuffle": False},
        "runtime": budget,
        "analyses": ANALYSES,
    }
    saved = layerscope.run(spec, data=probe, write=False, progress=False)

    def keyed(results):
        return {
            (r["step"], r["analysis"], r["tensor"], r["metric"], r.get("class")): r["value"] for r in results.records
        }

    expected, got = keyed(saved), keyed(monitored)
    assert got.keys() == expected.keys() and len(got) > 100
    assert {key[0] for key in got} == {0, 10, 20, 30}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    tensor = next(key[2] for key in got if key[1] == "ip" and key[3] == "sigma_optimal")
    sigmas = [got[(s, "ip", tensor, "sigma", None)] for s in (0, 10, 20, 30)]
    optimal = [got[(s, "ip", tensor, "sigma_optimal", None)] for s in (0, 10, 20, 30)]
    for previous, used, best in zip(sigmas, sigmas[1:], optimal[1:]):  # the paper's moving average
        assert used == pytest.approx(0.9 * previous + 0.1 * best, rel=1e-12)


def test_monitor_computes_folded_batchnorm_weights_with_the_records_of_the_optimiser(nets, monkeypatch):
    """A ResNet-like model trained in train mode (the BatchNorms' running statistics move too): from the third
    step on the folded convolution weights are computed from the module's state, without the optimiser, and
    every step's records are those of a monitor that optimises at every step (bit for bit) and of a fresh run
    on the same weights."""
    from layerscope.adapters.refill import FoldedBias, FoldedWeight

    spec = {
        "model": {},
        "data": {"shuffle": False},
        "analyses": [ANALYSES[1], {**ANALYSES[2], "params": {"samples": 64}}],
    }
    model = nets.resnet_like()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = digits(0)
    optimised = counting(monkeypatch, "optimized")
    monitor = layerscope.Monitor(spec)
    states, fresh = [], []
    for step in range(5):
        train_step(model, optimiser, *digits(100 + 100 * step))
        monitor.observe(model, step=step, batch=probe)
        states.append({name: value.clone() for name, value in model.state_dict().items()})
        fresh.append(layerscope.run({**spec, "model": {"source": model}}, data=probe, write=False, progress=False))
    assert len(optimised) - 5 == 3  # the five fresh runs' exports, and the monitor's three
    refills = [r for r in monitor._adapter._refills.values() if r is not None]
    kinds = [type(d) for r in refills for d in r.derived.values()]
    assert kinds.count(FoldedWeight) == 3 and kinds.count(FoldedBias) == 3
    monitored = monitor.results()

    monkeypatch.setattr(torch_export, "learn_refill", lambda *args: None)  # the optimiser at every step
    replayed, slow = nets.resnet_like(), layerscope.Monitor(spec)
    for step, state in enumerate(states):
        replayed.load_state_dict(state)
        slow.observe(replayed, step=step, batch=probe)
    assert len(optimised) - 5 == 3 + 5
    assert {
        (r["step"], r["analysis"], r["tensor"], r["metric"], r.get("class")): r["value"] for r in monitored.records
    } == {
        (r["step"], r["analysis"], r["tensor"], r["metric"], r.get("class")): r["value"] for r in slow.results().records
    }
    for step, run in enumerate(fresh):  # float32 round-off apart: the monitor's kept sessions run at
        # onnxruntime's extended optimisation level, a run's at its full one (convolutions summed in another order)
        got = [r for r in monitored.records if r["step"] == step]
        assert_records_close(got, [{**r, "model": f"step_{step}", "step": step} for r in run.records], rtol=1e-6)
    entropies = {(r["step"], r["tensor"]): r["value"] for r in monitored.records if r["metric"] == "entropy"}
    assert {v for (step, _), v in entropies.items() if step == 0} != {
        v for (step, _), v in entropies.items() if step == 4
    }


def test_a_large_graph_gets_a_runs_sessions_at_every_step(nets, monkeypatch):
    """A graph with more weights than a kept session pays for (``KEPT_BYTES``, here lowered to 0) gets a new
    session at every step, made as a run makes its sessions (here two fetch groups sharing the weights): its
    records are a fresh run's, to 1e-9."""
    from layerscope.engine import reused_sessions

    monkeypatch.setattr(reused_sessions, "KEPT_BYTES", 0)
    spec = {
        "model": {},
        "data": {"shuffle": False},
        "runtime": {"memory_budget": "2MiB"},  # the information plane's activations fetched in two groups
        "analyses": [{"id": "ip", "estimator": "information_plane", "params": {"sigma_grid": 40}}, ANALYSES[1]],
    }
    model = nets.resnet_like()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = digits(0)
    monitor = layerscope.Monitor(spec)
    for step in range(3):
        train_step(model, optimiser, *digits(100 + 100 * step))
        got = monitor.observe(model, step=step, batch=probe)
        fresh = layerscope.run({**spec, "model": {"source": model}}, data=probe, write=False, progress=False)
        assert_records_close(got, [{**r, "model": f"step_{step}", "step": step} for r in fresh.records])
        assert fresh.models[0]["fetch_groups"][0] == 2
    assert monitor._sessions.reused == 0 and monitor._sessions.made == 4 * 3  # four sessions a step, none kept


def test_monitor_on_the_specs_data_and_its_output_files(nets, tmp_path):
    model = nets.cnn()
    monitor = layerscope.Monitor(
        {
            "model": {},
            "data": {"source": "digits", "limit": 100},
            "analyses": [{"id": "entropy", "estimator": "activation_entropy"}],
            "outputs": {"formats": ["json", "csv"]},
        }
    )
    first = monitor.observe(model, step=0)
    assert first and all(r["step"] == 0 and r["model"] == "step_0" for r in first)
    monitor.observe(model, step=5)
    results = monitor.write(tmp_path / "out")
    assert (tmp_path / "out" / "results.json").is_file() and "records.csv" in results.artifacts
    assert layerscope.Results.load(tmp_path / "out").runtime["monitor"] == {"steps": [0, 5]}
    assert [m["step"] for m in results.models] == [0, 5]


def test_monitor_refuses_steps_out_of_order_and_results_before_any_step(nets):
    monitor = layerscope.Monitor({"model": {}, "analyses": [{"id": "entropy", "estimator": "activation_entropy"}]})
    with pytest.raises(UserError, match="no step was observed"):
        monitor.results()
    model = nets.cnn()
    monitor.observe(model, step=3, batch=digits(0))
    for step, message in (
        (3, "does not follow step 3"),
        (1, "does not follow"),
        (-1, "whole number"),
        (2.5, "whole number"),
    ):
        with pytest.raises(UserError, match=message):
            monitor.observe(model, step=step, batch=digits(0))
    with pytest.raises(UserError, match="2 labels for 100 samples"):
        monitor.observe(model, step=4, batch=(digits(0)[0], np.array([1, 2])))


HIDDEN_IMPORT = """
import sys
sys.modules[{hidden!r}] = None  # as if the package were not installed
from layerscope.training.lightning_callback import MonitorCallback
print(MonitorCallback.__mro__[1].__module__)
"""


@pytest.mark.slow  # a fresh interpreter importing Lightning
@pytest.mark.parametrize("installed, hidden", [("lightning", "pytorch_lightning"), ("pytorch_lightning", "lightning")])
def test_the_lightning_callback_needs_only_one_lightning_package(installed, hidden):
    """With only ``lightning`` (what the extra installs) or only the older ``pytorch-lightning``, the callback is
    that package's ``Callback``."""
    if importlib.util.find_spec(installed) is None:
        pytest.skip(f"needs {installed}")
    done = subprocess.run(
        [sys.executable, "-c", HIDDEN_IMPORT.format(hidden=hidden)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-800:]
    assert done.stdout.split()[-1].startswith(installed)


def test_the_lightning_callback_without_lightning_says_what_to_install():
    hide_both = "import sys\nsys.modules['lightning'] = None\n" + HIDDEN_IMPORT.format(hidden="pytorch_lightning")
    done = subprocess.run([sys.executable, "-c", hide_both], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: layerscope's Lightning callback needs Lightning: "
        'pip install "layerscope[lightning]" (or lightning)'
    )


@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_lightning_callback_observes_the_training_batches(tmp_path, package):
    """The callback with the trainer of the ``lightning`` package (what the extra installs) and of the older
    standalone ``pytorch-lightning``, where installed."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"needs {package}")
    pl = importlib.import_module("lightning.pytorch" if package == "lightning" else package)

    from layerscope.training.lightning_callback import MonitorCallback

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = digits(0, 400)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100)
    callback = MonitorCallback(
        {
            "model": {},
            "analyses": [{"id": "entropy", "estimator": "activation_entropy"}],
            "outputs": {"formats": ["json"]},
        },
        every=2,
        out_dir=tmp_path / "fit",
    )
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Classifier(), loader)
    assert callback.monitor.steps == [2, 4]
    results = layerscope.Results.load(tmp_path / "fit")
    assert sorted({r["step"] for r in results.records}) == [2, 4]


@pytest.mark.slow  # imports TensorFlow
@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs the tensorflow extra")
def test_keras_callback_converts_once_and_follows_the_weights(monkeypatch):
    import keras

    from layerscope.adapters import tensorflow as tf_adapter
    from layerscope.training.keras_callback import MonitorCallback

    conversions = []
    real = tf_adapter._convert
    monkeypatch.setattr(tf_adapter, "_convert", lambda *a: conversions.append(1) or real(*a))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = (a.numpy() for a in digits(0, 200))
    probe = (x[:100].reshape(-1, 8, 8, 1), y[:100])
    callback = MonitorCallback(
        {"model": {}, "analyses": [{"id": "signature", "estimator": "nonlinearity_signature"}]}, every=2, batch=probe
    )
    model.fit(x.reshape(-1, 8, 8, 1), y, batch_size=50, epochs=1, verbose=0, callbacks=[callback])
    assert callback.monitor.steps == [2, 4] and len(conversions) == 1
    # the swapped graph is the model as trained: its output equals Keras's own
    adapter = callback.monitor._adapter
    loaded = adapter.follow(model, "now", None, probe[0][:2])
    import onnxruntime

    session = onnxruntime.InferenceSession(loaded.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: probe[0]})[0]
    assert np.allclose(got, np.asarray(model(probe[0], training=False)), atol=1e-5)
    assert len(conversions) == 1


@pytest.mark.slow
def test_monitor_follows_a_token_model_fetched_in_several_groups(tmp_path):
    """A BERT classifier (token ids and masks, int64) trained for three steps under a memory budget that
    splits the fetches (into micro-batches: both estimators accept them): each monitored step equals a fresh
    run (a new export) of the model as it was then, and the monitor exported once."""
    transformers = pytest.importorskip("transformers")
    from .test_transformers import tiny, token_data

    path, _, labels = token_data(tmp_path, samples=24)
    arrays = np.load(path)
    inputs = {"input_ids": torch.from_numpy(arrays["ids"]), "attention_mask": torch.from_numpy(arrays["mask"])}
    batch = (inputs, torch.from_numpy(labels))
    spec = {
        "model": {},
        "data": {"shuffle": False, "batch_size": 8},
        "runtime": {"memory_budget": "96KiB"},
        "analyses": [
            {"id": "entropy", "estimator": "activation_entropy"},
            {"id": "signature", "estimator": "nonlinearity_signature", "params": {"samples": 24}},
        ],
    }
    model = tiny("bert")
    assert isinstance(model, transformers.BertForSequenceClassification)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor = layerscope.Monitor(spec)
    fresh = []
    for step in range(3):
        optimiser.zero_grad()
        model(**inputs, labels=batch[1]).loss.backward()
        optimiser.step()
        monitor.observe(model, step=step, batch=batch)
        fresh.append(layerscope.run({**spec, "model": {"source": model}}, data=batch, write=False, progress=False))
    monitored = monitor.results()
    unbudgeted = layerscope.run(
        {**spec, "model": {"source": model}, "runtime": {}}, data=batch, write=False, progress=False
    )
    assert unbudgeted.models[0]["peak_fetched_bytes"] > 96 * 1024  # so the budget splits the fetches
    assert all(m["peak_fetched_bytes"] <= 96 * 1024 for m in monitored.models)
    for step, run in enumerate(fresh):
        got = [r for r in monitored.records if r["step"] == step]
        expected = [{**r, "model": f"step_{step}", "step": step} for r in run.records]
        assert_records_close(got, expected, rtol=1e-9, atol=1e-9)
    steps = {
        s: {
            (r["tensor"], r.get("class")): r["value"]
            for r in monitored.records
            if r["step"] == s and r["metric"] == "affinity_score"
        }
        for s in range(3)
    }
    assert steps[0] != steps[2]  # the weights did change between steps
