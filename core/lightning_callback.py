"""``layerscope.lightning_callback.MonitorCallback``: the Lightning callback
(:mod:`layerscope.training.lightning_callback`)."""

from layerscope.training.lightning_callback import MonitorCallback

__all__ = ["MonitorCallback"]
