"""Train a small CNN on the digits and record the information plane at every iteration, on the
training batch of that iteration (Wickstrøm et al.'s protocol), with ``layerscope.Monitor``.

    python specs/papers/information-plane/train.py [--epochs 5] [--every 1] [--out results/ip-training]

The network is the demo CNN (``demo:digits-cnn``'s architecture: conv 8-16, 3×3, a max-pool after the
second, FC 64, FC 10, ReLU — the layout of the paper's "CNN_Hero" at 8×8), trained from scratch with the
paper's SGD, lr 0.09, batches of 100.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import layerscope
from layerscope.adapters.demo_zoo import network
from layerscope.plugins.data.digits import load_digits_split

SPEC = Path(__file__).with_name("monitor.yaml")


def main(argv: list[str] | None = None) -> layerscope.Results:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--every", type=int, default=1, help="observe every N iterations")
    parser.add_argument("--iterations", type=int, default=None, help="stop after this many iterations")
    parser.add_argument("--out", default="results/ip-training")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, shape = network("digits-cnn")
    x, y = (torch.from_numpy(a) for a in load_digits_split("train"))
    x, generator = x.reshape(-1, *shape), torch.Generator().manual_seed(0)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.09)
    monitor, step, started = layerscope.Monitor(SPEC), 0, time.perf_counter()
    for epoch in range(args.epochs):
        for batch in torch.randperm(len(x), generator=generator).split(100)[:-1]:  # full batches only
            model.train()
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
            step += 1
            if step % args.every == 0:
                monitor.observe(model, step=step, batch=(x[batch], y[batch]))
            if args.iterations is not None and step >= args.iterations:
                break
        print(
            f"epoch {epoch + 1}: {step} iterations, {len(monitor.steps)} observed "
            f"({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        if args.iterations is not None and step >= args.iterations:
            break
    results = monitor.write(args.out)
    print(f"{len(results.records)} records → {Path(args.out) / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
