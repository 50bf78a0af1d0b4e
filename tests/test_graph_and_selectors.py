"""Graph description (observability rules) and tensor selectors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from layerscope.graph.selectors import SelectionError, SelectorSpec, parse_selection, resolve
from layerscope.graph.tensors import TensorInfo, describe_tensors
from layerscope.util.errors import UserError

from .conftest import tiny_mlp_proto

FLOAT = onnx.TensorProto.FLOAT


def model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def by_name(tensors):
    return {t.name: t for t in tensors}


def test_mlp_tensors_shapes_and_roles():
    tensors = by_name(describe_tensors(tiny_mlp_proto()))
    assert tensors["x"].role == "input" and tensors["logits"].role == "output"
    assert tensors["a1"].shape == ("N", 16) and tensors["a1"].dtype == "float32"
    assert tensors["a1"].bytes_per_sample() == 64
    assert tensors["a1"].layer == "act1" and tensors["a1"].op_type == "Relu"


def test_tensors_without_sample_rows_are_not_observable_and_all_skips_them(tmp_path):
    """A scalar (a sum over everything), and a tensor whose first axis is fixed where the batch axis is
    symbolic or is another fixed number (a sum over the batch, a transpose), have no rows that are samples:
    they are unobservable, with the reason, so ``on: all`` leaves them out instead of failing an estimator's
    update, and naming them is refused."""
    import layerscope

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("ReduceSum", ["r"], ["s"], keepdims=0),
        helper.make_node("ReduceSum", ["r", "axis0"], ["column_sums"], keepdims=1),
        helper.make_node("Mul", ["r", "s"], ["scaled"]),
        helper.make_node("Add", ["scaled", "column_sums"], ["out"]),
    ]
    axis0 = numpy_helper.from_array(np.array([0], np.int64), "axis0")
    proto = model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("out", FLOAT, ["N", 8])],
        [w, axis0],
    )
    tensors = by_name(describe_tensors(proto))
    assert (tensors["s"].observable, tensors["s"].reason) == (False, "a scalar: it has no sample axis")
    assert not tensors["column_sums"].observable and "fixed (1)" in tensors["column_sums"].reason
    assert tensors["r"].observable and tensors["scaled"].observable
    fixed = model(  # the same graph with a fixed batch of 5: the sum over it has 1 row, the transpose 8
        [*nodes[:4], helper.make_node("Transpose", ["r"], ["rows_as_columns"])],
        [helper.make_tensor_value_info("x", FLOAT, [5, 16])],
        [helper.make_tensor_value_info("rows_as_columns", FLOAT, [8, 5])],
        [w, axis0],
    )
    fixed_tensors = by_name(describe_tensors(fixed))
    assert fixed_tensors["r"].observable and fixed_tensors["h"].observable
    for name in ("column_sums", "rows_as_columns"):
        assert not fixed_tensors[name].observable and "batch axis is 5" in fixed_tensors[name].reason
    onnx.save(proto, str(tmp_path / "sums.onnx"))
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(1).standard_normal((30, 16)).astype(np.float32))
    spec = {
        "model": {"source": str(tmp_path / "sums.onnx")},
        "data": {"source": "npz", "path": str(tmp_path / "x.npz"), "batch_size": 30},
        "analyses": [{"id": "e", "estimator": "activation_entropy", "on": "all"}],
    }
    results = layerscope.run(spec, write=False, progress=False)
    assert not results.failures and not results.warnings
    assert {r["tensor"] for r in results.records} == {"x", "h", "r", "scaled", "out"}
    with pytest.raises(UserError, match="a scalar: it has no sample axis"):
        layerscope.run({**spec, "analyses": [{"id": "e", "estimator": "activation_entropy", "on": {"name": "s"}}]})


def test_constants_and_shape_arithmetic_are_not_observable():
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Constant", [], ["minus_one"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Relu", ["flat"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    proto = model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["N", 2, 3])],
        [helper.make_tensor_value_info("y", FLOAT, None)],
        inits,
    )
    tensors = by_name(describe_tensors(proto))
    assert tensors["minus_one"].reason == "constant"
    assert {tensors[n].reason for n in ("shape", "batch", "target")} == {"shape arithmetic"}
    assert tensors["flat"].observable and tensors["y"].observable
    assert tensors["flat"].shape[0] == "N" and tensors["flat"].bytes_per_sample() is None  # -1 is not propagated
    from layerscope.engine.runner import Runner

    runner = Runner(proto, list(tensors.values()), [("flat",), ("y",)], "cpu", 200, 5)  # one batch of each is 120 bytes
    fetched = dict(
        kv for _, group in runner.run(runner.prepare(np.ones((5, 2, 3), np.float32))) for kv in group.items()
    )
    assert fetched["flat"].shape == (5, 6) and runner._sizes["flat"] == 24  # measured on one sample
    assert [g.names for g in runner.groups] == [["flat"], ["y"]]


def test_if_body_tensors_are_reported_not_observable():
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["inner_relu"])],
        "then",
        [],
        [helper.make_tensor_value_info("inner_relu", FLOAT, ["N", 3])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["inner_neg"])],
        "else",
        [],
        [helper.make_tensor_value_info("inner_neg", FLOAT, ["N", 3])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node("If", ["positive"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph),
    ]
    proto = model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )
    tensors = by_name(describe_tensors(proto))
    assert not tensors["inner_relu"].observable
    assert "inside the If body of node 'branch'" in tensors["inner_relu"].reason
    assert tensors["y"].observable
    with pytest.raises(UserError, match="cannot be observed"):
        resolve(SelectorSpec(op_type="Relu"), list(tensors.values()))


def test_sequence_values_are_not_tensors():
    nodes = [
        helper.make_node("SequenceConstruct", ["x", "x"], ["seq"]),
        helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0),
    ]
    proto = model(
        nodes, [helper.make_tensor_value_info("x", FLOAT, ["N", 3])], [helper.make_tensor_value_info("y", FLOAT, None)]
    )
    seq = by_name(describe_tensors(proto))["seq"]
    assert not seq.observable and "sequence" in seq.reason


def test_selectors_and_or_semantics():
    tensors = describe_tensors(tiny_mlp_proto())
    names = lambda selector: [t.name for t in resolve(selector, tensors)]  # noqa: E731
    assert names(SelectorSpec(op_type=["Relu", "Tanh"])) == ["a1", "a2"]
    assert names(SelectorSpec(glob="fc*")) == ["h1", "h2"]
    assert names(SelectorSpec(glob="*", op_type="Gemm")) == ["h1", "h2", "logits"]
    assert names(SelectorSpec(layer="act2")) == ["a2"]
    assert names(SelectorSpec(name=["a1", "logits"])) == ["a1", "logits"]
    with pytest.raises(UserError, match="matches no tensor"):
        resolve(SelectorSpec(glob="fc*", op_type="Relu"), tensors)
    assert [t.name for t in resolve("all", tensors)] == ["x", "h1", "a1", "h2", "a2", "logits"]
    with pytest.raises(UserError, match="Did you mean 'a1'"):
        resolve(SelectorSpec(name="a11"), tensors)


def test_a_layer_written_without_its_parents_is_suggested_in_full():
    """difflib finds no module close to 'h.0.mlp' among GPT-2's 'transformer.h.0.mlp' and its neighbours; the
    container is no tensor's label or innermost module, only one of the calls computing them."""
    mlp = "transformer.h.0.mlp"
    calls = (f"{mlp}.dropout", mlp, "transformer.h.0", "transformer")
    tensors = [
        TensorInfo("x", "Input", "x", "float32", ("N", 4), True, role="input"),
        TensorInfo("a", "Tanh", f"{mlp}.act", "float32", ("N", 4), True, order=0, module=f"{mlp}.act"),
        TensorInfo(
            "b", "Identity", calls[0], "float32", ("N", 4), True, order=1, module=calls[0], calls=calls, output_of=calls
        ),
        TensorInfo("c", "Gemm", "lm_head", "float32", ("N", 4), True, order=2, module="lm_head", role="output"),
    ]
    assert [t.name for t in resolve(SelectorSpec(layer=mlp), tensors)] == ["b"]
    with pytest.raises(UserError, match=r"matches no tensor in the model. Did you mean 'transformer.h.0.mlp'\?"):
        resolve(SelectorSpec(layer="h.0.mlp"), tensors)


