"""Model sources: the :class:`~layerscope.model.adapter.Adapter` base class of adapter plugins, the
checkpoints a model section names and the loaded ONNX model (``adapter``). May import
:mod:`layerscope.util`, :mod:`layerscope.graph`, and (for types) :mod:`layerscope.spec`,
:mod:`layerscope.data` and :mod:`layerscope.host`.
"""

from layerscope.model.adapter import Adapter, Checkpoint, LoadedModel, ModelParams

__all__ = ["Adapter", "Checkpoint", "LoadedModel", "ModelParams"]
