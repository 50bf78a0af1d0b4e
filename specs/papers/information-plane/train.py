"""Train a small CNN on the digits and record the information plane at every iteration, on the
training batch of that iteration (Wickstrøm et al.'s protocol), with ``layerscope.Monitor``.

    python specs/papers/information-plane/train.py [--epochs 40] [--every 1] [--out DIR]
        [--smoothing S] [--sigma-grid N]    # replace monitor.yaml's (the paper's 0.9, 100 widths)

The network is the demo CNN (``demo:digits-cnn``'s architecture: conv 8-16, 3×3, a max-pool after the
second, FC 64, FC 10, ReLU — the layout of the paper's "CNN_Hero" at 8×8), trained from scratch with the
paper's SGD, lr 0.09, batches of 100. The test accuracy is printed after every epoch, and at the end the
fall of I(X;T) from its peak per layer (``compression``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import layerscope
from layerscope.adapters.demo_zoo import network
from layerscope.plugins.data.digits import load_digits_split
from layerscope.spec.yaml_locations import load_yaml

SPEC = Path(__file__).with_name("monitor.yaml")
ITERATIONS_PER_EPOCH = 13  # full batches of 100 in the 1 347 training digits


def compression(results: layerscope.Results, window: int = ITERATIONS_PER_EPOCH) -> dict[str, dict[str, float]]:
    """Per layer: I(X;T) averaged over a sliding *window* of observed steps (one epoch by default, which
    evens out the batch-to-batch noise), its peak, its last value and ``fall`` = peak − last, in bits.
    Compression in the paper's sense is a fall after the fitting phase; a fall of 0 means the
    smoothed I(X;T) is highest at the end."""
    trajectories: dict[str, list[tuple[int, float]]] = {}
    for record in results.records:
        if record["metric"] == "I_XT":
            trajectories.setdefault(record["layer"], []).append((record["step"], record["value"]))
    summary = {}
    for layer, points in trajectories.items():
        values = np.array([value for _, value in sorted(points)])
        smoothed = np.convolve(values, np.ones(window) / window, mode="valid") if len(values) >= window else values
        peak, last = float(smoothed.max()), float(smoothed[-1])
        summary[layer] = {"peak": peak, "last": last, "fall": peak - last}
    return summary


def train(
    epochs: int, every: int, iterations: int | None, overrides: dict, out: str | None
) -> tuple[layerscope.Results, list[float]]:
    """Train and observe as the module docstring says; return the results and the test accuracy after
    every epoch. *overrides* replace parameters of monitor.yaml's information_plane analysis; *out*, when
    given, is where the results are written."""
    spec = load_yaml(SPEC.read_text(), str(SPEC)).data
    spec["analyses"][0]["params"].update(overrides)
    torch.manual_seed(0)
    model, shape = network("digits-cnn")
    x, y = (torch.from_numpy(a) for a in load_digits_split("train"))
    x_test, y_test = (torch.from_numpy(a) for a in load_digits_split("test"))
    x, x_test, generator = x.reshape(-1, *shape), x_test.reshape(-1, *shape), torch.Generator().manual_seed(0)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.09)
    monitor, step, accuracies, started = layerscope.Monitor(spec), 0, [], time.perf_counter()
    for epoch in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(100)[:-1]:  # full batches only
            model.train()
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
            step += 1
            if step % every == 0:
                monitor.observe(model, step=step, batch=(x[batch], y[batch]))
            if iterations is not None and step >= iterations:
                break
        model.eval()
        with torch.no_grad():
            accuracies.append(float((model(x_test).argmax(1) == y_test).float().mean()))
        print(
            f"epoch {epoch + 1}: {step} iterations, {len(monitor.steps)} observed, test accuracy "
            f"{accuracies[-1]:.3f} ({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        if iterations is not None and step >= iterations:
            break
    results = monitor.write(out) if out is not None else monitor.results()
    return results, accuracies


def main(argv: list[str] | None = None) -> layerscope.Results:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--every", type=int, default=1, help="observe every N iterations")
    parser.add_argument("--iterations", type=int, default=None, help="stop after this many iterations")
    parser.add_argument("--smoothing", type=float, default=None, help="replaces monitor.yaml's smoothing")
    parser.add_argument("--sigma-grid", type=int, default=None, help="replaces monitor.yaml's sigma_grid")
    parser.add_argument("--out", default="results/ip-training")
    args = parser.parse_args(argv)
    overrides = {"smoothing": args.smoothing, "sigma_grid": args.sigma_grid}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    results, _ = train(args.epochs, args.every, args.iterations, overrides, args.out)
    print(f"{len(results.records)} records → {Path(args.out) / 'results.json'}")
    for layer, fall in compression(results, window=max(1, ITERATIONS_PER_EPOCH // args.every)).items():
        print(f"{layer}: I(X;T) peak {fall['peak']:.3f}, last {fall['last']:.3f}, fall {fall['fall']:.3f} bits")
    return results


if __name__ == "__main__":
    main()
