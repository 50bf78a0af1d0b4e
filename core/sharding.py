"""Sharded runs: (checkpoint × data shard) tasks run by workers, merged by the driver.

The stream of samples is cut into contiguous shards of whole batches (methods defined per
batch, such as the information plane, see the batches a single process sees; a shard's
last batch still reads the look-ahead samples of the next one). Every pass of every
checkpoint becomes one task per shard. A worker loads the checkpoint, feeds its shard to
the estimators it was handed (fresh ones in the first pass) and returns them; the driver
merges the shards' estimators in shard order (``Estimator.merge`` is exact), then, in
training order, hands each checkpoint its predecessor (``carry_over``, in the first pass)
and ends the pass on the merged state, which the next pass's tasks receive. Records
therefore equal a single process's up to the order of floating-point sums.

Workers rebuild the plan from the spec document and load the installed plugins, so plugin
objects passed to ``layerscope.run(plugins=…)`` keep a run in one process. Two backends
run the tasks: this process with spawned worker processes on this machine
(``runtime.workers``), and Ray actors (:mod:`layerscope.ray_engine`).
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint_run import CheckpointAnalyses, CheckpointRun, Outcome, Span, describe_model
from .data import shard_spans
from .errors import UserError
from .estimator import Estimator
from .model import Checkpoint
from .plan import RunPlan
from .progress import Progress
from .threads import run_threads, set_threads



@dataclass
class ShardTask:
    """One pass of one checkpoint over one data shard."""

    checkpoint: Checkpoint
    span: Span
    pass_index: int
    #: The checkpoint's merged estimators after the previous pass; None: fresh ones.
    estimators: list[tuple[str, Estimator]] | None = None
    #: Also return the model details (asked of one shard per checkpoint).
    describe: bool = False
    #: Analyses that failed in earlier passes (skipped from then on), by id.
    failures: dict[str, dict] = field(default_factory=dict)


@dataclass
class ShardOutcome:
    label: str
    estimators: list[tuple[str, Estimator]] = field(default_factory=list)
    provider: str = ""
    fetches: list[dict] = field(default_factory=list)
    failures: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    model_info: dict | None = None
    #: The message of a user error (bad data, an unsupported model) met in the worker.
    error: str | None = None


class ShardWorker:
    """Runs shard tasks of one plan over one sample order."""

    def __init__(self, plan: RunPlan, order: np.ndarray, example: np.ndarray):
        self.plan, self.order, self.example = plan, order, example

    def run(self, task: ShardTask) -> ShardOutcome:
        try:
            run = CheckpointRun(self.plan, task.checkpoint, self.order, self.example, task.estimators)
            run.isolation.failures.update(task.failures)
            run.run_pass(task.pass_index, Progress(0, enabled=False), task.span)
        except UserError as error:
            return ShardOutcome(task.checkpoint.label, error=str(error))
        return ShardOutcome(run.label, run.estimators, run.provider, run.groups, run.isolation.failures,
                            run.isolation.warnings, describe_model(run.loaded) if task.describe else None)


def worker_arguments(plan: RunPlan, order: np.ndarray, example: np.ndarray, threads: int | None) -> tuple:
    """What a worker process needs to rebuild this run's :class:`ShardWorker` (:func:`start_worker`)."""
    return plan.doc.data, plan.doc.filename, str(plan.spec.base_dir), threads, order, example


def start_worker(document: dict, filename: str, base_dir: str, threads: int | None, order: np.ndarray,
                 example: np.ndarray) -> ShardWorker:
    """In a worker process: the plan rebuilt from the spec document with the installed plugins,
    onnxruntime set to *threads* threads (None: its default) and torch to one (:mod:`layerscope.threads`)."""
    from .plan import build_plan
    from .plugin_host import load_plugins
    from .spec import parse_spec
    from .yaml_locations import LocatedDocument

    set_threads(threads)
    doc = LocatedDocument(data=document, filename=filename)
    return ShardWorker(build_plan(parse_spec(doc, Path(base_dir)), doc, load_plugins()), order, example)