def test_selector_keys_take_what_they_say():
    """inner takes true or false: the string "yes" was read as true."""
    assert parse_selection({"layer": "a", "inner": True}).inner is True
    for value in ("yes", "false", 1):
        with pytest.raises(SelectionError, match=rf"^inner: give true or false, not {value!r}$"):
            parse_selection({"layer": "a", "inner": value})
    with pytest.raises(SelectionError, match=r"^\[1\]: unknown key 'op_typ'. Did you mean 'op_type'\?$") as error:
        parse_selection([{"layer": "a"}, {"op_typ": "Relu"}])
    assert error.value.path == (1, "op_typ")


def test_empty_selector_rejected():
    with pytest.raises(ValueError):
        SelectorSpec()


def test_selector_lists_and_roles():
    tensors = describe_tensors(tiny_mlp_proto())
    union = [SelectorSpec(op_type="Tanh"), SelectorSpec(role="output")]
    assert [t.name for t in resolve(union, tensors)] == ["a2", "logits"]
    assert [t.name for t in resolve(SelectorSpec(role="input"), tensors)] == ["x"]
    with pytest.raises(UserError, match="matches no tensor"):
        resolve([SelectorSpec(op_type="Sigmoid"), SelectorSpec(role="output")], tensors)
    assert [
        t.name for t in resolve([SelectorSpec(op_type="Sigmoid"), SelectorSpec(role="output")], tensors, strict=False)
    ] == ["logits"]


