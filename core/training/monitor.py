"""Following a model through training: ``layerscope.Monitor``.

A monitor runs a spec's analyses on a live model at chosen training steps::

    monitor = layerscope.Monitor("spec.yaml")
    for step, (x, y) in enumerate(loader):
        ...                                    # one optimiser step
        monitor.observe(model, step=step, batch=(x, y))
    monitor.write("results/training")          # results.json, CSV, plots, report as the spec's outputs say

Each call is one checkpoint of a run, labelled ``step_<step>``, whose records carry ``step``.
The model is exported to ONNX at the first call only: later calls put its current weights
into that graph by parameter name (the adapter's ``follow``: for PyTorch into the optimised
graph directly when the optimiser folded no weight, else into the unoptimised one, optimised
again), so a call costs the analyses and little more. The model's
section of the spec is not read (the model is the object given); the spec's data is used
when a call gives no ``batch``, otherwise the batch is the data of that step (an array,
``(x, y)``, named arrays: what ``layerscope.run(spec, data=...)`` takes), read with the data
section's ``batch_size``, ``shuffle`` and ``limit``.

Steps follow one another: each step's estimators are handed those of the step before
(``carry_over``), which is how the information plane smooths its kernel width across
iterations (``smoothing: 0.9`` is the paper's σ_t = 0.9·σ_{t−1} + 0.1·σ*_t, with σ* chosen by
kernel alignment on each step's batch). The records equal those of a run of the same spec over
the same weights saved as checkpoints, in the same order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from layerscope.engine.checkpoint_run import ShardWorker
from layerscope.engine.estimator import Estimator
from layerscope.engine.execute import assemble_results
from layerscope.engine.lifecycle import Isolation, SequentialExecutor, drive
from layerscope.engine.outcomes import CheckpointOutcome, finish_checkpoint
from layerscope.engine.plan import RunPlan, build_plan
from layerscope.engine.threads import run_threads
from layerscope.host.loader import load_plugins
from layerscope.model.adapter import Adapter, Checkpoint
from layerscope.results.contract import Results
from layerscope.results.outputs import output_folder
from layerscope.spec.schema import read_document, with_python_data
from layerscope.spec.yaml_locations import LocatedDocument
from layerscope.util.errors import UserError


class Monitor:
    """Runs the analyses of *spec* (a YAML path or a dict) on a model at the training steps it is given
    (module docstring); *plugins* are extra plugin objects registered next to the installed ones."""

    def __init__(self, spec: str | os.PathLike | dict, *, plugins: tuple[Any, ...] = ()):
        self._doc, self._base_dir = read_document(spec)
        self._host = load_plugins(plugins)
        self._adapter: Adapter | None = None  # kept across steps: it holds the exported graph
        self._plan: RunPlan | None = None  # the last step's
        self._outcomes: list[CheckpointOutcome] = []
        self._previous: dict[str, Estimator] | None = None  # the last step's estimators, for carry_over
        self._last_step: int | None = None
        self._described: dict = {}  # the graph's tensors by structure: described at the first step only
        self._started = time.perf_counter()

    @property
    def steps(self) -> list[int]:
        """The steps observed so far, in order."""
        return [outcome.model["step"] for outcome in self._outcomes]

    def observe(self, model: Any, step: int, batch: Any = None) -> list[dict]:
        """Run the analyses on *model* as it is now (a ``torch.nn.Module`` or a Keras model), labelled
        with training *step* (an integer larger than the last step observed), on *batch* or, when it is
        None, on the spec's data; return this step's records. The model's train/eval mode is kept."""
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
            plan, [checkpoint], [(0, len(plan.order))], plan.order, plan.example(), live=True, described=self._described
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
        return outcome.records

    def _plan_for(self, model: Any, batch: Any) -> RunPlan:
        """The spec resolved for this step: *model* as the model, *batch* (when given) as the data."""
        data = self._doc.data if isinstance(self._doc.data, dict) else {}
        doc = LocatedDocument(
            {**data, "model": {"source": model}}, self._doc.filename, self._doc.positions, self._doc.located
        )
        plan = build_plan(with_python_data(doc, batch), self._base_dir, self._host)
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
    def for_callback(cls, spec: str | os.PathLike | dict | Monitor, every: Any) -> Monitor:
        """The monitor of a training callback that observes every *every* steps: *spec* itself when it is a
        monitor, else a new one of it; *every* must be a whole number ≥ 1."""
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a whole number ≥ 1, not {every!r}")
        return spec if isinstance(spec, Monitor) else cls(spec)

    def write(self, out_dir: str | os.PathLike) -> Results:
        """Write the results of the steps so far to *out_dir* in the spec's ``outputs.formats`` (every
        file or none, as a run does) and return them."""
        results, folder = self.results(), Path(out_dir)
        with output_folder(folder) as locked:
            locked.write(results, self._last_plan().reporters)
        return results
