"""``layerscope.training.lightning_callback.MonitorCallback``: runs a spec's analyses while PyTorch Lightning trains.

::

    from layerscope.lightning_callback import MonitorCallback

    callback = MonitorCallback("spec.yaml", every=10, out_dir="results/fit")
    pytorch_lightning.Trainer(callbacks=[callback]).fit(module, loader)

Every *every* optimiser steps (``trainer.global_step``) the LightningModule is observed on the
training batch it has just been trained on (the information-plane paper's protocol), or on a
fixed *batch* when one is given; the batch is what the dataloader yields (a tensor, ``(x, y)``
or a mapping of named tensors). The model is exported to ONNX once (see
:class:`layerscope.Monitor`); results are written to *out_dir* when training ends. Needs
``pytorch-lightning`` (the ``layerscope[lightning]`` extra).
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl

from .monitor import Monitor


class MonitorCallback(pl.Callback):
    """Observe the module every *every* optimiser steps with a :class:`layerscope.Monitor` of *spec* (a spec
    path or dict, or a monitor), on the training batch or *batch*; write to *out_dir* when training ends."""

    def __init__(
        self,
        spec: str | os.PathLike | dict | Monitor,
        *,
        every: int = 1,
        batch: Any = None,
        out_dir: str | os.PathLike | None = None,
    ):
        self.monitor = Monitor.for_callback(spec, every)
        self.every, self.batch, self.out_dir = every, batch, out_dir

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step not in self.monitor.steps[-1:]:
            if self.batch is None:  # the default collate gives [x, y]
                batch = tuple(batch) if isinstance(batch, list) else batch
            self.monitor.observe(pl_module, step=step, batch=batch if self.batch is None else self.batch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out_dir is not None and self.monitor.steps:
            self.monitor.write(self.out_dir)
