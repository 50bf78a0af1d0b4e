"""layerscope: measure what happens inside deep neural networks, layer by layer.

Public API: :func:`run`, :func:`validate`, :class:`Results`, the plugin base classes
(:class:`Estimator`, :class:`DataSource`, :class:`Reporter`, :class:`Adapter`) and the
``hookimpl`` marker for plugins.
"""

__version__ = "0.1.0"

from .api import run, validate
from .data import DataSource
from .errors import SpecError, UserError
from .estimator import Estimator, NoParams, TensorBatch
from .hookspecs import hookimpl
from .model import Adapter, Checkpoint, LoadedModel
from .reporting import Reporter
from .results import Results
from .selectors import ACTIVATION_OPS

__all__ = [
    "ACTIVATION_OPS", "Adapter", "Checkpoint", "DataSource", "Estimator", "LoadedModel", "NoParams", "Reporter",
    "Results", "SpecError", "TensorBatch", "UserError", "hookimpl", "run", "validate", "__version__",
]
