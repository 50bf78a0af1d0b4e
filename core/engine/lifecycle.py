"""The estimator lifecycle, driven once for every engine and for the conformance kit.

A run analyses checkpoints (models, in training order) with estimators that may need
several passes over the data. Every pass of every checkpoint is cut into tasks, one per
data shard (:class:`ShardTask`); an :class:`Executor` runs the tasks of a :class:`TaskQueue`
(in this process, in worker processes, on Ray; the conformance kit feeds prepared batches),
taking the next whenever a worker is free, and hands back one :class:`ShardOutcome` per task
as it finishes. :func:`drive` then:

1. merges the shards of a pass of a checkpoint **as they arrive**, keeping shard order: a
   shard joins the run of adjacent shards before and after it (:class:`ShardMerge`; ``Estimator.merge``
   is associative), so the driver holds only the shards whose neighbours are still out,
   never every shard of a pass;
2. once a pass is merged, hands the checkpoint the estimators of the one before
   (``carry_over``, in the first pass only, once that one has ended its first pass) and
   ends the pass on the merged state (``end_pass``);
3. queues the next pass's tasks on that state, or, after the last pass, hands the
   checkpoint over as finished (to be saved for ``--resume`` at once).

The queue gives the earliest checkpoint's tasks first (then the earliest pass, then shard
order), so a run in one process takes the checkpoints one by one (every pass of a
checkpoint before the next checkpoint, so a model is loaded once), and a parallel run
finishes checkpoints in training order while later ones fill idle workers. Records are the
same either way: ``carry_over`` sees a predecessor that has ended at least its first pass.

:class:`Isolation` runs estimator code so that one failing plugin does not end the run
(its analysis is marked failed and skipped from then on); ``strict`` isolation, used by
the conformance kit, lets the error through.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from layerscope.util.errors import InfrastructureError, UserError

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

    @property
    def key(self) -> tuple[int, int, int]:
        """Where the task stands in a run: (checkpoint, pass, shard), its order in a :class:`TaskQueue`."""
        return self.checkpoint, self.pass_index, self.shard


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


class TaskQueue:
    """The tasks ready to run, the most urgent first: the earliest checkpoint, then the earliest pass,
    then shard order (:attr:`ShardTask.key`)."""

    def __init__(self) -> None:
        self._tasks: list[tuple[tuple[int, int, int], ShardTask]] = []

    def push(self, task: ShardTask) -> None:
        bisect.insort(self._tasks, (task.key, task), key=lambda entry: entry[0])

    def pop(self) -> ShardTask:
        """The most urgent task, taken off the queue."""
        return self._tasks.pop(0)[1]

    def pop_last(self) -> ShardTask:
        """The least urgent task, taken off the queue."""
        return self._tasks.pop()[1]

    def __len__(self) -> int:
        return len(self._tasks)

    def requeue_lost(
        self,
        tasks: Iterable[ShardTask],
        losses: Counter[tuple[int, int, int]],
        retries: int,
        failure: Callable[[ShardTask, str], str],
    ) -> None:
        """Queue the *tasks* of a lost worker again, counting each loss in *losses* (by task key); raise an
        :class:`InfrastructureError` saying ``failure(task, how often it was lost)`` ("once", "twice",
        "3 times") once a task has been lost more often than *retries* allows."""
        for task in tasks:
            losses[task.key] += 1
            if losses[task.key] > retries:
                times = losses[task.key]
                raise InfrastructureError(failure(task, {1: "once", 2: "twice"}.get(times, f"{times} times")))
            self.push(task)


class Executor(Protocol):
    """Runs the tasks of a queue and hands back each task with its outcome as it finishes."""

    #: True when tasks run side by side, outside this process's progress bar.
    parallel: bool
    #: Data shards per checkpoint: the tasks of a pass of a checkpoint.
    shards: int

    def run(self, queue: TaskQueue) -> Iterator[tuple[ShardTask, ShardOutcome]]:
        """Take tasks off *queue* (the most urgent first) whenever a worker is free and yield each
        with its outcome once it has finished. The driver queues new tasks while the iteration waits
        at a yield; it ends when the queue is empty and no task is running."""
        ...


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


class ShardMerge:
    """The shards of one pass of one checkpoint, merged as they arrive into runs of adjacent shards.

    A shard is merged into the run that ends where it starts and the run that starts where it ends
    is merged into it, so every merge joins an earlier stretch of samples with the one right after
    it (``Estimator.merge`` is associative): the result equals merging the shards one by one in
    shard order, while only runs whose neighbours are still out are held. Analyses that failed in a
    shard, or in *isolation* (the checkpoint's), are not merged; a failing merge is recorded there.
    """

    def __init__(self, shards: int, pass_index: int, isolation: Isolation):
        self.shards, self.pass_index, self.isolation = shards, pass_index, isolation
        self.runs: dict[int, tuple[int, ShardOutcome]] = {}  # first shard → (shard after the last, merged)
        self.ends: dict[int, int] = {}  # shard after the last → first shard

    def add(self, shard: int, outcome: ShardOutcome) -> ShardOutcome | None:
        """Merge *outcome* (shard *shard*) in; the whole pass once every shard has arrived, else None."""
        first, stop = shard, shard + 1
        if first in self.ends:
            first = self.ends.pop(shard)
            outcome = self._join(self.runs.pop(first)[1], outcome)
        if stop in self.runs:
            after, right = self.runs.pop(stop)
            del self.ends[after]
            outcome, stop = self._join(outcome, right), after
        if first == 0 and stop == self.shards:
            return outcome
        self.runs[first], self.ends[stop] = (stop, outcome), first
        return None

    @property
    def held(self) -> int:
        """Runs of shards held, waiting for a neighbour."""
        return len(self.runs)

    def _join(self, left: ShardOutcome, right: ShardOutcome) -> ShardOutcome:
        """*right* (the shards right after *left*'s) merged into *left*: estimators merged, the first
        failure of an analysis kept, warnings in shard order, seconds summed, the larger fetch figures."""
        left.failures = {**right.failures, **left.failures}
        for index, (analysis_id, estimator) in enumerate(left.estimators):
            if estimator.passes > self.pass_index and analysis_id not in left.failures:
                self.isolation.call(analysis_id, estimator, "merge", estimator.merge, right.estimators[index][1])
        left.warnings += right.warnings
        for analysis_id, seconds in right.seconds.items():
            left.seconds[analysis_id] = left.seconds.get(analysis_id, 0.0) + seconds
        empty: dict = {}
        left.fetches = [
            {key: max(mine.get(key, 0), theirs.get(key, 0)) for key in ("groups", "peak_fetched_bytes")}
            for mine, theirs in itertools.zip_longest(left.fetches, right.fetches, fillvalue=empty)
        ]
        left.provider = left.provider or right.provider
        left.model_info = left.model_info if left.model_info is not None else right.model_info
        left.samples += right.samples
        return left


@dataclass
class CheckpointState:
    """A checkpoint's merged estimators between passes, and what its passes met."""

    label: str
    estimators: Estimators
    isolation: Isolation
    provider: str = ""
    fetches: list[dict] = field(default_factory=list)
    model_info: dict = field(default_factory=dict)
    #: Passes ended (``end_pass`` called on the merged state).
    ended: int = 0

    @property
    def passes(self) -> int:
        return max(est.passes for _, est in self.estimators)

    def absorb(self, merged: ShardOutcome, pass_index: int) -> None:
        """Take pass *pass_index*, every shard merged (:class:`ShardMerge`), into this state; estimators
        that the pass did not feed keep this state's. A failure reported by any shard stands."""
        for analysis_id, failure in merged.failures.items():
            self.isolation.failures.setdefault(analysis_id, failure)  # the first failure stands
        self.isolation.warnings += merged.warnings
        for analysis_id, seconds in merged.seconds.items():
            self.isolation.seconds[analysis_id] = self.isolation.seconds.get(analysis_id, 0.0) + seconds
        self.estimators = [
            own if estimator.passes <= pass_index else (analysis_id, estimator)  # finished in an earlier pass
            for own, (analysis_id, estimator) in zip(self.estimators, merged.estimators)
        ]
        self.provider = merged.provider or self.provider
        self.fetches += merged.fetches
        if merged.model_info is not None:
            self.model_info = merged.model_info

    def carry_over(self, previous: dict[str, Estimator]) -> None:
        """Hand each estimator the same analysis's estimator of the previous checkpoint."""
        for analysis_id, estimator in self.estimators:
            if analysis_id in previous:
                self.isolation.call(analysis_id, estimator, "carry_over", estimator.carry_over, previous[analysis_id])

    def end_pass(self, pass_index: int) -> None:
        fed, planned = analyses_in_pass(self.estimators, pass_index, self.isolation.failures)
        for analysis_id, estimator in fed + planned:
            self.isolation.call(analysis_id, estimator, "end_pass", estimator.end_pass)
        self.ended = pass_index + 1


def drive(
    checkpoints: int,
    executor: Executor,
    new_isolation: Callable[[str], Isolation],
    *,
    restored: Callable[[int], dict[str, Estimator] | None] = lambda index: None,
    predecessor: dict[str, Estimator] | None = None,
    continues: Callable[[int], bool] = lambda index: True,
    finished: Callable[[int, CheckpointState], None] = lambda index, state: None,
    advanced: Callable[[ShardOutcome], None] = lambda outcome: None,
) -> None:
    """Run every pass of *checkpoints* checkpoints (as many as their estimators ask), each pass cut into
    ``executor.shards`` tasks, on *executor* (module docstring).

    *restored(i)* gives the saved estimators of checkpoint *i* when an earlier run finished it
    (it is then skipped; what it saved is handed to its successor's ``carry_over``);
    *predecessor* are the estimators of the checkpoint before the first (a monitor's previous step),
    handed to the first checkpoint's ``carry_over``; *continues(i)* is False when checkpoint *i* starts
    a series of its own (the next model of a multi-model spec), which then carries nothing over;
    *finished(i, state)* receives checkpoint *i*'s merged state as soon as it has ended its last pass
    (the driver then keeps only what the next checkpoint's ``carry_over`` reads, until it has read it);
    *advanced(outcome)* is called after every task. A task's user error ends the run with its message.
    """
    run = _Schedule(checkpoints, executor.shards, new_isolation, restored, predecessor, continues, finished)
    for task, outcome in executor.run(run.queue):
        if outcome.error is not None:
            raise UserError(outcome.error)
        advanced(outcome)
        run.arrived(task, outcome)
    if run.states or run.merges:  # every task was run, so nothing can still wait
        raise RuntimeError(f"the driver stopped with checkpoints {sorted(run.states)} unfinished")


class _Schedule:
    """The state of :func:`drive`: the queue of ready tasks, the passes being merged, the checkpoints in
    flight, and what each checkpoint's successor will read in ``carry_over``."""

    def __init__(self, checkpoints, shards, new_isolation, restored, predecessor, continues, finished):
        self.count, self.shards, self.new_isolation = checkpoints, shards, new_isolation
        self.continues, self.finished = continues, finished
        self.queue = TaskQueue()
        self.merges: dict[tuple[int, int], ShardMerge] = {}  # (checkpoint, pass) → its shards so far
        self.isolations: dict[int, Isolation] = {}
        self.states: dict[int, CheckpointState] = {}  # the checkpoints in flight, once a first pass is merged
        #: What a successor's carry_over reads: restored estimators, the monitor's predecessor (-1), or
        #: those of a checkpoint finished before its successor ended its first pass.
        self.saved: dict[int, dict[str, Estimator] | None] = {index: restored(index) for index in range(checkpoints)}
        self.saved[-1] = predecessor
        #: Checkpoints past their first pass (restored ones, and the predecessor of the first).
        self.first_ended = {index for index, saved in self.saved.items() if saved is not None or index == -1}
        self.merged: set[int] = set()  # checkpoints whose current pass is merged but not ended (carry_over waits)
        for index in range(checkpoints):
            if index not in self.first_ended:
                for shard in range(shards):
                    self.queue.push(ShardTask(index, shard, 0, describe=shard == 0))

    def arrived(self, task: ShardTask, outcome: ShardOutcome) -> None:
        """Merge a finished task's outcome; once its pass is complete, take the pass into the checkpoint's
        state and end every pass that can now end."""
        index = task.checkpoint
        isolation = self.isolations.setdefault(index, self.new_isolation(outcome.label))
        merge = self.merges.setdefault((index, task.pass_index), ShardMerge(self.shards, task.pass_index, isolation))
        whole = merge.add(task.shard, outcome)
        if whole is None:
            return
        del self.merges[index, task.pass_index]
        if index not in self.states:
            self.states[index] = CheckpointState(whole.label, whole.estimators, isolation)
        self.states[index].absorb(whole, task.pass_index)
        self.merged.add(index)
        self._end_passes(index)

    def _end_passes(self, index: int) -> None:
        """End the merged pass of checkpoint *index* (after ``carry_over`` in the first pass, which waits
        for the predecessor to end its first pass), and then the first pass of a successor that waited."""
        while index in self.merged:
            state = self.states[index]
            if state.ended == 0:
                carries = index == 0 or self.continues(index)
                if carries and index - 1 not in self.first_ended:
                    return  # the predecessor's first pass ends later, and ends this one's too
                if carries:
                    state.carry_over(self._previous(index))
                self.saved.pop(index - 1, None)  # read by this checkpoint only
            self.merged.discard(index)
            state.end_pass(state.ended)
            if state.ended == 1:
                self.first_ended.add(index)
            if state.ended < state.passes:
                for shard in range(self.shards):
                    self.queue.push(ShardTask(index, shard, state.ended, state.estimators, state.isolation.failures))
            else:
                self.finished(index, state)
                successor = index + 1
                if successor < self.count and successor not in self.first_ended and self.continues(successor):
                    self.saved[index] = dict(state.estimators)  # what the successor's carry_over will read
                del self.states[index], self.isolations[index]
            if state.ended > 1:
                return  # successors wait for a first pass only
            index += 1

    def _previous(self, index: int) -> dict[str, Estimator]:
        """The estimators of checkpoint *index* − 1 (in flight, finished, or restored from an earlier run)."""
        if index - 1 in self.states:
            return dict(self.states[index - 1].estimators)
        return self.saved.get(index - 1) or {}


def copied(task: ShardTask) -> ShardTask:
    """*task* with its own copy of the estimators (what a worker process receives)."""
    return ShardTask(
        task.checkpoint, task.shard, task.pass_index, copy.deepcopy(task.estimators), dict(task.failures), task.describe
    )


class SequentialExecutor:
    """Runs tasks one after the other with *run_task*, in this process. The tasks of a pass share the
    checkpoint's merged estimators, so with several shards each is fed a copy of them."""

    parallel = False

    def __init__(self, run_task: Callable[[ShardTask], ShardOutcome], shards: int = 1):
        self.run_task, self.shards = run_task, shards

    def run(self, queue: TaskQueue) -> Iterator[tuple[ShardTask, ShardOutcome]]:
        while queue:
            task = queue.pop()
            yield task, self.run_task(task if self.shards == 1 else copied(task))
