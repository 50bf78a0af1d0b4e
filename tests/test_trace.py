"""``layerscope.trace`` and ``layerscope trace``: the tensors a selector picks, equal to what forward hooks on
the torch model see (same samples, in order), bounded by the memory budget, written to an .npz that loads back."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import layerscope
from layerscope.cli.main import main
from layerscope.util.errors import UserError

from .conftest import write_spec


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.Tanh()
        )
        self.head = nn.Sequential(nn.Linear(8 * 4 * 4, 12), nn.GELU(), nn.Linear(12, 10))

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class TwiceReLU(nn.Module):
    """A residual block whose one ReLU module runs twice, as in torchvision's ResNet blocks."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


class Reusing(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(1, 2, 3, padding=1), TwiceReLU(), nn.Linear(2 * 8 * 8, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).flatten(1))


def seeded(cls) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def images(count: int = 37) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, 1, 8, 8)).astype(np.float32)


def hooked(model: nn.Module, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """What forward hooks on every module (containers too) see when *model* runs on *x*: each call's output
    in call order, by module path."""
    seen: dict[str, list[np.ndarray]] = {}
    handles = [
        module.register_forward_hook(
            lambda _, __, output, name=name: seen.setdefault(name, []).append(output.detach().numpy())
        )
        for name, module in model.named_modules()
        if name
    ]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for handle in handles:
        handle.remove()
    return seen


def test_a_layer_traces_what_a_forward_hook_on_the_module_sees():
    """Every module of a small CNN, the Sequential containers included: ``{layer: M}`` gives one tensor, the
    module's output over the 37 samples in order (batches of 10, the last one short)."""
    model, x = seeded(SmallCNN), images()
    expected = hooked(model, x)
    for module, (output,) in expected.items():
        traced = layerscope.trace(model, x, on={"layer": module}, batch_size=10, progress=False)
        assert len(traced) == 1, (module, traced.layers)
        (array,) = traced.values()
        np.testing.assert_allclose(array, output, rtol=1e-5, atol=1e-5, err_msg=module)
    assert list(traced.samples) == list(range(37))


def test_a_module_called_twice_gives_one_tensor_per_call():
    model, x = seeded(Reusing), images()
    expected = hooked(model, x)
    traced = layerscope.trace(model, x, on={"layer": "block.relu"}, batch_size=16, progress=False)
    assert list(traced.layers.values()) == ["block.relu", "block.relu#2"]
    for array, output in zip(traced.values(), expected["block.relu"]):
        np.testing.assert_allclose(array, output, rtol=1e-5, atol=1e-5)
    (block,) = layerscope.trace(model, x, on={"layer": "block"}, progress=False).by_layer().values()
    np.testing.assert_allclose(block, expected["block"][0], rtol=1e-5, atol=1e-5)  # the second call's output


def test_a_trace_larger_than_the_memory_budget_is_refused_naming_the_bytes():
    """37 samples of the first convolution (4×8×8 float32) hold 37 · 1024 bytes."""
    model, x = seeded(SmallCNN), images()
    on = {"layer": "features.0"}
    with pytest.raises(UserError, match=r"memory_budget: the selected tensors of 37 samples take 37888 bytes"):
        layerscope.trace(model, x, on=on, memory_budget=37888, progress=False)
    traced = layerscope.trace(model, x, on=on, memory_budget=37888 + 1024, progress=False)  # one sample beside
    assert traced["conv2d"].shape == (37, 4, 8, 8)


def test_a_tensor_whose_first_axis_is_not_the_samples_is_refused_naming_it():
    """x (N×2×3) reshaped to (-1, 3): shape inference cannot say that its first axis is 2·N, so the tensor is
    observable, but its rows are not samples (as attention heads merged with the batch in BERT)."""
    from onnx import helper, numpy_helper

    shapes = [numpy_helper.from_array(np.array(s, np.int64), n) for n, s in (("merge", [-1, 3]), ("back", [-1, 6]))]
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "merge"], ["merged"]),
            helper.make_node("Reshape", ["merged", "back"], ["y"]),
        ],
        "merging",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6])],
        shapes,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    x = np.ones((5, 2, 3), np.float32)
    with pytest.raises(UserError, match=r"^on: tensor 'merged' \(layer merged\) has 8 rows for the 4 samples 0..3"):
        layerscope.trace(proto, x, on={"name": "merged"}, batch_size=4, progress=False)
    assert layerscope.trace(proto, x, on={"name": "y"}, batch_size=4, progress=False)["y"].shape == (5, 6)


