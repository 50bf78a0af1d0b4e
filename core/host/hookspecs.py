"""The hooks a layerscope plugin can implement, grouped by phase.

Contribution hooks receive a ``register`` callback; the host owns the registries
(duplicate detection, did-you-mean messages). Lifecycle hooks let observers follow a run.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("layerscope")
hookimpl = pluggy.HookimplMarker("layerscope")


# --- contributions -----------------------------------------------------------------


@hookspec
def register_estimators(register):
    """Register :class:`layerscope.Estimator` subclasses: ``register(EstimatorClass)``."""


@hookspec
def register_adapters(register):
    """Register model adapters (:class:`layerscope.adapters.Adapter` subclasses)."""


@hookspec
def register_data_sources(register):
    """Register :class:`layerscope.DataSource` subclasses."""


@hookspec
def register_reporters(register):
    """Register :class:`layerscope.Reporter` subclasses (one per ``outputs.formats`` entry)."""


# --- run lifecycle -----------------------------------------------------------------


@hookspec
def before_run(spec, models):
    """Called once before the first forward pass; *models* lists the checkpoint labels."""


@hookspec
def after_batch(model, batch_index, samples):
    """Called after every data batch of every model has been fed to the estimators (in a
    parallel run, in the worker that fed it; *batch_index* counts the batches of that shard)."""


@hookspec
def after_run(results):
    """Called with the :class:`layerscope.Results` once every record is computed."""


@hookspec
def on_run_error(error):
    """Called with the exception when a run fails."""
