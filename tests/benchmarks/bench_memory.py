"""Peak memory of a run against plain onnxruntime (issue: speed, memory target).

ResNet-50 (``architectures.py``, random weights, 64 synthetic 224×224 images, batch 32) with
three estimators in one spec — activation entropy, the non-linearity signature and the
information plane (fixed widths) over every activation — at the default budget and at
budgets that force several fetch groups. Each figure is the peak resident set (``VmHWM``)
of a fresh process, against plain onnxruntime inference of the same graph in a fresh
process; the target is ``peak ≤ 1.5 × onnxruntime's peak + peak_fetched_bytes`` (what the
budget really held), and a peak that does not grow with the number of fetch groups.

Run: ``python tests/benchmarks/bench_memory.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH = 32
ANALYSES = [
    {"id": "entropy", "estimator": "activation_entropy"},
    {"id": "signature", "estimator": "nonlinearity_signature", "params": {"samples": 64, "side_metrics": False}},
    {"id": "ip", "estimator": "information_plane", "params": {"sigma": 50.0, "sigma_x": 400.0, "batch_size": 32}},
]
BUDGETS = ["2GiB", "1GiB", "512MiB"]


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def measure_layerscope(model: str, data: str, budget: str) -> dict:
    import layerscope

    spec = {
        "model": {"source": model},
        "data": {"source": "npz", "path": data, "batch_size": BATCH},
        "analyses": ANALYSES,
        "runtime": {"memory_budget": budget},
    }
    results = layerscope.run(spec, write=False, progress=False)
    info = results.models[0]
    return {"peak": _peak_rss(), "groups": max(info["fetch_groups"]), "fetched": info["peak_fetched_bytes"]}


def measure_onnxruntime(model: str, data: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    x = np.load(data)["x"]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for start in range(0, len(x), BATCH):
        session.run(None, {name: x[start : start + BATCH]})
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
    sys.path.insert(0, str(HERE))
    from bench_vs_hooks import prepare

    mib = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        model, data = (str(path) for path in prepare("resnet50", Path(tmp)))
        ort_peak = _run("onnxruntime", model, data)["peak"]
        print(f"resnet50, 64 samples, batch {BATCH}; plain onnxruntime peak RSS {ort_peak / mib:.0f} MiB")
        print(f"{'budget':>8s} {'groups':>6s} {'fetched MiB':>11s} {'peak MiB':>9s} {'target MiB':>10s} {'ratio':>6s}")
        for budget in BUDGETS:
            figures = _run("layerscope", model, data, budget)
            target = 1.5 * ort_peak + figures["fetched"]
            print(
                f"{budget:>8s} {figures['groups']:6d} {figures['fetched'] / mib:11.0f} {figures['peak'] / mib:9.0f} "
                f"{target / mib:10.0f} {figures['peak'] / target:6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