def test_nhwc_tensors_are_moved_channels_first_by_the_estimators(tmp_path):
    """The same maps stored NHWC (input marked by an adapter, as Keras is) and NCHW give the same numbers."""
    import layerscope
    from layerscope.graph.tensors import INPUT_LAYOUT_KEY, infer_layouts

    def model(shape, layout):
        nodes = [helper.make_node("Mul", ["x", "scale"], ["scaled"]), helper.make_node("Relu", ["scaled"], ["a"])]
        graph = helper.make_graph(
            nodes,
            "maps",
            [helper.make_tensor_value_info("x", FLOAT, ["N", *shape])],
            [helper.make_tensor_value_info("a", FLOAT, ["N", *shape])],
            [numpy_helper.from_array(np.array(1.5, np.float32), "scale")],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        onnx.helper.set_model_props(proto, {INPUT_LAYOUT_KEY: layout})
        return proto

    rng = np.random.default_rng(0)
    maps = rng.standard_normal((300, 3, 4, 4)).astype(np.float32) + np.array([-1.0, 0.0, 1.0])[None, :, None, None]
    results = {}
    for name, shape, layout, data in (
        ("nchw", (3, 4, 4), "NCHW", maps),
        ("nhwc", (4, 4, 3), "NHWC", maps.transpose(0, 2, 3, 1).copy()),
    ):
        proto = model(shape, layout)
        assert infer_layouts(proto)["a"] == layout
        onnx.save(proto, str(tmp_path / f"{name}.onnx"))
        np.savez(tmp_path / f"{name}.npz", x=data)
        spec = {
            "model": {"source": str(tmp_path / f"{name}.onnx")},
            "data": {"source": "npz", "path": str(tmp_path / f"{name}.npz"), "shuffle": False},
            "analyses": [
                {"id": "ch", "estimator": "activation_entropy", "on": {"name": "a"}, "params": {"neurons": "channels"}},
                {"id": "sig", "estimator": "nonlinearity_signature", "params": {"samples": 300}},
            ],
        }
        run = layerscope.run(spec, write=False, progress=False)
        results[name] = {(r["analysis"], r["metric"], str(r.get("class"))): r["value"] for r in run.records}
    assert results["nchw"].keys() == results["nhwc"].keys()
    for key, value in results["nchw"].items():
        assert results["nhwc"][key] == pytest.approx(value, abs=1e-6), key


# --- a unique label per tensor, even when a module is called twice ----------------------------------------------


def test_call_labels_number_calls_and_name_a_calls_inner_tensors():
    from layerscope.graph.layer_names import CallNode, module_calls

    def labels(nodes):
        return {
            n: c.label for n, c in module_calls([CallNode((layer,), tuple(out)) for layer, out in nodes], set()).items()
        }

    nodes = [
        ("stem", [("c0", True)]),
        ("block.c1", [("c1", True)]),
        ("block.relu", [("r1", True)]),
        ("block.c2", [("c2", True)]),
        ("block", [("add", True)]),  # the block's own op: same call as its children's
        ("block.relu", [("r2", True)]),  # the ReLU module again: its second call
        ("block", [("add2", True), ("aux", False)]),
        ("head", [("h", True)]),
        ("block.relu", [("r3", True)]),
    ]
    assert labels(nodes) == {
        "c0": "stem",
        "c1": "block.c1",
        "r1": "block.relu",
        "c2": "block.c2",
        "add": "block/add",
        "r2": "block.relu#2",
        "add2": "block",
        "aux": "block/aux",
        "h": "head",
        "r3": "block.relu#3",
    }
    assert (
        labels([("a", [("x", True)]), ("a#2", [("y", True)]), ("b", [("z", True)]), ("a", [("w", True)])])["w"]
        == "a#2/w"
    )  # a layer named like a label: still unique


def test_a_tensor_is_the_output_of_the_calls_it_leaves():
    """A residual block (recorded call stacks, as torch's exporter writes them) whose ReLU module runs twice:
    each tensor is an output of the calls whose outside reads it, innermost first; an optimiser's node
    without a record (a mask computed once for every block, the split) neither ends the block's call nor
    renumbers the ReLU's."""
    from layerscope.graph.layer_names import CallNode, module_calls

    nodes = [
        CallNode(("stem",), (("c0", True),), ("x",)),
        CallNode(("block", "block.c1"), (("c1", True),), ("c0",)),
        CallNode(("mask",), (("m", True),), ("x",), recorded=False),  # computed once for every block
        CallNode(("block", "split"), (("s", True),), ("c1",), recorded=False),
        CallNode(("block", "block.relu"), (("r1", True),), ("s",)),
        CallNode(("block", "block.c2"), (("c2", True),), ("r1", "m")),
        CallNode(("block",), (("add", True),), ("c2", "c0")),
        CallNode(("block", "block.relu"), (("r2", True),), ("add",)),
        CallNode(("head",), (("h", True),), ("r2",)),
    ]
    calls = module_calls(nodes, {"h"})
    assert {n: c.output_of for n, c in calls.items()} == {
        "c0": ("stem",),
        "c1": ("block.c1",),  # read by the split, inside the block
        "m": ("mask",),
        "s": ("split",),
        "r1": ("block.relu",),
        "c2": ("block.c2",),
        "add": (),  # the block's own op, read only inside the block: inner
        "r2": ("block.relu", "block.relu#2", "block"),  # what a forward hook on the block returns
        "h": ("head",),  # a graph output
    }
    assert calls["r1"].label == "block.relu" and calls["r2"].label == "block.relu#2"
    assert calls["add"].calls == ("block",) and calls["r2"].calls == ("block.relu", "block.relu#2", "block")


def scoped(op, inputs, outputs, scopes, **attributes):
    """A node with the call stack torch's exporter records (``pkg.torch.onnx.name_scopes``)."""
    node = helper.make_node(op, inputs, outputs, **attributes)
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(["", *scopes]))
    return node


