"""Following a model through training: ``layerscope.Monitor``.

A monitor runs a spec's analyses on a live model at chosen training steps::

    monitor = layerscope.Monitor("spec.yaml")
    for step, (x, y) in enumerate(loader):
        ...                                    # one optimiser step
        monitor.observe(model, step=step, batch=(x, y))
    monitor.write("results/training")          # results.json, CSV, plots, report as the spec's outputs say

Each call is one checkpoint of a run, labelled ``step_<step>``, whose records carry ``step``.
The model is exported to ONNX at the first call only: later calls put its current weights
into that graph (the adapter's ``follow``: for PyTorch, the second call swaps them into the
unoptimised graph by parameter name and optimises it, later ones compute the optimised graph's
weights from the module's, BatchNorm folded into convolutions with NumPy), and the onnxruntime
sessions of a graph of a few MiB are kept with their weights refilled, so a call costs the
analyses and little more. The model's
section of the spec is not read (the model is the object given); the spec's data is used
when a call gives no ``batch``, otherwise the batch is the data of that step (an array,
``(x, y)``, named arrays: what ``layerscope.run(spec, data=...)`` takes), read with the data
section's ``batch_size``, ``shuffle`` and ``limit``.

Each step's records can go to experiment trackers as they come (*log_to*, or the spec's ``outputs.formats``
entries that are trackers: ``tensorboard``, ``mlflow``, ``wandb``): one tracked run for the monitor, opened at
the first step, each step's records logged at its step, the figures and files logged at every
:meth:`Monitor.write`, the run ended by :meth:`Monitor.close` (or when the program exits).

Steps follow one another: each step's estimators are handed those of the step before
(``carry_over``), which is how the information plane smooths its kernel width across
iterations (``smoothing: 0.9`` is the paper's σ_t = 0.9·σ_{t−1} + 0.1·σ*_t, with σ* chosen by
kernel alignment on each step's batch). The records equal those of a run of the same spec over
the same weights saved as checkpoints, in the same order.
"""

from __future__ import annotations

import atexit
import functools
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from layerscope.engine.checkpoint_run import ShardWorker
from layerscope.engine.estimator import Estimator
from layerscope.engine.execute import assemble_results
from layerscope.engine.lifecycle import Isolation, SequentialExecutor, drive
from layerscope.engine.outcomes import CheckpointOutcome, finish_checkpoint
from layerscope.engine.plan import RunPlan, build_plan
from layerscope.engine.reused_sessions import ReusedSessions
from layerscope.engine.threads import run_threads
from layerscope.host.loader import load_plugins
from layerscope.model.adapter import Adapter, Checkpoint
from layerscope.results.contract import Results
from layerscope.results.outputs import output_folder
from layerscope.results.reporter import TrackingReporter
from layerscope.spec.schema import read_document, with_python_data
from layerscope.spec.yaml_locations import LocatedDocument
from layerscope.util.errors import UserError


