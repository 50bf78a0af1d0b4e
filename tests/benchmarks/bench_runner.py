"""Runner benchmark on the demo CNN at batch 256 (issue: engine foundation).

(a) time and peak memory of the runner fetching every observable tensor, as a ratio to
    plain onnxruntime inference of the same model (target ≤ 2.0× time);
(b) peak memory of a run with ``memory_budget`` = a quarter of one batch's tensors, against
    budget + the session's own footprint;
(c) peak memory of a whole run over 10× more samples (target: ≤ 10 % growth): the peak
    resident set of the process, and the part of it above the baseline (which varies by a
    few MiB from process to process as allocators warm up, so medians are reported).

Memory is measured in a fresh process per figure: the kernel's resident-set high-water
mark is reset once the modules are imported and the model is loaded, and the figure is
the peak minus the resident set at that moment (Linux ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

BATCH = 256


def _reset_peak_rss() -> int:
    """Return freed memory to the system, reset the resident-set high-water mark (Linux ≥ 4.0),
    and return the current RSS."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_bytes("VmRSS")


def _peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _digits_batches(repeat: int = 1):
    import numpy as np

    from layerscope.plugins.data.digits import load_digits_split

    x = np.concatenate([load_digits_split("all")[0]] * repeat).reshape(-1, 1, 8, 8)
    return [x[i : i + BATCH] for i in range(0, len(x) - BATCH + 1, BATCH)]


def _model():
    import onnx

    from layerscope.adapters.demo_zoo import EPOCHS, ensure_trained, epoch_label

    return onnx.load(str(ensure_trained("digits-cnn") / f"{epoch_label(EPOCHS)}.onnx"))


def _all_tensors(proto):
    from layerscope.graph.tensors import describe_tensors

    tensors = describe_tensors(proto)
    return tensors, [t for t in tensors if t.observable and t.role != "input"]


def worker(mode: str, arg: str) -> dict:
    """One measurement in this (fresh) process."""
    import onnxruntime  # noqa: F401  (library loading is not the session's footprint)
    import torch

    import layerscope
    from layerscope.engine.runner import Runner
    from layerscope.graph.session import create_session

    proto = _model()
    batches = _digits_batches(4)
    tensors, fetch = _all_tensors(proto)  # shape inference happens before any run; not counted
    float(torch.ones(2**20).sum())  # torch's first parallel op starts its thread pool: not ours to count
    baseline = _reset_peak_rss()
    if mode == "plain":
        session, _ = create_session(proto, "cpu")
        sessions = _status_bytes("VmRSS") - baseline
        for x in batches:
            session.run(None, {"x": x})
        return {"peak_delta": _peak_rss_bytes() - baseline, "sessions": sessions}
    if mode == "fetch_all":
        runner = Runner(proto, tensors, [(t.name,) for t in fetch], "cpu", int(arg), BATCH, {t.name for t in fetch})
        runner.groups = runner._plan(runner.prepare(batches[0]))
        sessions = _status_bytes("VmRSS") - baseline
        largest_fetch = 0
        for x in batches:
            for _, fetched in runner.run(runner.prepare(x)):
                largest_fetch = max(largest_fetch, sum(v.numel() * v.element_size() for v in fetched.values()))
                for value in fetched.values():
                    float(value.sum())  # touch the data, as an estimator would
                del fetched
        return {
            "peak_delta": _peak_rss_bytes() - baseline,
            "groups": len(runner.groups),
            "sessions": sessions,
            "largest_fetch": largest_fetch,
            "micro_batches": [g.micro_batch for g in runner.groups],
        }
    if mode == "run":
        spec = {
            "model": {"source": "demo:digits-cnn"},
            "data": {"source": "synthetic", "samples": int(arg), "shape": [1, 8, 8], "batch_size": BATCH},
            "analyses": [{"id": "e", "estimator": "activation_entropy", "on": "all"}],
            "runtime": {"memory_budget": "1GiB"},
        }
        layerscope.run(spec, write=False, progress=False)
        return {"peak_delta": _peak_rss_bytes() - baseline, "peak_total": _peak_rss_bytes()}
    raise ValueError(mode)