def residual_swish():
    """x → block(fc → act(x·sigmoid(x)) + x) → head, with torch's call records: ``block.act`` computes one
    inner tensor (the sigmoid), ``block`` one output (the sum)."""
    rng = np.random.default_rng(0)
    nodes = [
        scoped("MatMul", ["x", "w1"], ["linear"], ["block", "block.fc", "linear"]),
        scoped("Sigmoid", ["linear"], ["sigmoid"], ["block", "block.act", "sigmoid"]),
        scoped("Mul", ["linear", "sigmoid"], ["mul"], ["block", "block.act", "mul"]),
        scoped("Add", ["mul", "x"], ["add"], ["block", "add"]),
        scoped("MatMul", ["add", "w2"], ["logits"], ["head", "matmul"]),
    ]
    weights = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), n) for n in ("w1", "w2")]
    return model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", FLOAT, ["N", 4])],
        weights,
    )


def test_glob_and_layer_select_a_modules_outputs_unless_inner_tensors_are_asked_for():
    tensors = describe_tensors(residual_swish())
    names = lambda **keys: [t.name for t in resolve(SelectorSpec(**keys), tensors)]  # noqa: E731
    assert by_name(tensors)["sigmoid"].inner and not by_name(tensors)["mul"].inner
    assert names(glob="*act*") == ["mul"]  # the module's output, not the sigmoid inside it
    assert names(layer="block.act") == ["mul"]
    assert names(layer="block") == ["add"]  # what leaves the block
    assert names(glob="block*") == ["linear", "mul", "add"]  # block.fc, block.act, block
    assert names(glob="*act*", inner=True) == ["sigmoid", "mul"]
    assert names(layer="block", inner=True) == ["linear", "sigmoid", "mul", "add"]  # everything computed inside
    assert names(glob="*act/*") == ["sigmoid"]  # an inner tensor by its label, block.act/sigmoid
    assert names(layer="block.act/sigmoid") == ["sigmoid"]
    assert names(layer="block.act", op_type="Sigmoid") == ["sigmoid"]  # the op names it: the module bounds where
    assert names(layer="block", activation="output") == ["mul"]
    with pytest.raises(UserError, match="matches no tensor"):
        resolve(SelectorSpec(layer="block.act", op_type="Sigmoid", inner=False), tensors)
    with pytest.raises(UserError, match="matches no tensor"):
        resolve(SelectorSpec(glob="*act/*", inner=False), tensors)


