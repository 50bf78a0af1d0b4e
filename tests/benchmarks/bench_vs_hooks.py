"""layerscope against hand-written PyTorch forward hooks and plain onnxruntime (issue: speed).

For ResNet-18, ResNet-50 and MobileNetV3-small (``architectures.py``, random weights) and
synthetic 224×224 images with 10 classes, three ways of getting the same numbers:

- ``layerscope``: ``layerscope.run`` on the exported ``.onnx`` (export not timed), the
  analysis's default selector (every activation output), whole run including session set-up;
- ``hooks``: the PyTorch model in eager mode with a forward hook on every activation module
  computing the same statistic (a competent hand-written version: counts per class through
  one one-hot matrix product per activation call);
- ``onnxruntime``: plain inference of the same graph, nothing fetched but the output.

The statistic is activation entropy (binary, per class and pooled). Each measurement runs in
a fresh process, ``ROUNDS`` rounds interleaved, medians reported as samples/s and ratios.
``--threads 1`` sets OMP_NUM_THREADS=1 (and onnxruntime's and torch's threads) in the
measured processes; ``--load 2`` runs two CPU-bound processes beside them.

Run: ``python tests/benchmarks/bench_vs_hooks.py [--threads 1] [--load 2] [--models resnet18,...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLES = {"resnet18": 128, "resnet50": 64, "mobilenet_v3_small": 256}
BATCH, CLASSES, ROUNDS = 32, 10, 3


def prepare(name: str, folder: Path) -> tuple[Path, Path]:
    """The exported ONNX graph and an npz of synthetic images and labels for *name*."""
    import numpy as np
    import onnx

    sys.path.insert(0, str(HERE))
    from architectures import build

    from layerscope.adapters.torch_export import export_to_onnx

    rng = np.random.default_rng(0)
    x = rng.standard_normal((SAMPLES[name], 3, 224, 224), dtype=np.float32)
    y = rng.integers(0, CLASSES, SAMPLES[name])
    data, model = folder / f"{name}.npz", folder / f"{name}.onnx"
    np.savez(data, x=x, y=y)
    onnx.save(export_to_onnx(build(name), x[:2]), str(model))
    return model, data


def measure_layerscope(model: Path, data: Path) -> float:
    import layerscope
    import layerscope.engine  # noqa: F401  torch and onnxruntime, imported before timing as the others do

    spec = {"model": {"source": str(model)}, "data": {"source": "npz", "path": str(data), "batch_size": BATCH},
            "analyses": [{"id": "entropy", "estimator": "activation_entropy"}]}
    started = time.perf_counter()
    layerscope.run(spec, write=False, progress=False)
    return time.perf_counter() - started


def measure_onnxruntime(model: Path, data: Path) -> float:
    import numpy as np
    import onnxruntime as ort

    x = np.load(data)["x"]
    started = time.perf_counter()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for start in range(0, len(x), BATCH):
        session.run(None, {name: x[start:start + BATCH]})
    return time.perf_counter() - started


def measure_hooks(name: str, data: Path) -> float:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from architectures import build

    model = build(name)
    archive = np.load(data)
    x, y = torch.from_numpy(archive["x"]), torch.from_numpy(archive["y"])
    counts: dict[int, torch.Tensor] = {}
    state = {"call": 0, "labels": None}

    def hook(module, inputs, output):
        on = (output > 0).flatten(1).to(torch.float32)
        per_class = state["labels"].T @ on  # (classes, neurons) on-counts
        key = state["call"]
        counts[key] = counts[key] + per_class if key in counts else per_class
        state["call"] += 1

    for module in model.modules():
        if isinstance(module, (torch.nn.ReLU, torch.nn.Hardswish, torch.nn.Hardsigmoid)):
            module.register_forward_hook(hook)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(x), BATCH):
            state["call"], state["labels"] = 0, torch.nn.functional.one_hot(y[start:start + BATCH], CLASSES).float()
            model(x[start:start + BATCH])
    samples = torch.bincount(y, minlength=CLASSES).to(torch.float64)
    for on in counts.values():  # the entropies themselves: per class and pooled
        for p in (on.double() / samples[:, None], on.double().sum(0) / samples.sum()):
            p = p.clamp(0, 1)
            (torch.special.entr(p) + torch.special.entr(1 - p)).mean(-1)
    return time.perf_counter() - started


def _child(system: str, name: str, model: str, data: str) -> None:
    seconds = {"layerscope": lambda: measure_layerscope(Path(model), Path(data)),
               "onnxruntime": lambda: measure_onnxruntime(Path(model), Path(data)),
               "hooks": lambda: measure_hooks(name, Path(data))}[system]()
    print(json.dumps({"seconds": seconds}))


def _run(system: str, name: str, model: Path, data: Path, threads: int | None) -> float:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, __file__, "--child", system, name, str(model), str(data)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the measured processes")
    parser.add_argument("--load", type=int, default=0, help="CPU-bound processes running beside the measurements")
    parser.add_argument("--models", default=",".join(SAMPLES))
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"threads: {args.threads or 'default'}, competing CPU-bound processes: {args.load}, "
                  f"{os.cpu_count()} cores; medians of {ROUNDS} interleaved rounds")
            print(f"{'model':20s} {'samples':>7s} {'layerscope':>11s} {'onnxruntime':>12s} {'hooks':>8s}"
                  f" {'÷ ort':>7s} {'÷ hooks':>8s}   (samples/s)")
            for name in args.models.split(","):
                model, data = prepare(name, Path(tmp))
                times: dict[str, list[float]] = {"layerscope": [], "onnxruntime": [], "hooks": []}
                for _ in range(ROUNDS):
                    for system in times:
                        times[system].append(_run(system, name, model, data, args.threads))
                rate = {system: SAMPLES[name] / statistics.median(t) for system, t in times.items()}
                print(f"{name:20s} {SAMPLES[name]:7d} {rate['layerscope']:11.1f} {rate['onnxruntime']:12.1f} "
                      f"{rate['hooks']:8.1f} {rate['layerscope'] / rate['onnxruntime']:7.2f} "
                      f"{rate['layerscope'] / rate['hooks']:8.2f}", flush=True)
    finally:
        for process in load:
            process.kill()


if __name__ == "__main__":
    main()
