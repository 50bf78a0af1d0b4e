"""Checkpoint-parallel speed-up (issue: scale): a 10-checkpoint information-plane run of
``specs/information-plane.yaml`` with 1 and with 2 worker processes, side by side
(target ≥ 1.6× on this 2-core machine), and the largest record difference between them."""

from __future__ import annotations

import time
from pathlib import Path

SPEC = Path(__file__).resolve().parents[2] / "specs" / "information-plane.yaml"


def run(workers: int):
    import layerscope
    from layerscope.spec import read_document

    doc, _ = read_document(SPEC)
    data = {**doc.data, "runtime": {**doc.data.get("runtime", {}), "workers": workers}}
    start = time.perf_counter()
    results = layerscope.run(data, write=False, progress=False)
    return time.perf_counter() - start, results


def main() -> None:
    run(1)  # warm-up: the demo model cache
    one, single = run(1)
    two, parallel = run(2)
    key = lambda r: (r["analysis"], r["model"], r["layer"], r["metric"])  # noqa: E731
    a, b = {key(r): r["value"] for r in single.records}, {key(r): r["value"] for r in parallel.records}
    print(f"{len(single.models)} checkpoints × {single.runtime['samples']} samples: 1 worker {one:.2f} s, "
          f"2 workers {two:.2f} s → speed-up {one / two:.2f}× (target ≥ 1.6×); "
          f"largest record difference {max(abs(a[k] - b[k]) for k in a):.1e}")


if __name__ == "__main__":
    main()