class ReusingBlock(__import__("torch").nn.Module):
    """A torchvision-style block: one ReLU module applied twice."""

    def __init__(self):
        import torch

        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


class ReusingNet(__import__("torch").nn.Module):
    def __init__(self):
        import torch

        super().__init__()
        self.stem = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.layer1 = torch.nn.Sequential(ReusingBlock(), ReusingBlock())
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.layer1(self.stem(x)).mean(dim=(2, 3)))


def test_reused_modules_get_one_label_per_tensor_in_records_plots_and_selectors(tmp_path):
    import matplotlib.pyplot as plt
    import torch

    import layerscope
    from layerscope.plugins.information_plane.plot import plot_information_plane
    from layerscope.plugins.reporters.plots import default_plot

    torch.manual_seed(0)
    spec = {
        "model": {"source": ReusingNet()},
        "data": {"source": "digits", "layout": "image", "limit": 100},
        "analyses": [
            {"id": "ent", "estimator": "activation_entropy"},
            {"id": "ip", "estimator": "information_plane", "params": {"sigma_grid": 10}},
            {"id": "second", "estimator": "activation_entropy", "on": {"layer": "layer1.0.relu#2"}},
            {"id": "module", "estimator": "activation_entropy", "on": {"layer": "layer1.1.relu"}},
        ],
    }
    results = layerscope.run(spec, write=False, progress=False)

    def layers(analysis):
        return [r["layer"] for r in results.select(analysis=analysis, metric="entropy") if r["class"] == "all"]

    assert layers("ent") == ["layer1.0.relu", "layer1.0.relu#2", "layer1.1.relu", "layer1.1.relu#2"]
    assert layers("second") == ["layer1.0.relu#2"]
    assert layers("module") == ["layer1.1.relu", "layer1.1.relu#2"]  # a module path selects every call
    assert [t["layer"] for t in results.models[0]["tensors"]][:4] == layers("ent")
    figure = default_plot([r for r in results.records if r["analysis"] == "ent"])
    assert len(figure.axes[0].lines[0].get_xdata()) == 4  # four points, none overwritten
    plt.close(figure)
    figure = plot_information_plane([r for r in results.records if r["analysis"] == "ip"])
    assert len(figure.axes[0].collections) == 5  # four ReLU trajectories and the output, none merged
    plt.close(figure)
