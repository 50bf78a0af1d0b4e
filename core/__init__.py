"""layerscope: measure what happens inside deep neural networks, layer by layer.

Public API: :func:`run`, :func:`validate`, :class:`Monitor`, :class:`Results`, the plugin base classes
(:class:`Estimator`, :class:`DataSource`, :class:`Reporter`, :class:`Adapter`) and the
``hookimpl`` marker for plugins. Names are imported on first use (PEP 562), so that
``import layerscope`` and the command line's help start without torch or onnxruntime.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "run": "api", "validate": "api", "DataSource": "data", "SpecError": "errors", "UserError": "errors",
    "Estimator": "estimator", "NoParams": "estimator", "TensorBatch": "estimator", "hookimpl": "hookspecs",
    "Adapter": "model", "Checkpoint": "model", "LoadedModel": "model", "Reporter": "reporting",
    "Results": "results", "ACTIVATION_OPS": "activations", "Monitor": "monitor",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'layerscope' has no attribute '{name}'")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
