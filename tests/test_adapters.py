"""Adapters give the same tensors as the framework itself."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import layerscope
from layerscope.adapters.torch_export import export_to_onnx
from layerscope.graph import describe_tensors

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
    handles = [module.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o.detach().numpy()))
               for name, module in model.named_modules() if name and not list(module.children())]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return captured


def run_onnx_all(proto: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every observable tensor of *proto* by layer name, through the real runner."""
    from layerscope.runner import Runner

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
    program = torch.export.export(model, (torch.from_numpy(x[:4]),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "cnn.pt2")
    spec = {"model": {"source": str(tmp_path / "cnn.pt2")}, "data": {"source": "digits", "layout": "image", "limit": 64},
            "analyses": [{"id": "ent", "estimator": "activation_entropy"}]}
    results = layerscope.run(spec, write=False, progress=False)
    assert {r["layer"] for r in results.records} == {"features.1", "head.1"}
    from layerscope.adapters.torch_export import _load_pt2

    proto = export_to_onnx(_load_pt2(tmp_path / "cnn.pt2"))
    assert_layers_match(run_onnx_all(proto, x), hooked_activations(model, torch.from_numpy(x)))


def test_module_through_python_api_keeps_module_paths():
    spec = {"model": {"source": make_cnn()}, "data": {"source": "digits", "layout": "image", "limit": 100},
            "analyses": [{"id": "ent", "estimator": "activation_entropy"}]}
    results = layerscope.run(spec, write=False, progress=False)
    assert {r["layer"] for r in results.records} == {"features.1", "head.1"}
    assert results.models[0]["framework"] == "pytorch"
    assert results.spec["model"]["source"].endswith("SmallCNN object>")


def test_python_factory_with_weights(tmp_path):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))\n")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 10))
    torch.save(net.state_dict(), tmp_path / "net.pt")
    spec = write_spec(tmp_path, "model: {python: 'mynets:make', weights: net.pt}\n"
                                "data: {source: digits, limit: 200, shuffle: false}\n"
                                "analyses: [{id: e, estimator: activation_entropy}]\n")
    results = layerscope.run(spec, write=False, progress=False)
    x = torch.from_numpy(digits_images(200).reshape(200, 64))
    with torch.no_grad():
        on = (net[1](net[0](x)) > 0).double().mean(0)
    from layerscope.plugins.activation_entropy import binary_entropy_bits

    expected = float(binary_entropy_bits(on).mean())
    (got,) = [r["value"] for r in results.select(metric="entropy", **{"class": "all"})]
    assert got == pytest.approx(expected, abs=1e-9)


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


@pytest.mark.parametrize("reference, message", [
    ("nowhere:make", r"model.python: importing 'nowhere' failed: ModuleNotFoundError: No module named 'nowhere'$"),
    ("usermodels_broken:data_dependent",
     r"model.python: importing 'usermodels_broken' failed: ZeroDivisionError: division by zero \(.*usermodels_broken.py:3\)$"),
    ("usermodels:raising", r"model.python: calling 'usermodels:raising' failed: KeyError: 'missing' \(.*usermodels.py:22\)$"),
    ("usermodels:absent", r"model.python: 'usermodels' has no function 'absent'$"),
    ("usermodels:data_dependent", r"model.source: torch.onnx.export could not export the model: "
                                  r"GuardOnDataDependentSymNode: Could not guard on data-dependent expression .* "
                                  r"\(at .*usermodels.py:12 in forward: if x.sum\(\) > 0:\); change the model so that"),
])
def test_failures_in_the_users_model_code_are_one_clear_message(tmp_path, reference, message):
    """Run as users run it: in a process of its own, where torch's prints and logs would reach the terminal."""
    import re
    import subprocess
    import sys

    (tmp_path / "usermodels.py").write_text(USER_MODULE)
    (tmp_path / "usermodels_broken.py").write_text(USER_MODULE)
    spec = write_spec(tmp_path, f"model: {{python: '{reference}'}}\ndata: {{source: digits, limit: 20}}\n"
                                f"analyses: [{{id: e, estimator: activation_entropy}}]\noutputs: {{dir: {tmp_path}}}\n")
    done = subprocess.run([sys.executable, "-m", "layerscope", "run", str(spec), "--quiet"], capture_output=True,
                          text=True, timeout=300)
    out, err = done.stdout, done.stderr
    assert done.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and not out.strip(), err
    assert "\x1b" not in err and "Traceback" not in err
    assert re.search(message, err.strip().removeprefix("layerscope: error: ")), err


def test_onnx_external_data_and_checkpoints(tmp_path):
    for epoch in (1, 2, 10):
        onnx.save(tiny_mlp_proto(seed=epoch), str(tmp_path / f"epoch_{epoch}.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=f"epoch_{epoch}.onnx.data", size_threshold=0)
    assert (tmp_path / "epoch_10.onnx.data").exists()
    spec = write_spec(tmp_path, "model: {source: epoch_1.onnx, checkpoints: 'epoch_*.onnx'}\n"
                                "data: {source: digits, limit: 100}\n"
                                "analyses: [{id: e, estimator: activation_entropy}]\n")
    results = layerscope.run(spec, write=False, progress=False)
    assert [m["label"] for m in results.models] == ["epoch_1", "epoch_2", "epoch_10"]
    values = {m: results.select(model=m, metric="entropy", layer="act1", **{"class": "all"})[0]["value"]
              for m in ("epoch_1", "epoch_2", "epoch_10")}
    assert len(set(values.values())) == 3  # different weights, different numbers


def test_demo_zoo_checkpoints_and_layer_names():
    spec = {"model": {"source": "demo:digits-mlp", "checkpoints": ["epoch_01", "epoch_1*"]},
            "data": {"source": "digits", "split": "test", "limit": 100},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}]}
    results = layerscope.run(spec, write=False, progress=False)
    assert [m["label"] for m in results.models] == ["epoch_01", "epoch_10"]
    assert results.models[-1]["test_accuracy"] > 0.9
    assert {r["layer"] for r in results.records} == {"relu1", "relu2", "relu3"}