class Monitor:
    """Runs the analyses of *spec* (a YAML path or a dict) on a model at the training steps it is given
    (module docstring); *plugins* are extra plugin objects registered next to the installed ones.

    *log_to* names the trackers that log each step as it comes (``["tensorboard"]``; default: the spec's
    ``outputs.formats`` entries that are trackers; ``[]`` for none); their stores go under *log_dir*
    (default: the spec's ``outputs.dir``, else ``results/<name>-<run id>``) unless the trackers' own
    settings say where."""

    def __init__(
        self,
        spec: str | os.PathLike | dict,
        *,
        plugins: tuple[Any, ...] = (),
        log_to: Iterable[str] | None = None,
        log_dir: str | os.PathLike | None = None,
    ):
        self._doc, self._base_dir = read_document(spec)
        self._host = load_plugins(plugins)
        self._adapter: Adapter | None = None  # kept across steps: it holds the exported graph
        self._plan: RunPlan | None = None  # the last step's
        self._outcomes: list[CheckpointOutcome] = []
        self._previous: dict[str, Estimator] | None = None  # the last step's estimators, for carry_over
        self._last_step: int | None = None
        self._described: dict = {}  # the graph's tensors by structure: described at the first step only
        self._sessions = ReusedSessions()  # kept from step to step, the weights refilled
        self._started = time.perf_counter()
        self._run_id: str | None = None  # the first step's plan's: one run id for every step
        self._trackers = self._chosen_trackers(log_to)
        self._log_dir = Path(log_dir) if log_dir is not None else None
        self._tracking = False  # whether the trackers' runs were opened (at the first step)
        self._open: list[TrackingReporter] = []  # those not finished yet
        self._closed = False
        # ends the tracked runs when the program exits if close() was not called (the callbacks leave them open)
        self._at_exit = functools.partial(_finish_trackers, self._open, False)

    def _chosen_trackers(self, log_to: Iterable[str] | None) -> list[TrackingReporter]:
        """The trackers *log_to* names (each a tracking reporter whose package is installed), or else those
        among the spec's ``outputs.formats`` (whose problems the spec's check reports, at the first step)."""
        if log_to is not None:
            return [self._tracker(name) for name in dict.fromkeys([log_to] if isinstance(log_to, str) else log_to)]
        outputs = self._doc.data.get("outputs") if isinstance(self._doc.data, dict) else None
        formats = outputs.get("formats") if isinstance(outputs, dict) else None
        return [
            self._host.reporters.get(name)(self._host)
            for name in dict.fromkeys(formats if isinstance(formats, list) else [])
            if isinstance(name, str)
            and name in self._host.reporters
            and issubclass(self._host.reporters.get(name), TrackingReporter)
            and not self._host.reporters.get(name).missing()
        ]

    def _tracker(self, name: str) -> TrackingReporter:
        """The tracking reporter *name* of ``log_to``; a user error when there is none or its package is missing."""
        try:
            reporter = self._host.reporters.get(name)
        except UserError as error:
            raise UserError(f"Monitor: log_to: {error}") from None
        if not issubclass(reporter, TrackingReporter):
            raise UserError(
                f"Monitor: log_to: '{name}' writes files rather than log to a tracker; name it in the spec's "
                "outputs.formats and Monitor.write() writes it"
            )
        if missing := reporter.missing():
            raise UserError(f"Monitor: log_to: {missing}")
        return reporter(self._host)

    @property
    def steps(self) -> list[int]:
        """The steps observed so far, in order."""
        return [outcome.model["step"] for outcome in self._outcomes]

    def observe(self, model: Any, step: int, batch: Any = None) -> list[dict]:
        """Run the analyses on *model* as it is now (a ``torch.nn.Module`` or a Keras model), labelled
        with training *step* (an integer larger than the last step observed), on *batch* or, when it is
        None, on the spec's data; return this step's records. The model's train/eval mode is kept."""
        if self._closed:
            raise UserError("Monitor.observe: the monitor was closed (close() ends its tracked runs)")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UserError(f"Monitor.observe: step must be a whole number ≥ 0, not {step!r}")
        if self._last_step is not None and step <= self._last_step:
            raise UserError(
                f"Monitor.observe: step {step} does not follow step {self._last_step}; steps must "
                "increase (records are keyed by step)"
            )
        plan = self._plan_for(model, batch)
        checkpoint = Checkpoint(f"step_{step}", model, step)
        worker = ShardWorker(
            plan,
            [checkpoint],
            [(0, len(plan.order))],
            plan.order,
            plan.example(),
            live=True,
            described=self._described,
            reuse=self._sessions,
        )
        finished: list[CheckpointOutcome] = []

        def keep(index: int, state) -> None:
            finished.append(finish_checkpoint(plan, state, checkpoint))
            self._previous = dict(state.estimators)

        with run_threads():
            drive(
                1,
                SequentialExecutor(worker.run),
                lambda label: Isolation(label, plan.host.origin_of),
                predecessor=self._previous,
                finished=keep,
            )
        outcome = finished[0]
        self._outcomes.append(outcome)
        self._plan, self._last_step = plan, step
        self._log_step(step, outcome.records)
        return outcome.records

    def _log_step(self, step: int, records: list[dict]) -> None:
        """Log a step's records to the trackers, opening their runs at the first step."""
        if not self._trackers:
            return
        if not self._tracking:
            folder = self._log_dir if self._log_dir is not None else self._last_plan().default_folder
            self._tracking = True
            try:
                for tracker in self._trackers:
                    tracker.start(self.results(), folder)
                    self._open.append(tracker)
            finally:  # after the trackers' own exit handlers (W&B's stops its service), so that it runs before them
                atexit.register(self._at_exit)
        for tracker in self._trackers:
            tracker.log_step(step, records)

    def _plan_for(self, model: Any, batch: Any) -> RunPlan:
        """The spec resolved for this step: *model* as the model, *batch* (when given) as the data."""
        data = self._doc.data if isinstance(self._doc.data, dict) else {}
        doc = LocatedDocument(
            {**data, "model": {"source": model}}, self._doc.filename, self._doc.positions, self._doc.located
        )
        plan = build_plan(with_python_data(doc, batch), self._base_dir, self._host)
        self._run_id = self._run_id or plan.run_id
        plan.run_id = self._run_id
        network = plan.networks[0]
        if self._adapter is None or type(self._adapter) is not type(network.adapter):
            self._adapter = network.adapter
        network.adapter = self._adapter
        return plan

    def _last_plan(self) -> RunPlan:
        if self._plan is None:
            raise UserError("Monitor.results: no step was observed yet; call observe(model, step=...) first")
        return self._plan

    def results(self) -> Results:
        """The records of every step observed so far, in one :class:`Results` (``models`` lists the steps)."""
        return assemble_results(self._last_plan(), self._outcomes, [], self._started, monitor={"steps": self.steps})

    @classmethod
    def for_callback(
        cls,
        spec: str | os.PathLike | dict | Monitor,
        every: Any,
        log_to: Iterable[str] | None = None,
        log_dir: str | os.PathLike | None = None,
    ) -> Monitor:
        """The monitor of a training callback that observes every *every* steps: *spec* itself when it is a
        monitor (which has its trackers already: *log_to* must be None), else a new one of it with *log_to*
        and *log_dir*; *every* must be a whole number ≥ 1."""
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a whole number ≥ 1, not {every!r}")
        if isinstance(spec, Monitor):
            if log_to is not None:
                raise ValueError("log_to is the monitor's own: give it to Monitor(...), not to the callback")
            return spec
        return cls(spec, log_to=log_to, log_dir=log_dir)

    def write(self, out_dir: str | os.PathLike) -> Results:
        """Write the results of the steps so far to *out_dir* in the spec's ``outputs.formats`` (every
        file or none, as a run does) and return them. The trackers that log the steps as they come log
        the figures and these files instead, at the last step (the others log the whole run now)."""
        results, folder = self.results(), Path(out_dir)
        live = {tracker.name for tracker in self._trackers} if self._tracking else set()
        with output_folder(folder) as locked:
            locked.write(results, [r for r in self._last_plan().reporters if r.name not in live])
            for tracker in self._open:
                tracker.log_outputs(results, self.steps[-1], folder)
        return results

    def close(self, failed: bool = False) -> None:
        """End the tracked runs (marked as failed when *failed*); later steps are refused. Called on leaving
        a ``with Monitor(...) as monitor:`` block, and when the program exits if not before."""
        self._closed = True
        atexit.unregister(self._at_exit)
        _finish_trackers(self._open, failed)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=error is not None)


def _finish_trackers(open_trackers: list[TrackingReporter], failed: bool) -> None:
    """Finish the trackers of *open_trackers* (emptying it, so that each is finished once)."""
    while open_trackers:
        open_trackers.pop(0).finish(failed=failed)
