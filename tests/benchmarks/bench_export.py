"""Exporting once (issue: speed): the export cache and weights swapped into one traced graph.

ResNet-18 (``architectures.py``, with BatchNorm) through a ``python:`` factory and a weights
file, on a fresh export cache:

- the time spent loading the model (exporting it) in a first run, in a second run of the same
  spec (target: < 10 % of the first), and with the cache turned off;
- ten ``.pt`` checkpoints: how many times torch traced the model (target: once) and the
  loading time against tracing every checkpoint on its own.

Run: ``python tests/benchmarks/bench_export.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FACTORY = """\
import sys
sys.path.insert(0, {here!r})
from architectures import build


def resnet18():
    return build("resnet18")
"""


def main() -> None:
    import torch

    import layerscope
    from layerscope.adapters import torch_export

    loading, traces = [0.0], [0]
    load, trace = torch_export.TorchAdapter.load, torch_export.export_unoptimized

    def timed_load(self, *args):
        started = time.perf_counter()
        try:
            return load(self, *args)
        finally:
            loading[0] += time.perf_counter() - started

    def counted_trace(*args):
        traces[0] += 1
        return trace(*args)

    torch_export.TorchAdapter.load, torch_export.export_unoptimized = timed_load, counted_trace

    def measure(spec: dict) -> tuple[float, int]:
        loading[0], traces[0] = 0.0, 0
        layerscope.run(spec, write=False, progress=False)
        return loading[0], traces[0]

    sys.path.insert(0, str(HERE))
    from architectures import build

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.chdir(folder)  # a dict spec finds the factory's module in the current folder
        os.environ["LAYERSCOPE_CACHE"] = str(folder / "cache")
        (folder / "nets.py").write_text(FACTORY.format(here=str(HERE)))
        for epoch in range(1, 11):
            model = build("resnet18", seed=epoch)
            torch.save(model.state_dict(), folder / f"epoch_{epoch:02d}.pt")
        data = {"source": "synthetic", "samples": 8, "shape": [3, 224, 224], "batch_size": 8}
        analyses = [{"id": "e", "estimator": "activation_entropy"}]
        one = {
            "model": {"python": "nets:resnet18", "weights": str(folder / "epoch_01.pt")},
            "data": data,
            "analyses": analyses,
        }
        first, first_traces = measure({**one})
        second, second_traces = measure({**one})
        os.environ["LAYERSCOPE_EXPORT_CACHE"] = "0"
        uncached, _ = measure({**one})
        print(
            f"python: factory, ResNet-18: loading (export) first run {first:.2f} s ({first_traces} trace), "
            f"second run {second:.2f} s ({second_traces} traces) = {100 * second / first:.1f} % of the first "
            f"(target < 10 %); cache off {uncached:.2f} s"
        )
        ten = {
            "model": {"python": "nets:resnet18", "checkpoints": str(folder / "epoch_*.pt")},
            "data": data,
            "analyses": analyses,
        }
        swapped, swapped_traces = measure(ten)
        torch_export.export_unoptimized = lambda *args: (traces.__setitem__(0, traces[0] + 1), trace(*args))[1]
        torch_export.with_weights = lambda *args, **kwargs: None  # trace every checkpoint on its own
        separate, separate_traces = measure(ten)
        print(
            f"ten .pt checkpoints: {swapped_traces} trace, loading {swapped:.2f} s; tracing each: "
            f"{separate_traces} traces, {separate:.2f} s ({separate / swapped:.1f}x)"
        )


if __name__ == "__main__":
    main()
