"""layerscope: measure what happens inside deep neural networks, layer by layer.

Public API: :func:`run`, :func:`validate`, :class:`Monitor`, :class:`Results`, the plugin base classes
(:class:`Estimator`, :class:`DataSource`, :class:`Reporter`, :class:`Adapter`), the ``hookimpl`` marker for
plugins and the helpers plugin authors use (:func:`lazy_module`, :func:`regular_file`, :func:`atomic_write`).
Names are imported on first use (PEP 562), so that ``import layerscope`` and the command line's help start
without torch or onnxruntime; type checkers see the real imports below.

The package's parts, each a subpackage that imports only those listed before it: ``util``, ``graph``,
``spec``, ``host``, ``data``, ``model``, ``results``, ``engine``, ``training``, ``cli``; ``testing`` is the
kit for plugin authors.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.2.0.dev0"  # the one version source (pyproject.toml reads it)

_EXPORTS = {
    "run": "api",
    "validate": "api",
    "DataSource": "data.source",
    "SpecError": "util.errors",
    "UserError": "util.errors",
    "Estimator": "engine.estimator",
    "TensorBatch": "engine.estimator",
    "DataBatch": "engine.estimator",
    "PlanBatch": "engine.estimator",
    "NoParams": "util.params",
    "hookimpl": "host.hookspecs",
    "Adapter": "model.adapter",
    "Checkpoint": "model.adapter",
    "LoadedModel": "model.adapter",
    "ModelParams": "model.adapter",
    "Reporter": "results.reporter",
    "Results": "results.contract",
    "ACTIVATION_OPS": "graph.activations",
    "Monitor": "training.monitor",
    "lazy_module": "util.lazy",
    "regular_file": "util.files",
    "atomic_write": "util.files",
}

__all__ = [
    "ACTIVATION_OPS",
    "Adapter",
    "Checkpoint",
    "DataBatch",
    "DataSource",
    "Estimator",
    "LoadedModel",
    "ModelParams",
    "Monitor",
    "NoParams",
    "PlanBatch",
    "Reporter",
    "Results",
    "SpecError",
    "TensorBatch",
    "UserError",
    "__version__",
    "atomic_write",
    "hookimpl",
    "lazy_module",
    "regular_file",
    "run",
    "validate",
]

if TYPE_CHECKING:
    from .api import run, validate
    from .data.source import DataSource
    from .engine.estimator import DataBatch, Estimator, PlanBatch, TensorBatch
    from .graph.activations import ACTIVATION_OPS
    from .host.hookspecs import hookimpl
    from .model.adapter import Adapter, Checkpoint, LoadedModel, ModelParams
    from .results.contract import Results
    from .results.reporter import Reporter
    from .training.monitor import Monitor
    from .util.errors import SpecError, UserError
    from .util.files import atomic_write, regular_file
    from .util.lazy import lazy_module
    from .util.params import NoParams


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'layerscope' has no attribute '{name}'")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
