"""layerscope.Monitor during training, side by side with the alternatives (issue: research workflows).

A model is trained with SGD; after every training step the activation entropy of every activation (binary, per
class and pooled) is measured on a fixed probe batch, four ways, interleaved step by step:

- ``train``: the training step itself (forward, backward, SGD update), for scale;
- ``monitor``: ``Monitor.observe(model, step, batch=probe)`` — the graph exported at the first step only; the
  second step swaps the weights into the unoptimised graph and optimises it, later steps compute the optimised
  graph's weights from the module's (ResNet-18's BatchNorms folded into its convolutions with NumPy);
- ``hooks``: hand-written forward hooks on the eager model computing the same counts (one one-hot matrix product
  per activation call) and the entropies;
- ``run``: ``layerscope.run`` with the module as the model source at every step (what a user without the
  monitor would do; within one process the torch adapter swaps the weights into the graph it exported for the
  architecture, checks the result against the model and writes the export cache).

Models: ``cnn`` (the digits CNN of the demo zoo's shape, 8×8 inputs, probe of 256) and ``resnet18``
(``architectures.py``, 64×64 inputs, probe of 64, 10 classes). The first monitored step (the export) is reported
apart; the others give medians over ``STEPS`` steps. ``--threads 1`` sets torch's threads (and OMP_NUM_THREADS) to
one; onnxruntime runs on all cores, as layerscope runs it, unless ``--ort-threads 1`` sets its threads in the
monitor and the runs too; ``--load 2`` runs two CPU-bound processes beside the measurement.

Run: ``python tests/benchmarks/bench_monitor.py [--threads 1] [--ort-threads 1] [--load 2] [--models cnn,resnet18]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS, CLASSES = 6, 10
ANALYSES = [{"id": "entropy", "estimator": "activation_entropy"}]


def build(name: str):
    """(model, probe images, probe labels, training batch) for *name*, random weights and data."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(0)
    if name == "cnn":
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 64, 64),
            nn.ReLU(),
            nn.Linear(64, CLASSES),
        )
        shape, probe = (1, 8, 8), 256
    else:
        sys.path.insert(0, str(HERE))
        from architectures import build as build_architecture

        model, shape, probe = build_architecture(name), (3, 64, 64), 64
        model.fc = nn.Linear(model.fc.in_features, CLASSES)
    x = torch.randn(probe, *shape, generator=generator)
    y = torch.randint(0, CLASSES, (probe,), generator=generator)
    train = (torch.randn(probe, *shape, generator=generator), torch.randint(0, CLASSES, (probe,), generator=generator))
    return model, x, y, train


def entropy_hooks(model):
    """Forward hooks on every ReLU counting on-neurons per class; returns ``measure(x, y)``."""
    import torch

    counts: dict[int, torch.Tensor] = {}
    state = {"call": 0, "labels": None}

    def hook(module, inputs, output):
        on = (output > 0).flatten(1).to(torch.float32)
        key = state["call"]
        counts[key] = state["labels"].T @ on  # (classes, neurons) on-counts of this batch
        state["call"] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.ReLU)]

    def measure(x, y):
        was_training = model.training
        model.eval()
        state["call"], state["labels"] = 0, torch.nn.functional.one_hot(y, CLASSES).float()
        with torch.no_grad():
            model(x)
        samples = torch.bincount(y, minlength=CLASSES).to(torch.float64)
        for on in counts.values():  # per class and pooled
            for p in (on.double() / samples[:, None].clamp_min(1), on.double().sum(0) / samples.sum()):
                p = p.clamp(0, 1)
                (torch.special.entr(p) + torch.special.entr(1 - p)).mean(-1)
        model.train(was_training)

    return measure, handles


def measure(name: str) -> dict[str, list[float]]:
    import torch

    import layerscope
    import layerscope.engine.execute

    model, x, y, (train_x, train_y) = build(name)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = layerscope.Monitor({"model": {}, "data": {"shuffle": False, "batch_size": len(x)}, "analyses": ANALYSES})
    spec = {"data": {"shuffle": False, "batch_size": len(x)}, "analyses": ANALYSES}
    times: dict[str, list[float]] = {"train": [], "monitor": [], "hooks": [], "run": []}
    first = None
    for step in range(STEPS + 1):
        started = time.perf_counter()
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x), train_y).backward()
        optimiser.step()
        times["train"].append(time.perf_counter() - started)

        started = time.perf_counter()
        monitor.observe(model, step=step, batch=(x, y))
        seconds = time.perf_counter() - started
        if step == 0:
            first = seconds
            continue
        times["monitor"].append(seconds)

        hooked, handles = entropy_hooks(model)
        started = time.perf_counter()
        hooked(x, y)
        times["hooks"].append(time.perf_counter() - started)
        for handle in handles:
            handle.remove()

        started = time.perf_counter()
        layerscope.run({**spec, "model": {"source": model}}, data=(x, y), write=False, progress=False)
        times["run"].append(time.perf_counter() - started)
    times["first"] = [first]
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None, help="threads for torch, onnxruntime and OpenMP")
    parser.add_argument("--ort-threads", type=int, default=None, help="onnxruntime's threads (default: the cores)")
    parser.add_argument("--load", type=int, default=0, help="CPU-bound processes running beside the measurement")
    parser.add_argument("--models", default="cnn,resnet18")
    args = parser.parse_args()
    if args.threads:
        os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        import torch

        torch.set_num_threads(args.threads)
    if args.ort_threads:  # the thread policy of the monitor and of a run, with onnxruntime's threads given
        import layerscope.engine.execute
        import layerscope.training.monitor
        from layerscope.engine.threads import run_threads

        policy = functools.partial(run_threads, args.ort_threads)
        layerscope.training.monitor.run_threads = layerscope.engine.execute.run_threads = policy
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        print(
            f"threads: {args.threads or 'default'}, onnxruntime's: {args.ort_threads or 'the cores'}, "
            f"competing CPU-bound processes: {args.load}, {os.cpu_count()} "
            f"cores; medians of {STEPS} steps, milliseconds per step"
        )
        print(
            f"{'model':10s} {'train':>8s} {'monitor':>8s} {'hooks':>8s} {'run':>8s} {'1st step':>9s}"
            f" {'monitor ÷ hooks':>16s} {'run ÷ monitor':>14s}"
        )
        for name in args.models.split(","):
            times = {k: statistics.median(v) * 1000 for k, v in measure(name).items()}
            print(
                f"{name:10s} {times['train']:8.1f} {times['monitor']:8.1f} {times['hooks']:8.1f} {times['run']:8.1f}"
                f" {times['first']:9.1f} {times['monitor'] / times['hooks']:16.2f}"
                f" {times['run'] / times['monitor']:14.1f}"
            )
    finally:
        for process in load:
            process.kill()


if __name__ == "__main__":
    main()
