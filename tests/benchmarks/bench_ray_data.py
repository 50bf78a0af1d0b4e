"""Ray Data against a worker's own reader, for the input of a Ray run's shard (issue: clusters).

A Ray run's workers read their shard of the samples themselves (the data source in the worker,
``docs/parallel.md``). This measures whether Ray Data would feed them faster: on a local Ray cluster,
one actor per core takes a shard of ``--samples`` images (3×64×64 float32, an ``.npy`` file) in batches
of 32, two ways, interleaved, ``--rounds`` rounds, medians of the slowest actor's seconds:

- ``own reader``: the actor memory-maps the file and slices its rows batch by batch (what a shard's
  reader does);
- ``ray data``: ``ray.data.read_numpy`` of the same file, split into one stream per actor
  (``streaming_split``), each actor iterating its stream in batches of 32 — Ray Data's way of feeding
  training workers.

Run: ``python tests/benchmarks/bench_ray_data.py [--samples 4000] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

BATCH = 32


def main() -> None:
    import numpy as np
    import ray

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    # one logical CPU per core for the actors and as many again for Ray Data's read tasks (actors that held
    # every CPU would leave its tasks waiting for ever)
    ray.init(num_cpus=2 * workers, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Reader:
        def own(self, path: str, start: int, stop: int) -> float:
            began = time.perf_counter()
            images = np.load(path, mmap_mode="r")
            total = 0.0
            for first in range(start, stop, BATCH):
                total += float(np.asarray(images[first : min(first + BATCH, stop)]).sum())
            return time.perf_counter() - began

        def ray_data(self, stream) -> float:
            began = time.perf_counter()
            total = 0.0
            for batch in stream.iter_batches(batch_size=BATCH, batch_format="numpy"):
                total += float(batch["data"].sum())
            return time.perf_counter() - began

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "images.npy")
        np.save(path, np.random.default_rng(0).random((args.samples, 3, 64, 64), dtype=np.float32))
        actors = [Reader.remote() for _ in range(workers)]
        share = -(-args.samples // workers)
        times: dict[str, list[float]] = {"own reader": [], "ray data": []}
        for _ in range(args.rounds):
            began = time.perf_counter()
            ray.get([a.own.remote(path, i * share, min((i + 1) * share, args.samples)) for i, a in enumerate(actors)])
            times["own reader"].append(time.perf_counter() - began)
            began = time.perf_counter()
            streams = ray.data.read_numpy(path).streaming_split(workers, equal=True)
            ray.get([a.ray_data.remote(s) for a, s in zip(actors, streams)])
            times["ray data"].append(time.perf_counter() - began)
        own, data = statistics.median(times["own reader"]), statistics.median(times["ray data"])
        print(
            f"{args.samples} images 3×64×64 over {workers} actors, batches of {BATCH}; "
            f"medians of {args.rounds} rounds: "
            f"own reader {own:.2f} s ({args.samples / own:.0f} samples/s), Ray Data {data:.2f} s "
            f"({args.samples / data:.0f} samples/s): Ray Data takes {data / own:.1f}x as long"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
