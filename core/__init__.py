"""layerscope: measure what happens inside deep neural networks, layer by layer.

Public API: :func:`run`, :func:`validate`, :func:`trace` (with :class:`Trace`), :class:`Monitor`,
:class:`Results`, the plugin base classes (:class:`Estimator` with :class:`EstimatorTags`,
:class:`PlanEstimator`, :class:`DataSource`, :class:`Reporter`,
:class:`TrackingReporter`, :class:`Adapter`), the ``hookimpl``
marker for plugins and the helpers plugin authors use (:func:`lazy_module`, :func:`regular_file`,
:func:`atomic_write`). Names are imported on first use (PEP 562), so that ``import layerscope`` and
the command line's help start without torch or onnxruntime; type checkers see the real imports below.

The package's parts, each a subpackage that imports only those listed before it: ``util``, ``graph``,
``spec``, ``host``, ``data``, ``model``, ``results``, ``engine``, ``training``, ``cli``; ``testing`` is the
kit for plugin authors.
"""

from typing import TYPE_CHECKING

from .util.lazy import lazy_exports

__version__ = "0.2.0.dev0"  # the one version source (pyproject.toml reads it)

_MODULES = {
    "api": ("run", "trace", "validate"),
    "data.source": ("DataSource",),
    "engine.estimator": ("DataBatch", "Estimator", "EstimatorTags", "PlanBatch", "PlanEstimator", "TensorBatch"),
    "engine.trace": ("Trace",),
    "graph.activations": ("ACTIVATION_OPS",),
    "host.hookspecs": ("hookimpl",),
    "model.adapter": ("Adapter", "Checkpoint", "LoadedModel", "ModelParams"),
    "results.contract": ("Results",),
    "results.reporter": ("Reporter", "TrackingReporter"),
    "training.monitor": ("Monitor",),
    "util.errors": ("InfrastructureError", "SpecError", "UserError"),
    "util.files": ("atomic_write", "regular_file"),
    "util.lazy": ("lazy_module",),
    "util.params": ("NoParams",),
}
__getattr__, __all__ = lazy_exports(__name__, _MODULES)
__all__ += ["__version__"]

if TYPE_CHECKING:  # the names as __getattr__ gives them, visible to type checkers
    from .api import run as run
    from .api import trace as trace
    from .api import validate as validate
    from .data.source import DataSource as DataSource
    from .engine.estimator import DataBatch as DataBatch
    from .engine.estimator import Estimator as Estimator
    from .engine.estimator import EstimatorTags as EstimatorTags
    from .engine.estimator import PlanBatch as PlanBatch
    from .engine.estimator import PlanEstimator as PlanEstimator
    from .engine.estimator import TensorBatch as TensorBatch
    from .engine.trace import Trace as Trace
    from .graph.activations import ACTIVATION_OPS as ACTIVATION_OPS
    from .host.hookspecs import hookimpl as hookimpl
    from .model.adapter import Adapter as Adapter
    from .model.adapter import Checkpoint as Checkpoint
    from .model.adapter import LoadedModel as LoadedModel
    from .model.adapter import ModelParams as ModelParams
    from .results.contract import Results as Results
    from .results.reporter import Reporter as Reporter
    from .results.reporter import TrackingReporter as TrackingReporter
    from .training.monitor import Monitor as Monitor
    from .util.errors import InfrastructureError as InfrastructureError
    from .util.errors import SpecError as SpecError
    from .util.errors import UserError as UserError
    from .util.files import atomic_write as atomic_write
    from .util.files import regular_file as regular_file
    from .util.lazy import lazy_module as lazy_module
    from .util.params import NoParams as NoParams


def __dir__() -> list[str]:
    return __all__
