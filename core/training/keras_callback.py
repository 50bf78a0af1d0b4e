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

``log_to=["tensorboard"]`` logs each step's records to TensorBoard as they come, beside Keras's own
``keras.callbacks.TensorBoard`` when *log_dir* is the folder given to it (``tensorboard --logdir`` on that
folder shows both); other trackers (``mlflow``, ``wandb``) likewise. Their stores default to *out_dir*.
The monitor's tracked runs end with ``callback.monitor.close()`` or when the program exits, so that a
later ``fit`` continues them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import keras

from .monitor import Monitor


class MonitorCallback(keras.callbacks.Callback):
    """Observe the model every *every* optimiser steps with a :class:`layerscope.Monitor` of *spec* (a spec
    path or dict, or a monitor), on *batch* or the spec's data; log each step to the trackers *log_to*
    (stores under *log_dir*); write to *out_dir* when training ends."""

    def __init__(
        self,
        spec: str | os.PathLike | dict | Monitor,
        *,
        every: int = 1,
        batch: Any = None,
        out_dir: str | os.PathLike | None = None,
        log_to: Iterable[str] | None = None,
        log_dir: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.monitor = Monitor.for_callback(spec, every, log_to, log_dir if log_dir is not None else out_dir)
        self.every, self.batch, self.out_dir = every, batch, out_dir

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        if step % self.every == 0:
            self.monitor.observe(self.model, step=step, batch=self.batch)

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.out_dir is not None and self.monitor.steps:
            self.monitor.write(self.out_dir)
