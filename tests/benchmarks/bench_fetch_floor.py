"""What reading every activation through onnxruntime costs before any statistic is computed (issue: speed).

For ResNet-18, ResNet-50 and MobileNetV3-small (``architectures.py``, random weights; the graphs and
synthetic images of ``bench_vs_hooks.py``), the same batches of 32 run through onnxruntime five ways:

- ``plain``: inference, only the model output fetched (the ``÷ ort`` reference of ``bench_vs_hooks.py``);
- ``fetch outputs``: every activation's output fetched as well (what activation entropy and the
  information plane read), nothing computed on it;
- ``fetch in+out``: every activation's input and output fetched (what the signature reads);
- ``in-graph counts``: per-class on-counts of every activation computed inside the graph
  (Greater → Cast → MatMul with a one-hot label input, classes × neurons fetched instead of
  samples × neurons): the estimator reduction the graph itself could do;
- ``in-graph + probe``: the same, plus a finiteness probe per activation (ReduceSum of x·0, NaN
  exactly when an element is NaN or ±Inf), since the fetched tensor can no longer be checked;
- ``in-graph means``: every activation's input and output averaged over H×W inside the graph
  (ReduceMean; what the signature keeps of a 4-D tensor), samples × channels fetched.

Seconds per pass over the samples (medians of 5 passes after a warm-up, interleaved across the variants) and the
ratio ``plain ÷ variant``: the highest ``÷ ort`` throughput ratio any estimator reading those tensors
can reach, since its own maths comes on top.

Run: ``python tests/benchmarks/bench_fetch_floor.py [--models resnet18,...]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ACTIVATIONS = ("Relu", "HardSwish", "HardSigmoid")
BATCH = 32
ROUNDS = 5
COUNTS = ("in-graph counts", "in-graph + probe")  # the variants fed a one-hot label matrix


def variant(model, kind: str):
    """A copy of *model* set up for *kind* (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper

    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    activations = [node for node in graph.graph.node if node.op_type in ACTIVATIONS]
    outputs = graph.graph.output
    if kind == "plain":
        return graph
    if kind == "in-graph means":
        ranks = {
            v.name: len(v.type.tensor_type.shape.dim) for v in onnx.shape_inference.infer_shapes(model).graph.value_info
        }
        graph.graph.initializer.append(helper.make_tensor("spatial", TensorProto.INT64, [2], [2, 3]))
        names = dict.fromkeys(name for node in activations for name in (node.input[0], node.output[0]))
        for index, name in enumerate(names):
            mean = f"bench_mean_{index}"
            graph.graph.node.append(
                helper.make_node("ReduceMean", [name, "spatial"], [mean], keepdims=0)
                if ranks.get(name) == 4
                else helper.make_node("Identity", [name], [mean])
            )
            outputs.append(helper.make_tensor_value_info(mean, TensorProto.FLOAT, None))
        return graph
    if kind.startswith("fetch"):
        names = [n.output[0] for n in activations]
        names += [n.input[0] for n in activations] if kind == "fetch in+out" else []
        outputs.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in dict.fromkeys(names))
        return graph
    graph.graph.input.append(helper.make_tensor_value_info("one_hot_t", TensorProto.FLOAT, ["classes", "samples"]))
    graph.graph.initializer.extend(
        [
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
            helper.make_tensor("rows", TensorProto.INT64, [2], [0, -1]),
        ]
    )
    for index, node in enumerate(activations):
        value, flat, counts = node.output[0], f"flat_{index}", f"counts_{index}"
        graph.graph.node.extend(
            [
                helper.make_node("Reshape", [value, "rows"], [flat]),
                helper.make_node("Greater", [flat, "zero"], [f"on_{index}"]),
                helper.make_node("Cast", [f"on_{index}"], [f"on_float_{index}"], to=TensorProto.FLOAT),
                helper.make_node("MatMul", ["one_hot_t", f"on_float_{index}"], [counts]),
            ]
        )
        outputs.append(helper.make_tensor_value_info(counts, TensorProto.FLOAT, None))
        if kind == "in-graph + probe":
            graph.graph.node.extend(
                [
                    helper.make_node("Mul", [flat, "zero"], [f"zeros_{index}"]),
                    helper.make_node("ReduceSum", [f"zeros_{index}"], [f"probe_{index}"], keepdims=0),
                ]
            )
            outputs.append(helper.make_tensor_value_info(f"probe_{index}", TensorProto.FLOAT, None))
    return graph


def prepared(model, kind: str, x, y):
    """An onnxruntime session of *kind* and its feeds, batch by batch."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(variant(model, kind).SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batches = []
    for start in range(0, len(x), BATCH):
        feeds = {name: x[start : start + BATCH]}
        if kind in COUNTS:
            labels = y[start : start + BATCH]
            feeds["one_hot_t"] = (labels[None, :] == np.unique(labels)[:, None]).astype(np.float32)
        batches.append(feeds)
    return session, batches


def seconds_per_pass(model, kinds: tuple[str, ...], x, y) -> dict[str, float]:
    """Median seconds of a pass over the samples for every kind, passes interleaved across kinds (the
    machine's drift spreads over all of them), the first round a warm-up."""
    runs = {kind: prepared(model, kind, x, y) for kind in kinds}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(ROUNDS + 1):
        for kind, (session, batches) in runs.items():
            started = time.perf_counter()
            for feeds in batches:
                session.run(None, feeds)
            times[kind].append(time.perf_counter() - started)
    return {kind: statistics.median(values[1:]) for kind, values in times.items()}


def main() -> None:
    import numpy as np
    import onnx

    sys.path.insert(0, str(HERE))
    from bench_vs_hooks import SAMPLES, prepare

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v3_small")
    args = parser.parse_args()
    kinds = ("plain", "fetch outputs", "fetch in+out", "in-graph counts", "in-graph + probe", "in-graph means")
    print(
        f"seconds per pass (plain ÷ variant); batch {BATCH}, one session each, medians of {ROUNDS} interleaved passes"
    )
    print(f"{'model':<20}{'samples':>8}" + "".join(f"{kind:>22}" for kind in kinds))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            path, datasets = prepare(name, Path(folder), [SAMPLES[name]])
            model, archive = onnx.load(str(path)), np.load(datasets[SAMPLES[name]])
            seconds = seconds_per_pass(model, kinds, archive["x"], archive["y"])
            plain = seconds["plain"]
            cells = "".join(f"{f'{s:.3f} ({plain / s:.2f})':>22}" for s in seconds.values())
            print(f"{name:<20}{SAMPLES[name]:>8}{cells}")


if __name__ == "__main__":
    main()