def auto_shards(requested: int | str, workers: int, checkpoints: int) -> int:
    """Shards per checkpoint: as asked, or (``auto``) enough for every worker to have a task per pass."""
    return requested if isinstance(requested, int) else max(1, -(-workers // checkpoints))


def _merge_shards(plan: RunPlan, state: CheckpointAnalyses | None, outcomes: list[ShardOutcome],
                  pass_index: int) -> CheckpointAnalyses:
    """Fold the shards of pass *pass_index* of a checkpoint, in shard order, into its driver-side
    state; estimators that this pass did not feed keep the driver's state."""
    first = outcomes[0]
    if state is None:
        state = CheckpointAnalyses(plan, first.label, first.estimators)
    for outcome in outcomes:
        for analysis_id, failure in outcome.failures.items():
            state.isolation.failures.setdefault(analysis_id, failure)  # the first failure stands
        state.isolation.warnings += outcome.warnings
    merged = []
    for index, (analysis_id, estimator) in enumerate(first.estimators):
        if estimator.passes <= pass_index:  # finished in an earlier pass
            merged.append(state.estimators[index])
            continue
        for outcome in outcomes[1:]:
            state.isolation.call(analysis_id, estimator, "merge", estimator.merge, outcome.estimators[index][1])
        merged.append((analysis_id, estimator))
    state.estimators = merged
    state.provider = first.provider or state.provider
    for fetches in itertools.zip_longest(*(outcome.fetches for outcome in outcomes), fillvalue={}):
        state.groups.append({key: max(fetch.get(key, 0) for fetch in fetches)
                             for key in ("groups", "peak_fetched_bytes")})
    if first.model_info is not None:
        state.model_info = first.model_info
    return state


def analyse_sharded(plan: RunPlan, checkpoints: list[Checkpoint], order: np.ndarray, shards: int,
                    run_tasks, progress: Progress) -> list[Outcome]:
    """The outcome of every checkpoint, its passes run as shard tasks by *run_tasks* (a function
    mapping a list of :class:`ShardTask` to their :class:`ShardOutcome`, in order)."""
    spans = shard_spans(len(order), plan.spec.data.batch_size, shards)
    states: list[CheckpointAnalyses | None] = [None] * len(checkpoints)
    for pass_index in range(plan.passes):
        jobs = [(c, s) for c, state in enumerate(states) if state is None or state.passes > pass_index
                for s in range(len(spans))]
        tasks = [ShardTask(checkpoints[c], spans[s], pass_index, describe=pass_index == 0 and s == 0)
                 if states[c] is None else
                 ShardTask(checkpoints[c], spans[s], pass_index, states[c].estimators,
                           failures=states[c].isolation.failures) for c, s in jobs]
        by_checkpoint: dict[int, list[ShardOutcome]] = {}
        for (c, s), outcome in zip(jobs, run_tasks(tasks)):
            if outcome.error is not None:
                raise UserError(outcome.error)
            by_checkpoint.setdefault(c, []).append(outcome)
            progress.advance(spans[s][1] - spans[s][0], outcome.label)
        for c, outcomes in by_checkpoint.items():
            states[c] = _merge_shards(plan, states[c], outcomes, pass_index)
        previous: dict[str, Estimator] = {}
        for state in states:  # in training order
            if pass_index == 0:
                state.carry_over(previous)
                previous = dict(state.estimators)
            if state.passes > pass_index:
                state.end_pass(pass_index)
    return [state.finish() for state in states]


_WORKER: ShardWorker | None = None  # in a worker process of the pool


def _start_pool_worker(*arguments) -> None:
    global _WORKER
    _exit_with_parent()
    _WORKER = start_worker(*arguments)


def _exit_with_parent(interval: float = 0.5) -> None:
    """End this worker process as soon as the driver that spawned it is gone.

    A driver killed outright (``kill -9``) cannot shut its pool down, and a worker busy with a
    task would run on for minutes; a daemon thread notices that the process was handed to
    another parent and exits at once.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="layerscope-exit-with-parent", daemon=True).start()


def _run_in_worker(task: ShardTask) -> ShardOutcome:
    return _WORKER.run(task)


def analyse_in_processes(plan: RunPlan, checkpoints: list[Checkpoint], order: np.ndarray, example: np.ndarray,
                         workers: int, progress: Progress) -> list[Outcome]:
    """Shard tasks run by this process and ``workers - 1`` spawned ones, each with
    ``cpu_count // workers`` threads (see :func:`_share_tasks`). Workers are spawned:
    forking a process whose torch and onnxruntime thread pools already run deadlocks the child."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    shards = auto_shards(plan.spec.runtime.shards, workers, len(checkpoints))
    context = multiprocessing.get_context("spawn")
    here = ShardWorker(plan, order, example)
    with run_threads(threads), ProcessPoolExecutor(workers - 1, mp_context=context, initializer=_start_pool_worker,
                                                  initargs=worker_arguments(plan, order, example, threads)) as pool:
        try:
            return analyse_sharded(plan, checkpoints, order, shards,
                                   lambda tasks: _share_tasks(tasks, pool, workers - 1, here), progress)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _share_tasks(tasks: list[ShardTask], pool: ProcessPoolExecutor, processes: int,
                 here: ShardWorker) -> list[ShardOutcome]:
    """Outcomes of *tasks* in order: the pool's *processes* take tasks from the front (two
    queued each, so none idles), while this process takes them from the back (it starts at
    once, while the spawned processes are still starting up). A task runs on a copy, as in
    a worker process."""
    outcomes: list[ShardOutcome | None] = [None] * len(tasks)
    waiting = collections.deque(enumerate(tasks))
    running: dict = {}
    while waiting or running:
        while waiting and len(running) < 2 * processes:
            index, task = waiting.popleft()
            running[pool.submit(_run_in_worker, task)] = index
        if waiting:
            index, task = waiting.pop()
            outcomes[index] = here.run(pickle.loads(pickle.dumps(task)))
        done, _ = wait(running, timeout=0 if waiting else None, return_when=FIRST_COMPLETED)
        for future in done:
            outcomes[running.pop(future)] = future.result()
    return outcomes
