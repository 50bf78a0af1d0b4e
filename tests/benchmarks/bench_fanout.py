"""One forward pass feeds every analysis (issue: scale): three estimators in one spec against three
separate runs, side by side, on the demo CNN over the digits set (target: the combined run takes
≤ 1.3× the slowest single run). Also the densenet121 graph the onnx package ships, with every Relu
output under a memory budget: peak fetched bytes against the budget.
"""

from __future__ import annotations

import os
import statistics
import time

ANALYSES = [{"id": "entropy", "estimator": "activation_entropy", "on": "all"},
            {"id": "hist", "estimator": "activation_entropy", "on": "all", "params": {"variant": "pattern"}},
            {"id": "ip", "estimator": "information_plane", "params": {"sigma": 2.0, "sigma_x": 4.0}}]


def timed(analyses, repeats=5) -> float:
    import layerscope

    spec = {"model": {"source": "demo:digits-cnn"}, "data": {"source": "digits", "batch_size": 100},
            "analyses": analyses}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layerscope.run(spec, write=False, progress=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def densenet(budget: int) -> dict:
    import onnx

    import layerscope

    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_densenet121.onnx")
    spec = {"model": {"source": path},
            "data": {"source": "synthetic", "samples": 4, "shape": [3, 224, 224], "classes": 2, "batch_size": 4},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}], "runtime": {"memory_budget": budget}}
    start = time.perf_counter()
    results = layerscope.run(spec, write=False, progress=False)
    return {"seconds": time.perf_counter() - start, **results.models[0]}


def main() -> None:
    from layerscope.units import format_bytes

    timed(ANALYSES[:1], repeats=1)  # warm-up
    singles = {a["id"]: timed([a]) for a in ANALYSES}
    combined = timed(ANALYSES)
    slowest = max(singles.values())
    print("single runs: " + ", ".join(f"{k} {v:.2f} s" for k, v in singles.items())
          + f" (sum {sum(singles.values()):.2f} s)")
    print(f"one spec with all three: {combined:.2f} s → {combined / slowest:.2f}× the slowest single run "
          f"(target ≤ 1.3×)")
    for budget in (2**30, 16 * 2**20):
        run = densenet(budget)
        print(f"densenet121, 121 Relu outputs (62.7 MB per sample), budget {format_bytes(budget)}: "
              f"{run['fetch_groups'][0]} fetch group(s), peak fetched {format_bytes(run['peak_fetched_bytes'])}, "
              f"{run['seconds']:.1f} s for 4 samples")


if __name__ == "__main__":
    main()
