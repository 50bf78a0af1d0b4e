"""The run engine: the :class:`~layerscope.engine.estimator.Estimator` base class and its lifecycle
(``estimator``, ``lifecycle``), the spec resolved against the plugins (``plan``), one checkpoint's
shard fed through the runner (``checkpoint_run``, ``runner``, ``feeds``), the executors that run
shard tasks in this process, worker processes or on Ray (``process_pool``, ``ray_engine``), a
run's records and outputs (``execute``, ``outcomes``), resuming (``resume``), progress and threads.
May import every subpackage above it: util, graph, spec, host, data, model, results.
"""
