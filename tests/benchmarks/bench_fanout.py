"""One forward pass feeds every analysis (issue: scale): three estimators in one spec against
three separate runs, side by side (target: the combined run takes ≤ 1.3× the slowest single
run), medians of three.

- resnet50 (the graph the onnx package ships; 16 synthetic 224×224 images at its fixed
  batch 1): inference dominates, so fan-out saves it twice.
- the demo CNN over the digits set, for contrast: inference is a few milliseconds and the
  estimators dominate, so the combined run costs about the sum of their work (one pass
  cannot remove estimator work, only model work).

Also the densenet121 graph with every Relu output under a memory budget: peak fetched
bytes against the budget.
"""

from __future__ import annotations

import os
import statistics
import time

LIGHT = os.path.join("backend", "test", "data", "light")
RESNET_ANALYSES = [
    {"id": "binary", "estimator": "activation_entropy"},
    {
        "id": "channels",
        "estimator": "activation_entropy",
        "params": {"variant": "histogram", "neurons": "channels", "range": [0, 8], "bins": 32},
    },
    {"id": "ip", "estimator": "information_plane", "params": {"sigma": 50.0, "sigma_x": 400.0, "batch_size": 8}},
]
DEMO_ANALYSES = [
    {"id": "entropy", "estimator": "activation_entropy", "on": "all"},
    {"id": "pattern", "estimator": "activation_entropy", "on": "all", "params": {"variant": "pattern"}},
    {"id": "ip", "estimator": "information_plane", "params": {"sigma": 2.0, "sigma_x": 4.0}},
]


def light_model(name: str) -> str:
    import onnx

    return os.path.join(os.path.dirname(onnx.__file__), LIGHT, f"light_{name}.onnx")


def resnet_spec(analyses) -> dict:
    return {
        "model": {"source": light_model("resnet50")},
        "analyses": analyses,
        "data": {"source": "synthetic", "samples": 16, "shape": [3, 224, 224], "classes": 2, "batch_size": 8},
    }


def demo_spec(analyses) -> dict:
    return {
        "model": {"source": "demo:digits-cnn"},
        "data": {"source": "digits", "batch_size": 100},
        "analyses": analyses,
    }


def timed(spec: dict, repeats: int = 3) -> float:
    import layerscope

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layerscope.run(spec, write=False, progress=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fan_out(title: str, make_spec, analyses) -> None:
    timed(make_spec(analyses[:1]), repeats=1)  # warm-up
    singles = {a["id"]: timed(make_spec([a])) for a in analyses}
    combined = timed(make_spec(analyses))
    slowest = max(singles.values())
    print(
        f"{title}: single runs "
        + ", ".join(f"{k} {v:.2f} s" for k, v in singles.items())
        + f" (sum {sum(singles.values()):.2f} s); one spec with all three {combined:.2f} s → "
        f"{combined / slowest:.2f}× the slowest single run (target ≤ 1.3×)"
    )


def densenet(budget: int) -> dict:
    import layerscope

    spec = {
        "model": {"source": light_model("densenet121")},
        "data": {"source": "synthetic", "samples": 4, "shape": [3, 224, 224], "classes": 2, "batch_size": 4},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
        "runtime": {"memory_budget": budget},
    }
    start = time.perf_counter()
    results = layerscope.run(spec, write=False, progress=False)
    return {"seconds": time.perf_counter() - start, **results.models[0]}


def main() -> None:
    from layerscope.util.units import format_bytes

    fan_out("resnet50, 16 images, Relu outputs", resnet_spec, RESNET_ANALYSES)
    fan_out("demo CNN, 1,797 digits (estimator-bound)", demo_spec, DEMO_ANALYSES)
    for budget in (2**30, 16 * 2**20):
        run = densenet(budget)
        print(
            f"densenet121, 121 Relu outputs (62.7 MB per sample), budget {format_bytes(budget)}: "
            f"{run['fetch_groups'][0]} fetch group(s), peak fetched {format_bytes(run['peak_fetched_bytes'])}, "
            f"{run['seconds']:.1f} s for 4 samples"
        )


if __name__ == "__main__":
    main()
