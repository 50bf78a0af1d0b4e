"""TensorFlow and Keras models analysed exactly like PyTorch ones (skipped without the tensorflow extra).

TensorFlow, Keras and tf2onnx are imported by the ``keras`` fixture, not when the module is collected:
``pytest -m "not slow"`` collects this module too, and importing TensorFlow takes seconds and ~1 GB."""

from __future__ import annotations

import os

import pytest
import torch

import layerscope

pytestmark = pytest.mark.slow  # TensorFlow takes seconds to import and convert


@pytest.fixture(scope="module")
def keras():
    """The ``keras`` module, with TensorFlow and tf2onnx imported (the test is skipped without the extra)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    pytest.importorskip("tensorflow", reason="pip install 'layerscope[tensorflow]'")
    module = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    return module


DATA = {"source": "digits", "split": "test", "batch_size": 90, "layout": "image"}
ANALYSES = [
    {"id": "entropy", "estimator": "activation_entropy"},
    {"id": "channels", "estimator": "activation_entropy", "params": {"neurons": "channels"}},
    {"id": "ip", "estimator": "information_plane", "params": {"sigma_grid": 60, "batch_size": 90}},
    {"id": "sig", "estimator": "nonlinearity_signature", "params": {"samples": 400}},
]


def torch_cnn() -> torch.nn.Module:
    torch.manual_seed(4)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.relu1 = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU()
            self.conv2, self.relu2 = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU()
            self.pool, self.out = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(8, 10)

        def forward(self, x):
            return self.out(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))

    return Net().eval()


def keras_cnn(keras, net: torch.nn.Module, sequential: bool = False):
    layers = [
        keras.layers.Conv2D(4, 3, padding="same", name="conv1"),
        keras.layers.Activation("relu", name="relu1"),
        keras.layers.Conv2D(8, 3, padding="same", name="conv2"),
        keras.layers.Activation("relu", name="relu2"),
        keras.layers.GlobalAveragePooling2D(name="pool"),
        keras.layers.Dense(10, name="out"),
    ]
    if sequential:
        model = keras.Sequential([keras.Input((8, 8, 1)), *layers])
    else:
        inputs = keras.Input((8, 8, 1))
        x = inputs
        for layer in layers:
            x = layer(x)
        model = keras.Model(inputs, x)
    for name in ("conv1", "conv2"):
        conv = getattr(net, name)
        model.get_layer(name).set_weights(
            [conv.weight.detach().numpy().transpose(2, 3, 1, 0), conv.bias.detach().numpy()]
        )
    model.get_layer("out").set_weights([net.out.weight.detach().numpy().T, net.out.bias.detach().numpy()])
    return model


def keras_mlp_and_torch(keras):
    torch.manual_seed(5)
    net = torch.nn.ModuleDict({"fc1": torch.nn.Linear(64, 16), "fc2": torch.nn.Linear(16, 10)})

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.relu1, self.fc2, self.tanh2 = net["fc1"], torch.nn.ReLU(), net["fc2"], torch.nn.Tanh()

        def forward(self, x):
            return self.tanh2(self.fc2(self.relu1(self.fc1(x))))

    inputs = keras.Input((64,))
    x = keras.layers.Dense(16, name="fc1")(inputs)
    x = keras.layers.Activation("relu", name="relu1")(x)
    x = keras.layers.Dense(10, name="fc2")(x)
    x = keras.layers.Activation("tanh", name="tanh2")(x)
    model = keras.Model(inputs, x)
    for name in ("fc1", "fc2"):
        model.get_layer(name).set_weights([net[name].weight.detach().numpy().T, net[name].bias.detach().numpy()])
    return model, Mlp().eval()


def records(source, analyses=ANALYSES, data=DATA):
    results = layerscope.run(
        {"model": {"source": source}, "data": data, "analyses": analyses}, write=False, progress=False
    )
    return results, {
        (r["analysis"], r["layer"], r["metric"], str(r.get("class"))): r["value"]
        for r in results.records
        if r["layer"] not in ("input", "labels")
    }


def assert_same(left: dict, right: dict, tolerance: float = 1e-4):
    assert left.keys() == right.keys(), sorted(left.keys() ^ right.keys())[:5]
    for key in left:
        assert left[key] == pytest.approx(right[key], abs=tolerance), key


def test_keras_and_torch_cnn_give_the_same_records(tmp_path, keras):
    net = torch_cnn()
    model = keras_cnn(keras, net)
    keras_results, keras_records = records(model)
    _, torch_records = records(net)
    assert_same(keras_records, torch_records)
    assert {r["layer"] for r in keras_results.records} >= {"relu1", "relu2"}
    assert keras_results.models[0]["framework"] == "keras" and keras_results.models[0]["opset"] == 17
    layouts = {t["layer"]: t["layout"] for t in keras_results.models[0]["tensors"] if len(t["shape"]) == 4}
    assert layouts["relu1"] in ("NCHW", "NHWC") and set(layouts.values()) <= {"NCHW", "NHWC"}


def test_keras_and_torch_mlp_give_the_same_records(keras):
    model, net = keras_mlp_and_torch(keras)
    analyses, flat = [a for a in ANALYSES if a["id"] != "channels"], {**DATA, "layout": "flat"}
    assert_same(records(model, analyses, flat)[1], records(net, analyses, flat)[1])


def test_saved_model_and_keras_file_give_identical_records(tmp_path, keras):
    model = keras_cnn(keras, torch_cnn())
    model.save(tmp_path / "cnn.keras")
    model.export(str(tmp_path / "cnn_saved_model"), format="tf_saved_model", verbose=False)
    from_file = records(str(tmp_path / "cnn.keras"))[1]
    from_saved = records(str(tmp_path / "cnn_saved_model"))[1]
    assert from_file == from_saved


def test_sequential_and_functional_models_load(tmp_path, keras):
    net = torch_cnn()
    sequential, functional = keras_cnn(keras, net, sequential=True), keras_cnn(keras, net)
    sequential.save(tmp_path / "seq.keras")
    assert records(str(tmp_path / "seq.keras"))[1] == records(functional)[1]


def test_inspect_a_keras_file(tmp_path, capsys, keras):
    from layerscope.cli.main import main

    keras_cnn(keras, torch_cnn()).save(tmp_path / "cnn.keras")
    assert main(["inspect", str(tmp_path / "cnn.keras"), "--json"]) == 0
    import json

    described = json.loads(capsys.readouterr().out)
    assert described["framework"] == "keras"
    tensors = {t["layer"]: t for t in described["tensors"] if t["op_type"] == "Relu"}
    assert set(tensors) == {"relu1", "relu2"}
    (model_input,) = [t for t in described["tensors"] if t["role"] == "input"]
    assert model_input["layout"] == "NHWC" and model_input["shape"][1:] == [8, 8, 1]


def test_auto_named_layers_are_attributed_to_themselves(keras):
    """Keras names layers dense, dense_1, dense_2 and TensorFlow's trace scopes them dense_1, dense_1_2,
    dense_2_1: each activation is still recorded under its own layer (told apart by its width), converted
    plainly and converted for the Monitor."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(12, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    names = [layer.name for layer in model.layers]
    assert names[0] == "dense" or names[0].startswith("dense_")  # Keras' automatic names
    spec = {
        "model": {"source": model},
        "data": {"split": "test", "limit": 90},
        "analyses": [{"id": "entropy", "estimator": "activation_entropy", "params": {"neurons": "elements"}}],
    }
    results = layerscope.run(spec, write=False, progress=False)
    widths = {t["layer"]: t["shape"][-1] for t in results.models[0]["tensors"]}
    assert widths == {names[0]: 16, names[1]: 12}
    monitor = layerscope.Monitor({**spec, "model": {}})
    records = monitor.observe(model, step=0)
    assert {r["layer"] for r in records} == {names[0], names[1]}
    assert {(r["layer"], r["metric"], r["class"]): r["value"] for r in records} == pytest.approx(
        {(r["layer"], r["metric"], r["class"]): r["value"] for r in results.records}, rel=1e-9, abs=1e-12
    )


