"""The estimator lifecycle, driven once for every engine and for the conformance kit.

A run analyses checkpoints (models, in training order) with estimators that may need
several passes over the data. Every pass of every checkpoint is cut into tasks, one per
data shard (:class:`ShardTask`); an :class:`Executor` runs a list of tasks (in this
process, in worker processes, on Ray; the conformance kit feeds prepared batches) and
returns one :class:`ShardOutcome` each. :func:`drive` then, for each pass:

1. runs the tasks of the pass for the checkpoints in flight (fresh estimators in the first
   pass, copies of the checkpoint's merged state after that);
2. merges each checkpoint's shards **in shard order** into its :class:`CheckpointState`
   (``Estimator.merge``; a failure reported by any shard stands);
3. in training order, hands each checkpoint the estimators of the one before
   (``carry_over``, in the first pass only) and ends the pass on the merged state
   (``end_pass``), which the next pass's tasks receive.

Executors that run one task at a time take the checkpoints one by one (every pass of a
checkpoint before the next checkpoint, so a model is loaded once); parallel executors
take all checkpoints at once so every worker has a task. Records are the same either way:
``carry_over`` sees a predecessor that has ended at least its first pass.

:class:`Isolation` runs estimator code so that one failing plugin does not end the run
(its analysis is marked failed and skipped from then on); ``strict`` isolation, used by
the conformance kit, lets the error through.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from layerscope.util.errors import UserError

from .estimator import Estimator, PlanEstimator

Estimators = list[tuple[str, Estimator]]  # (analysis id, estimator), in the spec's order


@dataclass
class ShardTask:
    """One pass of one checkpoint over one data shard."""

    checkpoint: int  # index of the checkpoint in training order
    shard: int  # index of the data shard
    pass_index: int
    #: The checkpoint's merged estimators after the previous pass; None: build fresh ones.
    estimators: Estimators | None = None
    #: Analyses that failed in earlier passes (skipped from then on), by id.
    failures: dict[str, dict] = field(default_factory=dict)
    #: Also return the model details (asked of one task per checkpoint).
    describe: bool = False


@dataclass
class ShardOutcome:
    """What a task hands back: its estimators after the pass and what the pass met."""

    label: str
    estimators: Estimators = field(default_factory=list)
    failures: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    provider: str = ""
    #: Per feeding loop of the pass: ``{"groups": fetch groups, "peak_fetched_bytes": …}``.
    fetches: list[dict] = field(default_factory=list)
    model_info: dict | None = None
    #: The message of a user error (bad data, an unsupported model) met by the task.
    error: str | None = None
    samples: int = 0  # samples the task read (for progress)
    #: Seconds the task spent in each analysis's estimator code (and its input plan's passes), by id.
    seconds: dict[str, float] = field(default_factory=dict)


class Executor(Protocol):
    """Runs shard tasks and returns their outcomes in the order of the tasks."""

    #: True when tasks run side by side (then every checkpoint is in flight at once).
    parallel: bool
    #: Data shards per checkpoint: the tasks of a pass of a checkpoint.
    shards: int

    def run(self, tasks: list[ShardTask]) -> list[ShardOutcome]: ...


class Isolation:
    """Runs estimator code so that one failing plugin does not take the run down.

    A :class:`UserError` still ends the run; any other exception marks that analysis as
    failed (recorded with the plugin that contributed the estimator, from *origin*) and it
    is skipped from then on, while the other analyses complete. With ``strict`` every
    exception propagates (the conformance kit wants the traceback).
    """

    def __init__(self, model: str, origin: Callable[[Estimator], str] = lambda estimator: "?", strict: bool = False):
        self.model, self.origin, self.strict = model, origin, strict
        self.failures: dict[str, dict] = {}
        self.warnings: list[str] = []  # about the model's tensors (e.g. NaN activations)
        self.seconds: dict[str, float] = {}  # time spent in each analysis's estimator code, by id

    def call(self, analysis_id: str, estimator: Estimator, phase: str, function, *args):
        if analysis_id in self.failures:
            return None
        started = time.perf_counter()
        try:
            return function(*args)
        except UserError:
            raise
        except Exception as error:  # a bug in the estimator's plugin
            if self.strict:
                raise
            self.failures[analysis_id] = {
                "analysis": analysis_id,
                "estimator": estimator.name,
                "plugin": self.origin(estimator),
                "model": self.model,
                "phase": phase,
                "error": f"{type(error).__name__}: {error}",
            }
            return None
        finally:
            self.seconds[analysis_id] = self.seconds.get(analysis_id, 0.0) + time.perf_counter() - started


def analyses_in_pass(
    estimators: Estimators, pass_index: int, failures
) -> tuple[Estimators, list[tuple[str, PlanEstimator]]]:
    """(estimators fed by the data pass, estimators evaluating their input plan) in pass *pass_index*,
    leaving out failed analyses: an input-plan estimator evaluates its plan in its last pass."""
    planned = [
        (aid, est)
        for aid, est in estimators
        if isinstance(est, PlanEstimator) and est.passes == pass_index + 1 and aid not in failures
    ]
    fed = [
        (aid, est)
        for aid, est in estimators
        if est.passes > pass_index and (aid, est) not in planned and aid not in failures
    ]
    return fed, planned


@dataclass
class CheckpointState:
    """A checkpoint's merged estimators between passes, and what its passes met."""

    label: str
    estimators: Estimators
    isolation: Isolation
    provider: str = ""
    fetches: list[dict] = field(default_factory=list)
    model_info: dict = field(default_factory=dict)

    @property
    def passes(self) -> int:
        return max(est.passes for _, est in self.estimators)

    def merge(self, outcomes: list[ShardOutcome], pass_index: int) -> None:
        """Fold the shards of pass *pass_index* into this state, in shard order; estimators that the
        pass did not feed keep this state's."""
        for outcome in outcomes:
            for analysis_id, failure in outcome.failures.items():
                self.isolation.failures.setdefault(analysis_id, failure)  # the first failure stands
            self.isolation.warnings += outcome.warnings
            for analysis_id, seconds in outcome.seconds.items():
                self.isolation.seconds[analysis_id] = self.isolation.seconds.get(analysis_id, 0.0) + seconds
        first, merged = outcomes[0], []
        for index, (analysis_id, estimator) in enumerate(first.estimators):
            if estimator.passes <= pass_index:  # finished in an earlier pass
                merged.append(self.estimators[index])
                continue
            for outcome in outcomes[1:]:
                self.isolation.call(analysis_id, estimator, "merge", estimator.merge, outcome.estimators[index][1])
            merged.append((analysis_id, estimator))
        self.estimators = merged
        self.provider = first.provider or self.provider
        for fetches in itertools.zip_longest(*(outcome.fetches for outcome in outcomes), fillvalue={}):
            self.fetches.append(
                {key: max(fetch.get(key, 0) for fetch in fetches) for key in ("groups", "peak_fetched_bytes")}
            )
        if first.model_info is not None:
            self.model_info = first.model_info

    def carry_over(self, previous: dict[str, Estimator]) -> None:
        """Hand each estimator the same analysis's estimator of the previous checkpoint."""
        for analysis_id, estimator in self.estimators:
            if analysis_id in previous:
                self.isolation.call(analysis_id, estimator, "carry_over", estimator.carry_over, previous[analysis_id])

    def end_pass(self, pass_index: int) -> None:
        fed, planned = analyses_in_pass(self.estimators, pass_index, self.isolation.failures)
        for analysis_id, estimator in fed + planned:
            self.isolation.call(analysis_id, estimator, "end_pass", estimator.end_pass)


