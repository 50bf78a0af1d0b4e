"""``layerscope.training.lightning_callback.MonitorCallback``: runs a spec's analyses while Lightning trains.

::

    import lightning
    from layerscope.training.lightning_callback import MonitorCallback

    callback = MonitorCallback("spec.yaml", every=10, out_dir="results/fit")
    lightning.Trainer(callbacks=[callback]).fit(module, loader)

Every *every* optimiser steps (``trainer.global_step``) the LightningModule is observed on the
training batch it has just been trained on (the information-plane paper's protocol), or on a
fixed *batch* when one is given; the batch is what the dataloader yields (a tensor, ``(x, y)``
or a mapping of named tensors). The model is exported to ONNX once (see
:class:`layerscope.Monitor`); results are written to *out_dir* when training ends.

Needs Lightning: the ``lightning`` package (``import lightning``; the ``layerscope[lightning]``
extra), or the older standalone ``pytorch-lightning`` (``import pytorch_lightning``). The callback
derives from the ``Callback`` of the first of them installed; the trainers of both call a callback's
hooks by name, so it serves either package's ``Trainer``.

Each step's records are also logged through the trainer's loggers (``trainer.loggers``: TensorBoard, CSV,
MLflow, W&B … as the trainer was given them), as scalars named by series
(:mod:`layerscope.results.tracking`) at the trainer's global step; ``log_to_trainer=False`` turns that
off. *log_to* and *log_dir* give the monitor trackers of its own (:class:`layerscope.Monitor`), whose
stores default to *out_dir*. The monitor's tracked runs end with ``callback.monitor.close()``, when the
program exits, or as failed when training raises.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from layerscope.results.tracking import scalars_and_histograms

from .monitor import Monitor

#: Lightning's PyTorch API, in the order it is looked for: the ``lightning`` package, then ``pytorch-lightning``.
LIGHTNING_MODULES = ("lightning.pytorch", "pytorch_lightning")


def lightning_module():
    """The first of :data:`LIGHTNING_MODULES` that is installed, imported; an ImportError saying what to install
    when none is."""
    for name in LIGHTNING_MODULES:
        if importlib.util.find_spec(name.partition(".")[0]) is not None:
            return importlib.import_module(name)
    raise ImportError(
        'layerscope\'s Lightning callback needs Lightning: pip install "layerscope[lightning]" (or lightning)'
    )


if TYPE_CHECKING:
    import lightning.pytorch as pl
else:
    pl = lightning_module()


class MonitorCallback(pl.Callback):
    """Observe the module every *every* optimiser steps with a :class:`layerscope.Monitor` of *spec* (a spec
    path or dict, or a monitor), on the training batch or *batch*; log each step's records through the
    trainer's loggers (unless *log_to_trainer* is False) and the monitor's trackers (*log_to*, *log_dir*);
    write to *out_dir* when training ends."""

    def __init__(
        self,
        spec: str | os.PathLike | dict | Monitor,
        *,
        every: int = 1,
        batch: Any = None,
        out_dir: str | os.PathLike | None = None,
        log_to_trainer: bool = True,
        log_to: Iterable[str] | None = None,
        log_dir: str | os.PathLike | None = None,
    ):
        self.monitor = Monitor.for_callback(spec, every, log_to, log_dir if log_dir is not None else out_dir)
        self.every, self.batch, self.out_dir, self.log_to_trainer = every, batch, out_dir, log_to_trainer

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step not in self.monitor.steps[-1:]:
            if self.batch is None:  # the default collate gives [x, y]
                batch = tuple(batch) if isinstance(batch, list) else batch
            records = self.monitor.observe(pl_module, step=step, batch=batch if self.batch is None else self.batch)
            if self.log_to_trainer and trainer.loggers:
                scalars, _ = scalars_and_histograms(records)  # a logger takes numbers only
                for logger in trainer.loggers:
                    logger.log_metrics(scalars, step=step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out_dir is not None and self.monitor.steps:
            self.monitor.write(self.out_dir)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.monitor.close(failed=True)
