"""Peak memory of a run against plain onnxruntime (issue: speed, memory target).

- ``resnet50`` (``architectures.py``, random weights, 64 synthetic 224×224 images, batch 32) with
  three estimators in one spec — activation entropy, the non-linearity signature and the
  information plane (fixed widths) over every activation;
- ``bert_base`` (64 sequences of 128 tokens) with activation entropy and the signature of every GELU;
- ``mlp_1gib``: sixteen 4096 × 4096 float32 ``MatMul`` → ``Relu`` layers (1 GiB of weights in one
  ``.onnx`` file), 64 samples, activation entropy of every ReLU;

each at the default budget and at budgets that force several fetch groups (down to 16 MiB). Each
figure is the peak resident set (``VmHWM``) of a fresh process, against plain onnxruntime inference
of the same file in a fresh process; the target is the issue's ``peak ≤ 1.5 × (onnxruntime's peak +
peak_fetched_bytes)`` (what the budget really held), and a peak that does not grow with the number
of fetch groups. The ``strict`` column also gives the peak against ``1.5 × onnxruntime's peak +
peak_fetched_bytes``, the stricter reading earlier figures used.

Run: ``python tests/benchmarks/bench_memory.py [--models resnet50,bert_base,mlp_1gib]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = 32
ENTROPY = {"id": "entropy", "estimator": "activation_entropy"}
SIGNATURE = {"id": "signature", "estimator": "nonlinearity_signature", "params": {"samples": 64, "side_metrics": False}}
ANALYSES = {
    "resnet50": [
        ENTROPY,
        SIGNATURE,
        {"id": "ip", "estimator": "information_plane", "params": {"sigma": 50.0, "sigma_x": 400.0, "batch_size": 32}},
    ],
    "bert_base": [{**ENTROPY, "on": {"activation": "output"}}, {**SIGNATURE, "on": {"activation": "output"}}],
    "mlp_1gib": [ENTROPY],
}
BUDGETS = {"resnet50": ["2GiB", "1GiB", "512MiB"], "bert_base": ["2GiB", "256MiB"], "mlp_1gib": ["2GiB", "16MiB"]}
SAMPLES, WIDTH, LAYERS = 64, 4096, 16


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def mlp_1gib(folder: Path) -> tuple[Path, Path]:
    """An ONNX file of sixteen 4096 × 4096 MatMul → Relu layers (1 GiB of float32 weights, inline) and
    an npz of 64 samples."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "x"
    for layer in range(LAYERS):
        weight = (rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) / np.sqrt(WIDTH)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{layer}"))
        nodes += [
            helper.make_node("MatMul", [previous, f"w{layer}"], [f"h{layer}"], name=f"fc{layer}"),
            helper.make_node("Relu", [f"h{layer}"], [f"a{layer}"], name=f"act{layer}"),
        ]
        previous = f"a{layer}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info(previous, onnx.TensorProto.FLOAT, ["N", WIDTH])],
        weights,
    )
    model, data = folder / "mlp_1gib.onnx", folder / "mlp_1gib.npz"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(model))
    np.savez(data, x=rng.standard_normal((SAMPLES, WIDTH), dtype=np.float32), y=rng.integers(0, 10, SAMPLES))
    return model, data


def measure_layerscope(name: str, model: str, data: str, budget: str) -> dict:
    import layerscope

    spec = {
        "model": {"source": model},
        "data": {"source": "npz", "path": data, "batch_size": BATCH},
        "analyses": ANALYSES[name],
        "runtime": {"memory_budget": budget},
    }
    if name == "bert_base":
        spec["data"]["inputs"] = {"input_ids": "ids", "attention_mask": "mask"}
    results = layerscope.run(spec, write=False, progress=False)
    info = results.models[0]
    return {"peak": _peak_rss(), "groups": max(info["fetch_groups"]), "fetched": info["peak_fetched_bytes"]}


def measure_onnxruntime(name: str, model: str, data: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    archive = np.load(data)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    arrays = [archive["ids"], archive["mask"]] if "ids" in archive.files else [archive["x"]]
    for start in range(0, len(arrays[0]), BATCH):
        session.run(None, {n: a[start : start + BATCH] for n, a in zip(names, arrays)})
    return {"peak": _peak_rss()}


def _run(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        system, *rest = sys.argv[2:]
        figures = measure_layerscope(*rest) if system == "layerscope" else measure_onnxruntime(*rest)
        print(json.dumps(figures))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet50,bert_base,mlp_1gib")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from bench_vs_hooks import prepare

    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "mlp_1gib":
                model_path, data_path = mlp_1gib(Path(tmp))
            else:
                model_path, datasets = prepare(name, Path(tmp), [SAMPLES])
                data_path = datasets[SAMPLES]
            model, data = str(model_path), str(data_path)
            ort_peak = _run("onnxruntime", name, model, data)["peak"]
            print(f"{name}, {SAMPLES} samples, batch {BATCH}; plain onnxruntime peak RSS {ort_peak / mib:.0f} MiB")
            print(
                f"{'budget':>8s} {'groups':>6s} {'fetched MiB':>11s} {'peak MiB':>9s} {'target MiB':>10s} {'ratio':>6s}"
                f" {'strict':>6s}"
            )
            for budget in BUDGETS[name]:
                figures = _run("layerscope", name, model, data, budget)
                target = 1.5 * (ort_peak + figures["fetched"])
                strict = 1.5 * ort_peak + figures["fetched"]
                print(
                    f"{budget:>8s} {figures['groups']:6d} {figures['fetched'] / mib:11.0f} "
                    f"{figures['peak'] / mib:9.0f} {target / mib:10.0f} {figures['peak'] / target:6.2f}"
                    f" {figures['peak'] / strict:6.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