def drive(
    checkpoints: int,
    passes: int,
    executor: Executor,
    new_isolation: Callable[[str], Isolation],
    *,
    restored: Callable[[int], dict[str, Estimator] | None] = lambda index: None,
    predecessor: dict[str, Estimator] | None = None,
    continues: Callable[[int], bool] = lambda index: True,
    finished: Callable[[int, CheckpointState], None] = lambda index, state: None,
    advanced: Callable[[ShardOutcome], None] = lambda outcome: None,
) -> None:
    """Run *passes* passes of *checkpoints* checkpoints, each cut into ``executor.shards`` tasks, on *executor*
    (module docstring).

    *restored(i)* gives the saved estimators of checkpoint *i* when an earlier run finished it
    (it is then skipped; what it saved is handed to its successor's ``carry_over``);
    *predecessor* are the estimators of the checkpoint before the first (a monitor's previous step),
    handed to the first checkpoint's ``carry_over``; *continues(i)* is False when checkpoint *i* starts
    a series of its own (the next model of a multi-model spec), which then carries nothing over;
    *finished(i, state)* receives checkpoint *i*'s merged state once it has ended its last pass
    (the driver then keeps only what the next checkpoint's ``carry_over`` reads, so a long
    series of checkpoints run one by one holds one checkpoint's state at a time);
    *advanced(outcome)* is called after every task. A task's user error ends the run with its message.
    """
    states: dict[int, CheckpointState] = {}  # the checkpoints in flight
    saved = {index: restored(index) for index in range(checkpoints)}
    saved[-1] = predecessor
    pending = [index for index in range(checkpoints) if saved[index] is None]
    in_flight = [pending] if executor.parallel else [[index] for index in pending]
    for window in in_flight:
        for pass_index in range(passes):
            jobs = [index for index in window if index not in states or states[index].passes > pass_index]
            tasks = [
                ShardTask(index, shard, pass_index, describe=shard == 0)
                if index not in states
                else ShardTask(index, shard, pass_index, states[index].estimators, states[index].isolation.failures)
                for index in jobs
                for shard in range(executor.shards)
            ]
            if not tasks:
                break
            by_checkpoint: dict[int, list[ShardOutcome]] = {}
            for task, outcome in zip(tasks, executor.run(tasks)):
                if outcome.error is not None:
                    raise UserError(outcome.error)
                by_checkpoint.setdefault(task.checkpoint, []).append(outcome)
                advanced(outcome)
            for index, outcomes in by_checkpoint.items():
                if index not in states:
                    states[index] = CheckpointState(
                        outcomes[0].label, outcomes[0].estimators, new_isolation(outcomes[0].label)
                    )
                states[index].merge(outcomes, pass_index)
            for index in window:  # in training order
                if pass_index == 0:
                    if index == 0 or continues(index):
                        states[index].carry_over(_predecessor(index, states, saved))
                    saved.pop(index - 1, None)  # read by this checkpoint only
                if states[index].passes > pass_index:
                    states[index].end_pass(pass_index)
        for index in window:
            finished(index, states[index])
        saved[window[-1]] = dict(states[window[-1]].estimators)  # what the next window's carry_over reads
        for index in window:
            del states[index]


def _predecessor(index: int, states: dict[int, CheckpointState], saved: dict) -> dict[str, Estimator]:
    """The estimators of checkpoint *index* − 1 (in flight, finished in an earlier window, or restored
    from an earlier run)."""
    if index - 1 in states:
        return dict(states[index - 1].estimators)
    return saved.get(index - 1) or {}


def copied(task: ShardTask) -> ShardTask:
    """*task* with its own copy of the estimators (what a worker process receives)."""
    return ShardTask(
        task.checkpoint, task.shard, task.pass_index, copy.deepcopy(task.estimators), dict(task.failures), task.describe
    )


class SequentialExecutor:
    """Runs tasks one after the other with *run_task*, in this process. The tasks of a pass share
    the checkpoint's merged estimators, so every shard but the first is fed a copy of them."""

    parallel = False

    def __init__(self, run_task: Callable[[ShardTask], ShardOutcome], shards: int = 1):
        self.run_task, self.shards = run_task, shards

    def run(self, tasks: Sequence[ShardTask]) -> list[ShardOutcome]:
        own = [task if task.shard == 0 else copied(task) for task in tasks]  # copied before any shard is fed
        return [self.run_task(task) for task in own]