def test_a_keras_gelu_runs_and_traces_as_keras_computes_it(keras):
    """Keras's exact GELU is x/2 · erfc(−x/√2); tf2onnx leaves the Erfc, which onnxruntime lacks, and the
    adapter rewrites it as 1 − Erf: the model validates, its GELU is found as an activation, and the traced
    layer outputs equal Keras's own (pre-activations up to ±9, where erfc's tail matters)."""
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="gelu", bias_initializer="random_normal", name="hidden"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    x = 3 * np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    spec = {
        "model": {"source": model},
        "data": {"batch_size": 16},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
    }
    assert layerscope.validate(spec, data=x)[-1].endswith("e selects 1 tensor")
    traced = layerscope.trace(model, x, on={"layer": "hidden"}, progress=False)
    assert list(traced.layers.values()) == ["hidden"]  # the layer's output, not the GELU's steps inside it
    expected = keras.Model(model.inputs[0], model.get_layer("hidden").output)(x).numpy()
    assert np.abs(x @ model.get_layer("hidden").get_weights()[0]).max() > 5
    np.testing.assert_allclose(next(iter(traced.values())), expected, rtol=1e-5, atol=1e-5)
    results = layerscope.run(spec, data=x, write=False, progress=False)
    assert results.models[0]["rewritten_ops"] == {"Erfc": 1}
    assert {r["layer"] for r in results.records} == {"hidden"}
