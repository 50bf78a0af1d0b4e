"""The demo model zoo: ``demo:digits-mlp`` and ``demo:digits-cnn``.

Small networks trained deterministically (fixed seeds, full-batch order from a seeded
generator) on the training split of scikit-learn's digits set, one checkpoint per epoch.
Trained models are cached as ONNX files under ``$LAYERSCOPE_CACHE`` (default
``~/.cache/layerscope``). The network is exported once; the other epochs reuse that
graph with their own weights (the exporter names initializers after the parameters).
"""

from __future__ import annotations

import fnmatch
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from layerscope import Adapter, Checkpoint, LoadedModel, hookimpl
from layerscope.model.adapter import ModelParams, load_onnx_file
from layerscope.util.errors import UserError, did_you_mean
from layerscope.util.files import atomic_write, cache_dir, mark_used
from layerscope.util.lazy import lazy_module

from .export_cache import with_weights

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it

EPOCHS = 10
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
SEED = 0
VERSION = 1  # bump when architectures or training change, to invalidate caches


def _mlp():
    from torch import nn

    class DigitsMLP(nn.Module):
        """64-64-32-16-10 ReLU network on flat 8×8 digits."""

        def __init__(self):
            super().__init__()
            self.fc1, self.relu1 = nn.Linear(64, 64), nn.ReLU()
            self.fc2, self.relu2 = nn.Linear(64, 32), nn.ReLU()
            self.fc3, self.relu3 = nn.Linear(32, 16), nn.ReLU()
            self.out = nn.Linear(16, 10)

        def forward(self, x):
            x = self.relu1(self.fc1(x))
            x = self.relu2(self.fc2(x))
            return self.out(self.relu3(self.fc3(x)))

    return DigitsMLP(), (64,)


def _cnn():
    from torch import nn

    class DigitsCNN(nn.Module):
        """conv 8-16 (3×3) with max-pooling, FC 64, FC 10, on 1×8×8 digits."""

        def __init__(self):
            super().__init__()
            self.conv1, self.relu1 = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()
            self.conv2, self.relu2 = nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.fc1, self.relu3 = nn.Linear(16 * 4 * 4, 64), nn.ReLU()
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x):
            x = self.relu1(self.conv1(x))
            x = self.pool(self.relu2(self.conv2(x)))
            return self.fc2(self.relu3(self.fc1(x.flatten(1))))

    return DigitsCNN(), (1, 8, 8)


def _gap_cnn():
    from torch import nn

    class DigitsGapCNN(nn.Module):
        """conv 16-32 (3×3), global average pooling, FC 10: an aggregation layer for aggregation_distribution."""

        def __init__(self):
            super().__init__()
            self.conv1, self.relu1 = nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()
            self.conv2, self.relu2 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
            return self.fc(self.pool(x).flatten(1))

    return DigitsGapCNN(), (1, 8, 8)


DEMOS = {"digits-mlp": _mlp, "digits-cnn": _cnn, "digits-gap": _gap_cnn}


def network(name: str) -> tuple[object, tuple[int, ...]]:
    """(a new untrained ``nn.Module``, its input shape per sample) of demo *name* (``digits-cnn`` …): the
    architecture the zoo trains, e.g. to train it yourself under :class:`layerscope.Monitor`."""
    return DEMOS[name]()


def epoch_label(epoch: int) -> str:
    return f"epoch_{epoch:02d}"


