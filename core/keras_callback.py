"""``layerscope.keras_callback.MonitorCallback``: the Keras callback (:mod:`layerscope.training.keras_callback`)."""

from layerscope.training.keras_callback import MonitorCallback

__all__ = ["MonitorCallback"]
