"""Adapters give the same tensors as the framework itself."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

import layerscope
from layerscope.adapters.torch_export import export_to_onnx
from layerscope.graph.tensors import describe_tensors
from layerscope.testing import assert_records_close
from layerscope.util.errors import UserError

from .conftest import tiny_mlp_proto, write_spec


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.head = torch.nn.Sequential(torch.nn.Linear(4 * 4 * 4, 12), torch.nn.Tanh(), torch.nn.Linear(12, 10))

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def make_cnn() -> SmallCNN:
    torch.manual_seed(3)
    return SmallCNN().eval()


def hooked_activations(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Module outputs captured with forward hooks, keyed by module path."""
    captured = {}
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o.detach().numpy()))
        for name, module in model.named_modules()
        if name and not list(module.children())
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return captured


def run_onnx_all(proto: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every observable tensor of *proto* by layer name, through the real runner."""
    from layerscope.engine.runner import Runner

    tensors = describe_tensors(proto)
    fetch = [t for t in tensors if t.observable and t.role != "input"]
    runner = Runner(proto, tensors, [(t.name,) for t in fetch], "cpu", 2**30, len(x))
    out = {}
    for _, fetched in runner.run(runner.prepare(x)):
        out.update({name: value.numpy() for name, value in fetched.items()})
    return {t.layer: out[t.name] for t in fetch}


def digits_images(n=32) -> np.ndarray:
    from layerscope.plugins.data.digits import load_digits_split

    return load_digits_split("all")[0][:n].reshape(n, 1, 8, 8)


def assert_layers_match(onnx_by_layer, hooked):
    compared = 0
    for layer, expected in hooked.items():
        if layer in onnx_by_layer:
            np.testing.assert_allclose(onnx_by_layer[layer], expected, atol=1e-5, rtol=1e-5)
            compared += 1
    assert compared >= 5, f"only {compared} layers matched: {sorted(onnx_by_layer)} vs {sorted(hooked)}"


def test_torch_module_matches_forward_hooks():
    model, x = make_cnn(), digits_images()
    proto = export_to_onnx(model, x[:2])
    assert_layers_match(run_onnx_all(proto, x), hooked_activations(model, torch.from_numpy(x)))


def test_pt2_matches_forward_hooks(tmp_path):
    model, x = make_cnn(), digits_images()
    program = torch.export.export(model, (torch.from_numpy(x[:4]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "cnn.pt2")
    spec = {
        "model": {"source": str(tmp_path / "cnn.pt2")},
        "data": {"source": "digits", "layout": "image", "limit": 64},
        "analyses": [{"id": "ent", "estimator": "activation_entropy"}],
    }
    results = layerscope.run(spec, write=False, progress=False)
    assert {r["layer"] for r in results.records} == {"features.1", "head.1"}
    from layerscope.adapters.torch_export import _load_pt2

    proto = export_to_onnx(_load_pt2(tmp_path / "cnn.pt2"))
    assert_layers_match(run_onnx_all(proto, x), hooked_activations(model, torch.from_numpy(x)))


def test_module_through_python_api_keeps_module_paths():
    spec = {
        "model": {"source": make_cnn()},
        "data": {"source": "digits", "layout": "image", "limit": 100},
        "analyses": [{"id": "ent", "estimator": "activation_entropy"}],
    }
    results = layerscope.run(spec, write=False, progress=False)
    assert {r["layer"] for r in results.records} == {"features.1", "head.1"}
    assert results.models[0]["framework"] == "pytorch"
    assert results.spec["model"]["source"].endswith("SmallCNN object>")


def test_python_factory_with_weights(tmp_path):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))\n"
    )
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    torch.save(net.state_dict(), tmp_path / "net.pt")
    spec = write_spec(
        tmp_path,
        "model: {python: 'mynets:make', weights: net.pt}\n"
        "data: {source: digits, limit: 200, shuffle: false}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n",
    )
    results = layerscope.run(spec, write=False, progress=False)
    x = torch.from_numpy(digits_images(200).reshape(200, 64))
    with torch.no_grad():
        on = (net[1](net[0](x)) > 0).double().mean(0)
    from layerscope.plugins.activation_entropy.estimator import binary_entropy_bits

    expected = float(binary_entropy_bits(on).mean())
    (got,) = [r["value"] for r in results.select(metric="entropy", **{"class": "all"})]
    assert got == pytest.approx(expected, abs=1e-9)


def test_a_factory_checkpoint_that_cannot_be_loaded_is_named_at_checkpoints(tmp_path):
    """The error named model.weights, a key the spec did not have."""
    (tmp_path / "ckptnets.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU())\n"
    )
    torch.save(torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU()).state_dict(), tmp_path / "w_1.pt")
    (tmp_path / "w_2.pt").write_bytes(b"not a checkpoint")
    spec = write_spec(
        tmp_path,
        "model: {python: 'ckptnets:make', checkpoints: [w_1.pt, w_2.pt]}\n"
        "data: {source: digits, limit: 20}\nanalyses: [{id: e, estimator: activation_entropy}]\n",
    )
    with pytest.raises(UserError) as raised:
        layerscope.run(spec, write=False, progress=False)
    assert re.fullmatch(
        r".*spec.yaml:1:\d+: model.checkpoints: cannot load .*w_2.pt into 'ckptnets:make': it is not a file of "
        r"tensors alone \(Unsupported operand \d+\)",
        str(raised.value),
    ), str(raised.value)  # one line, without torch's advice to load it with weights_only=False


USER_MODULE = """\
import torch

SCALE = 1 / 0 if __name__.endswith("broken") else 1


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def data_dependent():
    return DataDependent()


def raising():
    return {}["missing"]
"""


@pytest.mark.parametrize(
    "reference, message",
    [
        ("nowhere:make", r"model.python: importing 'nowhere' failed: ModuleNotFoundError: No module named 'nowhere'$"),
        (
            "usermodels_broken:data_dependent",
            r"model.python: importing 'usermodels_broken' failed: "
            r"ZeroDivisionError: division by zero \(.*usermodels_broken.py:3\)$",
        ),
        (
            "usermodels:raising",
            r"model.python: calling 'usermodels:raising' failed: KeyError: 'missing' \(.*usermodels.py:22\)$",
        ),
        ("usermodels:absent", r"model.python: 'usermodels' has no function 'absent'$"),
        (
            "usermodels:data_dependent",
            r"model.source: torch.onnx.export could not export the model: "
            r"GuardOnDataDependentSymNode: Could not guard on data-dependent expression .* "
            r"\(at .*usermodels.py:12 in forward: if x.sum\(\) > 0:\); change the model so that",
        ),
    ],
)
@pytest.mark.slow
def test_failures_in_the_users_model_code_are_one_clear_message(tmp_path, reference, message):
    """Run as users run it: in a process of its own, where torch's prints and logs would reach the terminal."""
    import re
    import subprocess
    import sys

    (tmp_path / "usermodels.py").write_text(USER_MODULE)
    (tmp_path / "usermodels_broken.py").write_text(USER_MODULE)
    spec = write_spec(
        tmp_path,
        f"model: {{python: '{reference}'}}\ndata: {{source: digits, limit: 20}}\n"
        f"analyses: [{{id: e, estimator: activation_entropy}}]\noutputs: {{dir: {tmp_path}}}\n",
    )
    done = subprocess.run(
        [sys.executable, "-m", "layerscope", "run", str(spec), "--quiet"], capture_output=True, text=True, timeout=300
    )
    out, err = done.stdout, done.stderr
    assert done.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and not out.strip(), err
    assert "\x1b" not in err and "Traceback" not in err
    assert re.search(message, err.strip().removeprefix("layerscope: error: ")), err


def test_onnx_external_data_and_checkpoints(tmp_path):
    for epoch in (1, 2, 10):
        onnx.save(
            tiny_mlp_proto(seed=epoch),
            str(tmp_path / f"epoch_{epoch}.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"epoch_{epoch}.onnx.data",
            size_threshold=0,
        )
    assert (tmp_path / "epoch_10.onnx.data").exists()
    spec = write_spec(
        tmp_path,
        "model: {source: epoch_1.onnx, checkpoints: 'epoch_*.onnx'}\n"
        "data: {source: digits, limit: 100}\n"
        "analyses: [{id: e, estimator: activation_entropy}]\n",
    )
    results = layerscope.run(spec, write=False, progress=False)
    assert [m["label"] for m in results.models] == ["epoch_1", "epoch_2", "epoch_10"]
    values = {
        m: results.select(model=m, metric="entropy", layer="act1", **{"class": "all"})[0]["value"]
        for m in ("epoch_1", "epoch_2", "epoch_10")
    }
    assert len(set(values.values())) == 3  # different weights, different numbers


def test_demo_zoo_checkpoints_and_layer_names():
    spec = {
        "model": {"source": "demo:digits-mlp", "checkpoints": ["epoch_01", "epoch_1*"]},
        "data": {"source": "digits", "split": "test", "limit": 100},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
    }
    results = layerscope.run(spec, write=False, progress=False)
    assert [m["label"] for m in results.models] == ["epoch_01", "epoch_10"]
    assert results.models[-1]["test_accuracy"] > 0.9
    assert {r["layer"] for r in results.records} == {"relu1", "relu2", "relu3"}


# --- exporting once --------------------------------------------------------------------------------------------

FACTORIES = """\
import torch


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))


def with_batchnorm():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(256, 10))
"""


@pytest.fixture
def counted_exports(monkeypatch, tmp_path):
    """Counts real torch.onnx.export calls (each still runs); a private export cache."""
    monkeypatch.setenv("LAYERSCOPE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = torch.onnx.export

    def export(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    return calls


def factory_spec(tmp_path, factory: str, checkpoints: int, layout: str = "flat") -> dict:
    (tmp_path / "nets.py").write_text(FACTORIES)
    import importlib
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        nets = importlib.reload(importlib.import_module("nets"))
    finally:
        sys.path.remove(str(tmp_path))
    for index in range(checkpoints):
        model = getattr(nets, factory)()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.2 * index * torch.randn_like(parameter))
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("running_mean"):
                buffer.add_(0.05 * index)
        torch.save(model.state_dict(), tmp_path / f"epoch_{index + 1}.pt")
    return {
        "model": {"python": f"nets:{factory}", "checkpoints": str(tmp_path / "epoch_*.pt")},
        "data": {"source": "digits", "limit": 60, "layout": layout},
        "analyses": [{"id": "e", "estimator": "activation_entropy", "params": {"variant": "histogram"}}],
    }


@pytest.mark.slow
@pytest.mark.parametrize("factory, layout", [("mlp", "flat"), ("with_batchnorm", "image")])
def test_checkpoints_of_one_factory_are_traced_once(tmp_path, counted_exports, monkeypatch, factory, layout):
    """Weights swapped into the unoptimised graph and optimised (BatchNorm folded per checkpoint) give the
    records of exporting every checkpoint on its own."""
    spec = factory_spec(tmp_path, factory, checkpoints=4, layout=layout)
    swapped = layerscope.run(spec, write=False, progress=False)
    assert len(counted_exports) == 1 and len(swapped.models) == 4
    monkeypatch.setenv("LAYERSCOPE_EXPORT_CACHE", "0")
    monkeypatch.setattr("layerscope.adapters.torch_export.with_weights", lambda proto, state, unused: None)
    separately = layerscope.run(spec, write=False, progress=False)  # every checkpoint traced on its own
    assert len(counted_exports) == 5
    assert swapped.records == separately.records
    entropies = {
        r["model"]: r["value"]
        for r in swapped.select(metric="entropy", **{"class": "all"})
        if r["layer"] == swapped.records[0]["layer"]
    }
    assert len(set(entropies.values())) == 4  # four different models, not one graph four times


def test_a_second_run_reads_the_export_cache_and_a_code_change_invalidates_it(tmp_path, counted_exports):
    spec = factory_spec(tmp_path, "mlp", checkpoints=1)
    first = layerscope.run(spec, write=False, progress=False)
    second = layerscope.run(spec, write=False, progress=False)
    assert len(counted_exports) == 1 and second.records == first.records
    assert len(list((tmp_path / "cache" / "exports").glob("*/model.onnx"))) == 1
    (tmp_path / "nets.py").write_text(FACTORIES + "\n# edited\n")
    layerscope.run(spec, write=False, progress=False)
    assert len(counted_exports) == 2


def test_weights_are_never_swapped_into_a_graph_with_folded_constants():
    """An optimised export keeps a convolution's name for BatchNorm-folded weights: refused."""
    from layerscope.adapters.export_cache import with_weights
    from layerscope.adapters.torch_export import export_to_onnx, export_unoptimized

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    example = np.zeros((2, 1, 8, 8), np.float32)
    state = model.state_dict()
    assert with_weights(export_to_onnx(model, example), state) is None
    assert with_weights(export_unoptimized(model, example), state, unused=True) is not None


def test_live_modules_that_differ_only_in_an_activation_do_not_share_an_export(tmp_path, counted_exports):
    """Same parameters, same container class: the module tree tells ReLU from Tanh."""
    results = []
    for activation in (torch.nn.ReLU, torch.nn.Tanh):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 8), activation(), torch.nn.Linear(8, 10))
        spec = {
            "model": {"source": model},
            "data": {"source": "digits", "limit": 30},
            "analyses": [{"id": "e", "estimator": "activation_entropy", "on": "all"}],
        }
        results.append(layerscope.run(spec, write=False, progress=False))
    assert len(counted_exports) == 2
    assert {r["tensor"] for r in results[0].records} != {r["tensor"] for r in results[1].records} or results[
        0
    ].records != results[1].records


def test_a_large_model_is_exported_straight_to_a_file_beside_its_weights(tmp_path, counted_exports, monkeypatch):
    """Past LARGE_MODEL_BYTES a module is exported into the cache with its weights in a file beside the
    graph (never an ONNX copy of them in memory): the records equal the in-memory export's, and the run
    holds the graph alone."""
    spec = factory_spec(tmp_path, "with_batchnorm", checkpoints=1, layout="image")
    small = layerscope.run(spec, write=False, progress=False)
    monkeypatch.setenv("LAYERSCOPE_CACHE", str(tmp_path / "large-cache"))
    monkeypatch.setattr("layerscope.adapters.torch_export.LARGE_MODEL_BYTES", 0)
    large = layerscope.run(spec, write=False, progress=False)
    assert len(counted_exports) == 2
    (entry,) = (tmp_path / "large-cache" / "exports").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["about.json", "model.onnx", "model.onnx.data"]
    assert (entry / "model.onnx").stat().st_size < (entry / "model.onnx.data").stat().st_size
    assert_records_close(large.records, small.records, rtol=1e-6, atol=1e-6)


def test_a_model_in_training_is_analysed_as_it_predicts_and_keeps_training(monkeypatch):
    """An export (run or trace) reads the model in eval mode, dropout off and BatchNorm on its running
    statistics, and leaves every module's own mode as it found it: a run in the middle of training used to
    leave the model in eval mode for the rest of the training."""
    monkeypatch.setenv("LAYERSCOPE_EXPORT_CACHE", "0")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(32, 10),
    )
    model.train()
    model[3].eval()  # modes may differ between modules
    spec = {"data": {"source": "digits", "limit": 64}, "analyses": [{"id": "e", "estimator": "activation_entropy"}]}
    training = layerscope.run({**spec, "model": {"source": model}}, write=False, progress=False)
    assert [module.training for module in model] == [True, True, True, False, True] and model.training
    x = torch.from_numpy(digits_images(8).reshape(8, 64).astype(np.float32))
    traced = layerscope.trace(model, x.numpy(), on={"layer": "2"}, progress=False)
    assert [module.training for module in model] == [True, True, True, False, True] and model.training
    with torch.no_grad():
        expected = torch.relu(model[1].eval()(model[0](x))).numpy()
    np.testing.assert_allclose(next(iter(traced.values())), expected, rtol=1e-5, atol=1e-6)
    evaluated = layerscope.run({**spec, "model": {"source": copy_in_eval_mode(model)}}, write=False, progress=False)
    assert_records_close(training.records, evaluated.records, rtol=1e-9, atol=1e-9)


def copy_in_eval_mode(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).eval()