def train(
    name: str, report: Callable[[int, float], None] = lambda epoch, accuracy: None
) -> tuple[object, list[dict], list[float], tuple[int, ...]]:
    """Train demo *name*, calling *report(epoch, test accuracy)* after each epoch; return (model, state_dict
    per epoch, test accuracy per epoch, input shape). Training runs on one torch thread, whoever calls it:
    with more threads the sums of a backward pass come in another order, and the weights (the demo CNN's
    first-ReLU signature: 0.8474 against 0.8491) would depend on the caller's thread setting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(name, report)
    finally:
        torch.set_num_threads(threads)


def _train(name: str, report: Callable[[int, float], None]) -> tuple[object, list[dict], list[float], tuple[int, ...]]:
    import torch

    from layerscope.plugins.data.digits import load_digits_split

    torch.manual_seed(SEED)
    model, shape = DEMOS[name]()
    x, y = (torch.from_numpy(a) for a in load_digits_split("train"))
    x_test, y_test = (torch.from_numpy(a) for a in load_digits_split("test"))
    x, x_test = x.reshape(-1, *shape), x_test.reshape(-1, *shape)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(SEED)
    states, accuracies = [], []
    for _ in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(BATCH_SIZE):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            accuracies.append(float((model(x_test).argmax(1) == y_test).float().mean()))
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        report(len(states), accuracies[-1])
    return model, states, accuracies, shape


def ensure_trained(name: str) -> Path:
    """The cache folder holding ``epoch_XX.onnx`` for every epoch of demo *name*, training it if needed."""
    folder = cache_dir() / "demo" / f"{name}-v{VERSION}"
    if all((folder / f"{epoch_label(e)}.onnx").exists() for e in range(1, EPOCHS + 1)):
        mark_used(folder)
        return folder
    from .torch_export import export_to_onnx

    print(
        f"layerscope: training demo:{name} on the digits training split ({EPOCHS} epochs, cached in {folder})…",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()

    def report(epoch: int, accuracy: float) -> None:
        seconds = time.perf_counter() - started
        print(
            f"layerscope:   epoch {epoch}/{EPOCHS}: test accuracy {accuracy:.3f} ({seconds:.1f} s)",
            file=sys.stderr,
            flush=True,
        )

    model, states, accuracies, shape = train(name, report)
    exported = export_to_onnx(model, np.zeros((2, *shape), dtype=np.float32))
    for epoch, (state, accuracy) in enumerate(zip(states, accuracies), start=1):
        proto = with_weights(exported, state)
        if proto is None:
            raise RuntimeError(f"the exported demo:{name} does not hold its parameters by name")
        onnx.helper.set_model_props(
            proto,
            {"layerscope.demo": name, "layerscope.epoch": str(epoch), "layerscope.test_accuracy": f"{accuracy:.4f}"},
        )
        atomic_write(folder / f"{epoch_label(epoch)}.onnx", proto.SerializeToString())
    return folder


class DemoParams(ModelParams):
    checkpoints: str | list[str] | None = Field(
        None,
        description="epochs analysed in training order: a label (epoch_03), a glob (epoch_*), a list of "
        "them, or 'all'; the last epoch when omitted",
    )


class DemoZooAdapter(Adapter):
    """The demo models demo:digits-mlp, demo:digits-cnn and demo:digits-gap, one checkpoint per training epoch."""

    name = "demo"
    Params = DemoParams

    def claims(self, section) -> bool:
        return isinstance(section.source, str) and section.source.startswith("demo:")

    def _name(self, section) -> str:
        name = section.source.removeprefix("demo:")
        if name not in DEMOS:
            raise UserError(
                f"model.source: unknown demo model '{name}'.{did_you_mean(name, DEMOS)} "
                f"Known: {', '.join('demo:' + d for d in DEMOS)}"
            )
        return name

    def checkpoints(self, section, spec) -> list[Checkpoint]:
        name = self._name(section)
        labels = [epoch_label(e) for e in range(1, EPOCHS + 1)]
        if not section.checkpoints:
            return [Checkpoint(name, (name, labels[-1]))]
        patterns = [section.checkpoints] if isinstance(section.checkpoints, str) else section.checkpoints
        chosen = [label for label in labels if any(fnmatch.fnmatchcase(label, p) or p == "all" for p in patterns)]
        if not chosen:
            raise UserError(
                f"model.checkpoints: {section.checkpoints!r} matches none of the demo's checkpoints "
                f"({labels[0]} … {labels[-1]})"
            )
        return [Checkpoint(label, (name, label), int(label.removeprefix("epoch_"))) for label in chosen]

    def load(self, checkpoint: Checkpoint, spec, example) -> LoadedModel:
        name, label = checkpoint.ref
        path = ensure_trained(name) / f"{label}.onnx"
        proto, weights = load_onnx_file(path)
        props = {p.key: p.value for p in proto.metadata_props}
        return LoadedModel(
            proto,
            checkpoint.label,
            f"demo:{name}@{label}",
            framework="pytorch",
            weights=weights,
            details={"test_accuracy": float(props["layerscope.test_accuracy"])}
            if "layerscope.test_accuracy" in props
            else {},
        )


@hookimpl
def register_adapters(register):
    register(DemoZooAdapter)
