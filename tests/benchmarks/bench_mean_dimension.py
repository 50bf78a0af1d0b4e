"""mean_dimension's perturbation plan against plain onnxruntime inference (issue: mean dimension).

The digits CNN, 500 pairs, 64 pixel features: 500 × 65 = 32,500 model evaluations. The
plan pass is timed in its parts — building the plan, onnxruntime, the estimator's
update — and its evaluations per second are compared with plain inference of the same
model at the same batch size (the plan's batches of 100 pairs × 65 rows). Target: ≥ 80 %
of plain throughput, i.e. plan construction and estimator overhead ≤ 25 %.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

PAIRS, REPEATS = 500, 5


def spec(selector) -> dict:
    analysis = {"id": "md", "estimator": "mean_dimension", "params": {"pairs": PAIRS, "features": "pixels"}}
    if selector:
        analysis["on"] = selector
    return {
        "model": {"source": "demo:digits-cnn"},
        "data": {"source": "digits", "batch_size": 100},
        "analyses": [analysis],
    }


def timed_run(selector) -> dict:
    """One run with the plan construction, the runner and the estimator update timed separately."""
    import layerscope
    import layerscope.engine.runner as runner_module
    from layerscope.plugins.mean_dimension.estimator import MeanDimension

    clock = {"plan": 0.0, "update": 0.0, "onnxruntime": 0.0, "rows": 0}
    plan, update, fetch = MeanDimension.input_plan, MeanDimension.update, runner_module.Runner._fetch

    def plan_timed(self, data):
        iterator = plan(self, data)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                clock["plan"] += time.perf_counter() - start
                return
            clock["plan"] += time.perf_counter() - start
            clock["rows"] += len(batch.inputs)
            yield batch

    def update_timed(self, batch):
        start = time.perf_counter()
        update(self, batch)
        clock["update"] += time.perf_counter() - start

    def fetch_timed(self, session, x, names):
        start = time.perf_counter()
        result = fetch(self, session, x, names)
        clock["onnxruntime"] += time.perf_counter() - start
        return result

    MeanDimension.input_plan, MeanDimension.update, runner_module.Runner._fetch = plan_timed, update_timed, fetch_timed
    try:
        start = time.perf_counter()
        results = layerscope.run(spec(selector), write=False, progress=False)
        clock["run"] = time.perf_counter() - start
    finally:
        MeanDimension.input_plan, MeanDimension.update, runner_module.Runner._fetch = plan, update, fetch
    clock["pass"] = clock["plan"] + clock["update"] + clock["onnxruntime"]
    clock["mean_dimension"] = {r["layer"]: round(r["value"], 3) for r in results.select(metric="mean_dimension")}
    return clock


def plain_inference(rows: int, batch: int) -> float:
    """Seconds for plain onnxruntime inference of *rows* digits-shaped inputs in batches of *batch*."""
    import onnx

    from layerscope.adapters.demo_zoo import EPOCHS, ensure_trained, epoch_label
    from layerscope.graph.session import create_session
    from layerscope.plugins.data.digits import load_digits_split

    session, _ = create_session(onnx.load(str(ensure_trained("digits-cnn") / f"{epoch_label(EPOCHS)}.onnx")), "cpu")
    x = load_digits_split("all")[0]
    inputs = np.resize(x, (rows, 64)).reshape(rows, 1, 8, 8).astype(np.float32)
    start = time.perf_counter()
    for begin in range(0, rows, batch):
        session.run(None, {"x": inputs[begin : begin + batch]})
    return time.perf_counter() - start


def main() -> None:
    timed_run({"role": "output"})  # warm-up (demo model, imports)
    for label, selector in (("model output only", {"role": "output"}), ("every activation + output (default)", None)):
        runs = [timed_run(selector) for _ in range(REPEATS)]
        best = min(runs, key=lambda c: c["pass"])
        rows = best["rows"]
        plain = statistics.median(plain_inference(rows, 100 * 65) for _ in range(REPEATS))
        print(
            f"[{label}] {rows} evaluations: plan pass {best['pass']:.3f} s (building the plan {best['plan']:.3f} s, "
            f"onnxruntime {best['onnxruntime']:.3f} s, estimator update {best['update']:.3f} s); whole run "
            f"{best['run']:.2f} s"
        )
        print(
            f"    plain inference of {rows} rows at batch 6500: {plain:.3f} s → plan throughput "
            f"{plain / best['pass'] * 100:.0f}% of plain (target ≥ 80%); overhead outside onnxruntime "
            f"{(best['plan'] + best['update']) / best['pass'] * 100:.0f}% (target ≤ 25%); "
            f"mean dimension {best['mean_dimension']}"
        )


if __name__ == "__main__":
    main()