def measure(mode: str, arg: str = "0", repeats: int = 3) -> dict:
    """The run (of *repeats* fresh processes) with the median peak: RSS figures vary by a few MiB."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", mode, arg], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return sorted(runs, key=lambda r: r["peak_delta"])[len(runs) // 2]


def time_side_by_side(repeats: int = 7) -> dict:
    """Median seconds per pass over the data: plain inference vs runner fetching every tensor."""
    from layerscope.engine.runner import Runner
    from layerscope.graph.session import create_session

    proto = _model()
    batches = _digits_batches(4)
    session, _ = create_session(proto, "cpu")
    tensors, fetch = _all_tensors(proto)
    runner = Runner(proto, tensors, [(t.name,) for t in fetch], "cpu", 2**40, BATCH)

    def plain():
        for x in batches:
            session.run(None, {"x": x})

    def fetch_all():
        for x in batches:
            for _ in runner.run(runner.prepare(x)):
                pass

    plain(), fetch_all()  # warm-up
    timings = {"plain": [], "fetch_all": []}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("fetch_all", fetch_all)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()} | {
        "samples_per_pass": len(batches) * BATCH,
        "tensors": len(fetch),
    }


def main() -> None:
    from layerscope.util.units import format_bytes

    proto = _model()
    _, fetch = _all_tensors(proto)
    batch_bytes = sum(t.bytes_per_sample() for t in fetch) * BATCH
    quarter = batch_bytes // 4

    timing = time_side_by_side()
    plain_mem = measure("plain")
    all_mem = measure("fetch_all", str(2**40))
    budget_mem = measure("fetch_all", str(quarter))
    small, large = measure("run", str(10 * BATCH), repeats=5), measure("run", str(100 * BATCH), repeats=5)

    print(
        f"demo CNN, batch {BATCH}, {timing['tensors']} observable tensors, "
        f"one batch of them = {format_bytes(batch_bytes)}"
    )
    print(
        f"(a) time per pass ({timing['samples_per_pass']} samples): plain {timing['plain'] * 1e3:.1f} ms, "
        f"fetch-all {timing['fetch_all'] * 1e3:.1f} ms → "
        f"ratio {timing['fetch_all'] / timing['plain']:.2f}× (target ≤ 2.0×)"
    )
    print(
        f"    peak memory over baseline: plain {format_bytes(plain_mem['peak_delta'])}, fetch-all "
        f"{format_bytes(all_mem['peak_delta'])} → ratio {all_mem['peak_delta'] / max(plain_mem['peak_delta'], 1):.2f}×"
    )
    limit = plain_mem["peak_delta"] + quarter
    print(
        f"(b) budget {format_bytes(quarter)} (quarter batch) → {budget_mem['groups']} fetch group(s), micro-batches "
        f"{budget_mem['micro_batches']}, largest fetch held {format_bytes(budget_mem['largest_fetch'])} "
        f"({'within' if budget_mem['largest_fetch'] <= quarter else 'OVER'} budget); peak "
        f"{format_bytes(budget_mem['peak_delta'])} vs plain inference + budget {format_bytes(limit)}: "
        f"{'OK' if budget_mem['peak_delta'] <= limit else 'OVER'}; sessions alone: "
        f"{format_bytes(budget_mem['sessions'])} vs {format_bytes(plain_mem['sessions'])} for the plain one"
    )
    growth = large["peak_total"] / small["peak_total"] - 1
    print(
        f"(c) peak memory of a run (activation_entropy on every tensor): {10 * BATCH} samples "
        f"{format_bytes(small['peak_total'])} ({format_bytes(small['peak_delta'])} over baseline), "
        f"{100 * BATCH} samples {format_bytes(large['peak_total'])} ({format_bytes(large['peak_delta'])}) "
        f"→ growth {growth * 100:+.1f}% (target ≤ 10%)"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3])))
    else:
        main()
