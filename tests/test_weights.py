"""Models held as their graph alone: large initializers stay in the model's file (or in one serialized
copy), sessions read them from there, and nothing about the numbers changes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import layerscope
from layerscope.engine.feeds import ModelFeeds
from layerscope.engine.runner import Runner
from layerscope.graph import session as session_module
from layerscope.graph.tensors import describe_tensors, dim_size
from layerscope.graph.weights import INLINE_BYTES, MEMORY_FILE, external_bytes, weight_free
from layerscope.model.adapter import load_onnx_file
from layerscope.util.errors import UserError
from layerscope.util.memory import available_memory


def _big_mlp(seed: int = 0) -> onnx.ModelProto:
    """The tiny MLP with a first layer large enough to be set apart (64 × 256 float32 = 64 KiB)."""
    rng = np.random.default_rng(seed)
    weights = {"w1": rng.standard_normal((64, 256)).astype(np.float32), "b1": np.zeros(256, np.float32)}
    weights["w2"] = rng.standard_normal((256, 10)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="act1"),
        helper.make_node("MatMul", ["a1", "w2"], ["logits"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _outputs(model_bytes_or_path, options=None) -> np.ndarray:
    x = np.random.default_rng(1).random((5, 64), dtype=np.float32)
    session = ort.InferenceSession(
        model_bytes_or_path, options or ort.SessionOptions(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("layout", ["inline", "external data"])
def test_the_graph_alone_runs_as_the_whole_model_and_reads_the_same_values(tmp_path, layout):
    model, path = _big_mlp(), tmp_path / "big.onnx"
    if layout == "inline":
        onnx.save(_big_mlp(), str(path))
    else:  # (saving with external data changes the saved object)
        onnx.save(_big_mlp(), str(path), save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    graph, weights = weight_free(path)
    assert graph.ByteSize() < INLINE_BYTES
    sizes = [numpy_helper.to_array(i).nbytes for i in model.graph.initializer]
    # set apart: initializers over INLINE_BYTES; a file's external data stays where it is, whatever its size
    assert external_bytes(graph) == sum(n for n in sizes if n > INLINE_BYTES or layout == "external data")
    options = ort.SessionOptions()
    weights.configure(options)
    assert np.array_equal(_outputs(graph.SerializeToString(), options), _outputs(model.SerializeToString()))
    for initializer in model.graph.initializer:
        assert np.array_equal(weights.array(graph, initializer.name), numpy_helper.to_array(initializer))
    assert [t.to_dict() for t in describe_tensors(graph)] == [t.to_dict() for t in describe_tensors(model)]


def test_a_model_object_is_serialized_once_and_read_from_that_copy():
    model = _big_mlp()
    graph, weights = weight_free(model)
    assert list(weights.files) == [MEMORY_FILE] and weights.folder is None
    options = ort.SessionOptions()
    weights.configure(options)
    assert np.array_equal(_outputs(graph.SerializeToString(), options), _outputs(model.SerializeToString()))
    assert np.array_equal(weights.array(graph, "w1"), numpy_helper.to_array(model.graph.initializer[0]))


def test_the_fingerprint_covers_every_weight_byte(tmp_path):
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_big_mlp(), str(first))
    changed = _big_mlp()
    raw = bytearray(changed.graph.initializer[0].raw_data)
    raw[-1] ^= 1  # one bit of the last weight
    changed.graph.initializer[0].raw_data = bytes(raw)
    onnx.save(changed, str(second))
    (a, wa), (b, wb) = weight_free(first), weight_free(second)
    assert wa.fingerprint(a) != wb.fingerprint(b)
    assert wa.fingerprint(a) == weight_free(first)[1].fingerprint(weight_free(first)[0])


def test_a_file_that_is_not_a_model_or_lacks_its_data_is_a_user_error(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xfe not protobuf at all" * 10)
    with pytest.raises(UserError, match="junk.onnx is not a readable ONNX model"):
        load_onnx_file(tmp_path / "junk.onnx")
    onnx.save(_big_mlp(), str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").write_bytes(b"short")
    with pytest.raises(UserError, match=r"ext.onnx is not a readable ONNX model .*is not in .*ext.data"):
        load_onnx_file(tmp_path / "ext.onnx")


def test_a_run_holds_the_graph_and_reads_the_weights_from_the_file(tmp_path, monkeypatch):
    """Sessions are made from the graph's bytes (no weight is serialized), and the records equal those of
    the model given as an object (its one serialized copy)."""
    onnx.save(_big_mlp(), str(tmp_path / "big.onnx"))
    sizes = []
    create = session_module.create_session

    def measured(model, device, weights=None, shared=False):
        sizes.append(model.ByteSize())
        return create(model, device, weights, shared)

    monkeypatch.setattr(session_module, "create_session", measured)
    monkeypatch.setattr("layerscope.engine.runner.create_session", measured)
    spec = {"data": {"source": "digits", "limit": 100}, "analyses": [{"id": "e", "estimator": "activation_entropy"}]}
    from_file = layerscope.run({**spec, "model": {"source": str(tmp_path / "big.onnx")}}, write=False, progress=False)
    assert sizes and max(sizes) < INLINE_BYTES * 4  # the graph alone, not its 66 KiB of weights
    from_object = layerscope.run({**spec, "model": {"source": _big_mlp()}}, write=False, progress=False)
    assert [{**r, "model": None} for r in from_file.records] == [{**r, "model": None} for r in from_object.records]


def _token_model() -> onnx.ModelProto:
    """ids (N, seq) int64 → Gather from a 50 × 8 table → Relu: a tensor of (N, seq, 8) floats."""
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("Relu", ["e"], ["r"], name="act")],
        "tokens",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, ["batch", "seq", 8])],
        [table],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_a_symbolic_sequence_axis_is_sized_from_the_feeds_without_a_probe(monkeypatch):
    """A tensor's size per sample comes from its inferred shape with the sequence axis bound to the feed's
    length; no session is made to measure it (BERT-base: 1 s of every run)."""
    model = _token_model()
    tensors = describe_tensors(model)
    sessions = []
    create = session_module.create_session
    monkeypatch.setattr(
        "layerscope.engine.runner.create_session", lambda *a, **k: sessions.append(1) or create(*a, **k)
    )
    runner = Runner(model, tensors, [("r",)], "cpu", 2**30, 4, None, None, ModelFeeds.for_model(tensors))
    ids = np.random.default_rng(0).integers(0, 50, (4, 13))
    ((_, fetched),) = list(runner.run({"ids": ids}))
    assert fetched["r"].shape == (4, 13, 8) and runner._sizes["r"] == 13 * 8 * 4
    assert len(sessions) == 1  # the fetch group's session, no probe


@pytest.mark.parametrize(
    "dim, bindings, size",
    [
        (5, {}, 5),
        ("seq", {"seq": 128}, 128),
        ("Min(512, seq)", {"seq": 128}, 128),
        ("Max(512, seq)", {"seq": 128}, 512),
        ("2*s0 + 1", {"s0": 3}, 7),
        ("floor(seq/2)", {"seq": 7}, 3),
        ("ceiling(seq/2)", {"seq": 7}, 4),
        ("seq", {}, None),  # unbound
        ("seq/2", {"seq": 7}, None),  # not a whole size
        ("__import__('os').getcwd()", {}, None),  # never code
        ("seq.real", {"seq": 3}, None),
        ("(lambda: 1)()", {}, None),
        (None, {}, None),
    ],
)
def test_symbolic_dims_are_arithmetic_only(dim, bindings, size):
    assert dim_size(dim, bindings) == size


def test_sessions_of_several_fetch_groups_share_one_copy_of_the_weights(tmp_path):
    """A budget that needs a session per fetch group: the sessions use the same OrtValues over the pages of
    one optimised copy of the model (prepacking off) instead of a copy each, each only the weights its
    group needs, and the records are those of one group."""
    onnx.save(_big_mlp(), str(tmp_path / "big.onnx"))
    graph, weights = load_onnx_file(tmp_path / "big.onnx")
    tensors = describe_tensors(graph)
    runner = Runner(
        graph, tensors, [("h1",), ("a1",)], "cpu", 300 * 4 * 4, 4, None, weights, ModelFeeds.for_model(tensors)
    )
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    parts = list(runner.run({"x": x}))
    assert len(runner.groups) == 2
    first, second = (dict(s.layerscope_shared_initializers) for s in runner._sessions)
    assert set(first) == set(second) == {"w1"} and first["w1"] is second["w1"]  # neither group reads w2
    one = Runner(graph, tensors, [("h1",), ("a1",)], "cpu", 2**30, 4, None, weights, ModelFeeds.for_model(tensors))
    ((_, whole),) = list(one.run({"x": x}))
    assert not one._sessions[0].layerscope_shared_initializers  # one session reads and prepacks its own
    fetched = {name: value for _, group in parts for name, value in group.items()}
    assert all(np.array_equal(fetched[n].numpy(), whole[n].numpy()) for n in ("h1", "a1"))


def _conv_stack(channels: int = 512, layers: int = 4) -> onnx.ModelProto:
    """*layers* 3 × 3 convolutions of *channels* channels, each followed by a Relu (512: 9 MiB of weights a
    layer), on 8 × 8 images: onnxruntime's full optimisation rewrites their weights (NCHWc on x86)."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for layer in range(layers):
        weight = (rng.standard_normal((channels, channels, 3, 3)) / (3 * np.sqrt(channels))).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{layer}"))
        nodes += [
            helper.make_node("Conv", [previous, f"w{layer}"], [f"c{layer}"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{layer}"], [f"a{layer}"]),
        ]
        previous = f"a{layer}"
    graph = helper.make_graph(
        nodes,
        "convs",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", channels, 8, 8])],
        [helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, None)],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_fetch_groups_run_one_optimised_graph_holding_its_weights_once(tmp_path, monkeypatch):
    """Four fetch groups of a convolution stack (36 MiB of weights): their sessions run one graph that
    onnxruntime optimised once with every group's tensors exposed, each cut to what its group needs, reading
    the optimised weights through one mapping of its saved copy, which is removed once the sessions are made
    (as is a copy a killed process left, and not one another process is writing or still optimising).
    The process grows by less than 5 copies of the weights (2 to 3.8 measured: the mapping, and memory the
    optimising session freed but the allocator kept; a session per group optimising its own grew by 8.5),
    and the tensors are the one-session fetch's, bit for bit."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the scratch folder, watched
    killed, live = tmp_path / "layerscope-optimised-killed", tmp_path / "layerscope-optimised-live"
    slow = tmp_path / "layerscope-optimised-slow"
    for folder in (killed, live, slow):  # a process killed 11 minutes ago, one saving now, one optimising long
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"0" * 1024)
    (killed / "owner").write_text("999999999")  # no such process
    (slow / "owner").write_text(str(os.getpid()))
    for path in (killed, killed / "weights.bin", killed / "owner", slow, slow / "weights.bin", slow / "owner"):
        os.utime(path, (time.time() - 660, time.time() - 660))
    onnx.save(_conv_stack(), str(tmp_path / "convs.onnx"))
    graph, weights = load_onnx_file(tmp_path / "convs.onnx")
    tensors = describe_tensors(graph)
    names = [f"a{layer}" for layer in range(4)]
    x = np.random.default_rng(0).random((2, 512, 8, 8), dtype=np.float32)
    one_sample = 512 * 8 * 8 * 4
    grown = _rss()
    runner = Runner(graph, tensors, [(n,) for n in names], "cpu", 2 * one_sample, 2, None, weights)
    parts = list(runner.run({"x": x}))
    grown = _rss() - grown
    assert len(runner.groups) == 4
    assert grown < 5 * external_bytes(graph), grown / external_bytes(graph)
    assert sorted(tmp_path.glob("layerscope-optimised-*")) == [live, slow]  # its own and the killed one's gone
    shared = [dict(s.layerscope_shared_initializers) for s in runner._sessions]
    assert all(value is shared[-1][name] for one in shared for name, value in one.items())
    whole = Runner(graph, tensors, [tuple(names)], "cpu", 2**30, 2, None, weights)
    ((_, expected),) = list(whole.run({"x": x}))
    fetched = {name: value for _, group in parts for name, value in group.items()}
    assert all(torch_equal(fetched[n], expected[n]) for n in names)


@pytest.mark.parametrize("failure", ["no scratch folder", "file size limit"])
def test_fetch_groups_make_a_copy_each_when_the_optimised_graph_cannot_be_saved(tmp_path, monkeypatch, failure):
    """The optimised graph cannot be saved: its scratch folder cannot be made, or writing its weights fails
    partway (a file size limit, as a full disk): each group's session is made from the model, the run says
    so in a warning, nothing written is left, and the tensors are the same."""
    import resource
    import signal
    import tempfile

    onnx.save(_conv_stack(channels=64), str(tmp_path / "convs.onnx"))  # 144 KiB of weights a layer
    graph, weights = load_onnx_file(tmp_path / "convs.onnx")
    tensors = describe_tensors(graph)
    names = [f"a{layer}" for layer in range(4)]
    x = np.random.default_rng(0).random((2, 64, 8, 8), dtype=np.float32)
    whole = Runner(graph, tensors, [tuple(names)], "cpu", 2**30, 2, None, weights)
    ((_, expected),) = list(whole.run({"x": x}))
    scratch = tmp_path / ("missing" if failure == "no scratch folder" else "scratch")
    if failure == "file size limit":
        scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    runner = Runner(graph, tensors, [(n,) for n in names], "cpu", 2 * 64 * 8 * 8 * 4, 2, None, weights)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    if failure == "file size limit":
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, limits[1]))
    try:
        fetched = {name: value for _, group in runner.run({"x": x}) for name, value in group.items()}
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, ignored)
    assert len(runner.groups) == 4
    (warning,) = runner.warnings
    assert warning.startswith("the 4 fetch groups' sessions could not share one optimised graph (")
    assert not scratch.exists() or not list(scratch.iterdir())
    assert all(torch_equal(fetched[n], expected[n]) for n in names)


def torch_equal(a, b) -> bool:
    return np.array_equal(a.numpy(), b.numpy())


def test_a_kept_session_reads_the_next_steps_weights_and_a_failed_check_stops_reuse():
    """A monitor's kept session, refilled with new weights, fetches what a new session with them fetches;
    each kept session's first reuse asks for a check, and a check that disagreed ends reuse."""
    from layerscope.engine.reused_sessions import ReusedSessions

    kept, x = ReusedSessions(), np.random.default_rng(1).random((5, 64), dtype=np.float32)
    steps = [weight_free(_big_mlp(seed)) for seed in range(3)]
    tensors = [t for t in describe_tensors(steps[0][0]) if t.name in ("a1", "logits")]

    def fetched(session) -> list[np.ndarray]:
        return session.run([t.name for t in tensors], {"x": x})

    (graph0, weights0) = steps[0]
    first, _, check = kept.session(graph0, tensors, "cpu", weights0)
    assert check is False and kept.made == 1
    for graph, weights in steps[1:]:
        session, _, check = kept.session(graph, tensors, "cpu", weights)
        assert session is first and check is (graph is steps[1][0])
        fresh = kept.fresh(graph, tensors, "cpu", weights)
        for got, want in zip(fetched(session), fetched(fresh)):
            np.testing.assert_array_equal(got, want)
        kept.checked(session, True)
    # the refilled weights are really read: the first step's outputs differ from the last's
    assert not np.array_equal(fetched(first)[1], fetched(kept.fresh(graph0, tensors, "cpu", weights0))[1])
    assert kept.trusted is True and kept.reused == 2

    kept.checked(first, False)
    again, _, _ = kept.session(graph0, tensors, "cpu", weights0)
    assert again is not first and kept.trusted is False


@pytest.mark.skipif(available_memory() is None, reason="the system does not report its available memory")
def test_a_model_larger_than_memory_is_refused_before_it_loads(tmp_path):
    """A model whose weights exceed the memory available (a sparse external-data file one GiB larger) exits 2
    with one message naming the memory its weights need, before the weights are read."""
    floats = (available_memory() + 2**30) // 4
    weights = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[floats])
    weights.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": "w.bin", "offset": "0", "length": str(floats * 4)}.items():
        weights.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0), helper.make_node("Add", ["x", "s"], ["y"])],
        "huge",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])],
        [weights],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path / "huge.onnx"
    )
    with open(tmp_path / "w.bin", "wb") as file:
        file.truncate(floats * 4)  # sparse: no disk, no memory
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {source: huge.onnx}\ndata: {source: digits, limit: 20}\n"
        "analyses: [{id: md, estimator: mean_dimension, on: {role: output}}]\noutputs: {dir: out}\n"
    )
    done = subprocess.run([sys.executable, "-m", "layerscope", "run", str(spec)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert re.search(r"model huge: its weights take \d+\.\d GiB .* has \d+\.\d GiB of memory available", done.stderr)
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
