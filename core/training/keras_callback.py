"""``layerscope.training.keras_callback.MonitorCallback``: runs a spec's analyses during ``model.fit``.

::

    from layerscope.keras_callback import MonitorCallback

    callback = MonitorCallback("spec.yaml", every=10, batch=(x_probe, y_probe), out_dir="results/fit")
    model.fit(x, y, callbacks=[callback])      # results written when training ends
    callback.monitor.results()                 # or read them in Python

Keras does not hand callbacks the training batch, so each observation reads *batch* (a fixed
probe batch) or, when it is None, the spec's data. The step is the number of optimiser steps
taken when the weights were observed (``model.optimizer.iterations``), so several ``fit``
calls continue one series. The model is converted to ONNX once (see
:class:`layerscope.Monitor`). Needs the ``layerscope[tensorflow]`` extra.
"""

from __future__ import annotations

import os
from typing import Any

import keras

from .monitor import Monitor


class MonitorCallback(keras.callbacks.Callback):
    """Observe the model every *every* optimiser steps with a :class:`layerscope.Monitor` of *spec* (a spec
    path or dict, or a monitor), on *batch* or the spec's data; write to *out_dir* when training ends."""

    def __init__(
        self,
        spec: str | os.PathLike | dict | Monitor,
        *,
        every: int = 1,
        batch: Any = None,
        out_dir: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.monitor = Monitor.for_callback(spec, every)
        self.every, self.batch, self.out_dir = every, batch, out_dir

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every == 0:
            self.monitor.observe(self.model, step=step, batch=self.batch)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.out_dir is not None and self.monitor.steps:
            self.monitor.write(self.out_dir)