def test_selector_errors_name_the_problem():
    model, x = seeded(SmallCNN), images(4)
    with pytest.raises(UserError, match=r"^on: selector \(layer=featurs.0\) matches no tensor.*Did you mean"):
        layerscope.trace(model, x, on={"layer": "featurs.0"}, progress=False)
    with pytest.raises(UserError, match=r"^on: unknown key 'layr'. Did you mean 'layer'\?"):
        layerscope.trace(model, x, on={"layr": "features.0"}, progress=False)
    with pytest.raises(UserError, match=r"^on: \[1\]: inner: give true or false, not 'yes'$"):
        layerscope.trace(model, x, on=[{"layer": "head"}, {"layer": "features", "inner": "yes"}], progress=False)


@pytest.fixture
def cnn_spec(tmp_path):
    """A spec naming the small CNN as an ONNX file and 37 images in an npz, and the Python API's trace of it."""
    from layerscope.adapters.torch_export import export_to_onnx

    x = images()
    onnx.save(export_to_onnx(seeded(SmallCNN), x[:2]), tmp_path / "cnn.onnx")
    np.savez(tmp_path / "images.npz", x=x)
    spec = write_spec(
        tmp_path,
        "model: {source: cnn.onnx}\ndata: {source: npz, path: images.npz, batch_size: 8}\n"
        "runtime: {memory_budget: 4KiB}\n",
    )
    return spec


def test_the_command_writes_an_npz_that_loads_back_as_the_trace(tmp_path, cnn_spec):
    """Through a fresh interpreter, as a user runs it; a budget of 4 KiB makes the runner fetch a few samples
    at a time while the arrays go to the file."""
    out = tmp_path / "traced" / "cnn.npz"
    done = subprocess.run(
        [sys.executable, "-m", "layerscope", "trace", str(cnn_spec), "--on", "[{layer: features}, {layer: head.1}]"]
        + ["--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    x = images()
    expected = layerscope.trace(
        str(tmp_path / "cnn.onnx"), x, on=[{"layer": "features"}, {"layer": "head.1"}], progress=False
    )
    with np.load(out) as written:
        assert sorted(written.files) == sorted([*expected, "__layers__", "__samples__"])
        for name, array in expected.items():
            np.testing.assert_array_equal(written[name], array)
        assert dict(map(tuple, written["__layers__"])) == expected.layers == {"tanh": "features.4", "gelu": "head.1"}
        assert list(written["__samples__"]) == list(range(37))
    assert f"2 tensors of 37 samples → {out}" in done.stdout
    assert [p.name for p in out.parent.iterdir()] == ["cnn.npz"]  # the parts' folder is gone


@pytest.mark.parametrize(
    "on, message",
    [
        ("{layer: nowhere}", "--on: selector (layer=nowhere) matches no tensor"),
        ("{layer: [unclosed", "--on:1:18: invalid YAML"),
        ("{layr: features}", "--on: unknown key 'layr'. Did you mean 'layer'?"),
    ],
)
def test_command_errors_exit_2_with_one_message(tmp_path, capsys, cnn_spec, on, message):
    out = tmp_path / "t.npz"
    code = main(["trace", str(cnn_spec), "--on", on, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not out.exists()


def test_a_spec_with_several_models_or_a_wrong_out_exits_2(tmp_path, capsys, cnn_spec):
    out = tmp_path / "t.npz"
    code = main(["trace", str(cnn_spec), "--on", "all", "--out", str(tmp_path / "t.txt")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "--out: " in err and "must name an .npz file" in err, err
    cnn_spec.write_text(
        cnn_spec.read_text().replace(
            "model: {source: cnn.onnx}", "models: [{label: a, source: cnn.onnx}, {label: b, source: cnn.onnx}]"
        )
    )
    code = main(["trace", str(cnn_spec), "--on", "all", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1, err
    assert "spec.yaml:1:1: models: a trace reads one model; the spec names 2 (a, b)" in err, err
    assert not out.exists() and not (tmp_path / "t.txt").exists()


def test_a_budget_below_one_sample_exits_2(tmp_path, capsys, cnn_spec):
    cnn_spec.write_text(cnn_spec.read_text().replace("4KiB", "512"))  # one sample of features.0 is 1 KiB
    out = tmp_path / "t.npz"
    code = main(["trace", str(cnn_spec), "--on", "{layer: features.0}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1, err
    assert "runtime.memory_budget (512 bytes) is smaller than one sample of conv2d" in err, err
    assert "raise the budget\n" in err and "batch_size" not in err, err
    assert not out.exists() and list(tmp_path.glob(".t.npz*")) == []
