"""What the driver of a parallel run holds against the number of data shards (issue: clusters): the
aggregation-distribution spec (``specs/aggregation.yaml``, the largest shard state of the built-in
estimators) with 2 worker processes at 2, 8 and 32 shards, and in one process. For each: the most shard
states the driver held at once while merging (shards merge as they arrive, ``ShardMerge``), the size of one
shard's state pickled, the driver's peak resident set (a fresh process per figure, so ``ru_maxrss`` is that
run's) and the time; rounds interleaved, medians reported. Run: ``python tests/benchmarks/bench_shards.py``."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

SPEC = Path(__file__).resolve().parents[2] / "specs" / "aggregation.yaml"
ROUNDS = 3
SHARDS = (0, 2, 8, 32)  # 0: one process

MEASURE = r"""
import json, pickle, resource, sys, time
import layerscope
from layerscope.engine import lifecycle
from layerscope.spec.schema import read_document

shards = int(sys.argv[2])
held, state = [0], [0]
add = lifecycle.ShardMerge.add

def counting(self, shard, outcome):
    state[0] = max(state[0], len(pickle.dumps(outcome.estimators)))
    whole = add(self, shard, outcome)
    held[0] = max(held[0], self.held)
    return whole

lifecycle.ShardMerge.add = counting
doc, _ = read_document(sys.argv[1])
runtime = {"workers": 2, "shards": shards} if shards else {}
start = time.perf_counter()
results = layerscope.run({**doc.data, "runtime": runtime}, write=False, progress=False)
print(json.dumps({
    "seconds": time.perf_counter() - start,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "most_held": held[0],
    "state_bytes": state[0],
    "records": sorted((r["layer"], r["metric"], r["value"]) for r in results.records if "value" in r),
}))
"""


def measure(shards: int) -> dict:
    """One run in a fresh process (its figures as :data:`MEASURE` prints them)."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(SPEC), str(shards)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    measure(0)  # warm-up: the demo model cache
    figures: dict[int, list[dict]] = {shards: [] for shards in SHARDS}
    for _ in range(ROUNDS):
        for shards in SHARDS:
            figures[shards].append(measure(shards))
    single = figures[0][0]["records"]
    for shards in SHARDS:
        runs = figures[shards]
        largest = max(abs(a[2] - b[2]) for a, b in zip(single, runs[0]["records"], strict=True))
        label = f"{shards} shards, 2 worker processes" if shards else "1 process"
        print(
            f"{label}: most shard states held at once {runs[0]['most_held']} of {shards or 1} "
            f"(one state {runs[0]['state_bytes'] / 1e6:.2f} MB pickled); driver peak RSS "
            f"{statistics.median(r['peak_rss_mib'] for r in runs):.0f} MiB; "
            f"{statistics.median(r['seconds'] for r in runs):.2f} s (median of {ROUNDS}); "
            f"largest record difference from 1 process {largest:.1e}"
        )


if __name__ == "__main__":
    main()
