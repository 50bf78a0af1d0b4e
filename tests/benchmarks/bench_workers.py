"""Checkpoint-parallel speed-up (issue: scale): a 10-checkpoint information-plane run of
``specs/information-plane.yaml`` in one process, with 2 worker processes (target ≥ 1.6× on
this 2-core machine) and on a local 2-CPU Ray cluster, side by side. Runs alternate over
three rounds and medians are reported (the machine is noisy); Ray is timed both starting
its own cluster and on a cluster already running. Also the largest record difference from
the single-process run."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

SPEC = Path(__file__).resolve().parents[2] / "specs" / "information-plane.yaml"
ROUNDS = 3


def run(workers: int, engine: str = "local"):
    import layerscope
    from layerscope.spec.schema import read_document

    doc, _ = read_document(SPEC)
    data = {**doc.data, "runtime": {**doc.data.get("runtime", {}), "workers": workers, "engine": engine}}
    start = time.perf_counter()
    results = layerscope.run(data, write=False, progress=False)
    return time.perf_counter() - start, results


def main() -> None:
    import ray

    run(1)  # warm-up: the demo model cache
    times: dict[str, list[float]] = {}
    results = {}
    variants = {
        "1 process": (1, "local"),
        "2 worker processes": (2, "local"),
        "Ray, local 2-CPU cluster started by the run": (2, "ray"),
    }
    for _ in range(ROUNDS):
        for label, (workers, engine) in variants.items():
            seconds, results[label] = run(workers, engine)
            times.setdefault(label, []).append(seconds)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    joined = "Ray, 2-CPU cluster already running"
    for _ in range(ROUNDS):
        seconds, results[joined] = run(2, "ray")
        times.setdefault(joined, []).append(seconds)
    ray.shutdown()

    key = lambda r: (r["analysis"], r["model"], r["layer"], r["metric"])  # noqa: E731
    single = results["1 process"]
    one = statistics.median(times["1 process"])
    reference = {key(r): r["value"] for r in single.records}
    print(
        f"{len(single.models)} checkpoints × {single.runtime['samples']} samples, median of {ROUNDS}: "
        f"1 process {one:.2f} s ({', '.join(f'{t:.2f}' for t in times['1 process'])})"
    )
    for label in [*list(variants)[1:], joined]:
        seconds = statistics.median(times[label])
        values = {key(r): r["value"] for r in results[label].records}
        print(
            f"{label}: {seconds:.2f} s ({', '.join(f'{t:.2f}' for t in times[label])}) → speed-up "
            f"{one / seconds:.2f}× (target ≥ 1.6×); largest record difference "
            f"{max(abs(reference[k] - values[k]) for k in reference):.1e}"
        )


if __name__ == "__main__":
    main()
