"""numpy's BLAS threads for the signature's dense maths: one thread against BLAS's default, idle and busy.

The non-linearity signature's cost beyond the forward pass is symmetric eigendecompositions of d × d
covariances (``numpy.linalg.eigh``; d up to twice the sample count, above which it works in the samples'
subspace) and products of such matrices. This times one affinity score's worth of them (three
``eigh`` and four products of d × d matrices, float64) with BLAS limited to one thread
(``threadpoolctl``) and with BLAS's default threads (one per core), alternating in one process,
``--rounds`` rounds, medians; ``--load N`` runs N CPU-bound processes beside it (a busy machine: the
other helpers of a shared node, onnxruntime's own threads in a run).

Run: ``python tests/benchmarks/bench_blas_threads.py [--load 2] [--sizes 256,512,1024,2048] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def affinity_maths(matrix) -> float:
    """Seconds of three ``eigh`` and four products of the d × d *matrix* (an affinity score's dense maths)."""
    import numpy as np

    started = time.perf_counter()
    for _ in range(3):
        values, vectors = np.linalg.eigh(matrix)
        (vectors * np.sqrt(np.abs(values))) @ vectors.T
    matrix @ matrix
    return time.perf_counter() - started


def main() -> None:
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    parser = argparse.ArgumentParser()
    parser.add_argument("--load", type=int, default=0, help="CPU-bound processes running beside the measurement")
    parser.add_argument("--sizes", default="256,512,1024,2048")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    blas = [f"{i['internal_api']} ({i['num_threads']} threads)" for i in threadpool_info() if i["user_api"] == "blas"]
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        print(f"BLAS: {', '.join(blas)}; {os.cpu_count()} cores; competing CPU-bound processes: {args.load}")
        print(f"{'d':>6s} {'1 thread':>10s} {'default':>10s} {'default ÷ 1 thread':>19s}")
        rng = np.random.default_rng(0)
        for d in (int(s) for s in args.sizes.split(",")):
            samples = rng.standard_normal((2 * d, d))
            matrix = samples.T @ samples / (2 * d)
            times: dict[str, list[float]] = {"one": [], "default": []}
            for _ in range(args.rounds):
                with threadpool_limits(limits=1, user_api="blas"):
                    times["one"].append(affinity_maths(matrix))
                times["default"].append(affinity_maths(matrix))
            one, default = statistics.median(times["one"]), statistics.median(times["default"])
            print(f"{d:6d} {one:9.3f}s {default:9.3f}s {default / one:18.2f}x", flush=True)
    finally:
        for process in load:
            process.kill()


if __name__ == "__main__":
    main()
