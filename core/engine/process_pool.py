"""``runtime.workers: N``: shard tasks run by this process and N − 1 spawned worker processes.

The stream of samples is cut into contiguous shards of whole batches (methods defined per
batch, such as the information plane, see the batches a single process sees; a shard's
last batch still reads the look-ahead samples of the next one), and every pass of every
checkpoint becomes one task per shard; :func:`layerscope.engine.lifecycle.drive` merges them.

Workers rebuild the plan from the spec document and load the installed plugins
(:func:`start_worker`, also used by the Ray actors of :mod:`layerscope.engine.ray_engine`), so
plugin objects passed to ``layerscope.run(plugins=…)`` keep a run in one process.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from layerscope.data.source import Samples, shard_spans
from layerscope.model.adapter import Checkpoint
from layerscope.spec.yaml_locations import LocatedDocument
from layerscope.util.errors import UserError
from layerscope.util.processes import interrupts_held, signal_on_parent_death

from .checkpoint_run import ShardWorker, Span
from .lifecycle import ShardOutcome, ShardTask, TaskQueue
from .plan import RunPlan
from .threads import run_threads, set_threads


def worker_arguments(
    plan: RunPlan,
    checkpoints: list[Checkpoint],
    spans: list[Span],
    order: np.ndarray,
    example: Samples,
    threads: int | None,
) -> tuple:
    """What a worker process needs to rebuild this run's :class:`ShardWorker` (:func:`start_worker`)."""
    return plan.doc, str(plan.spec.base_dir), threads, checkpoints, spans, order, example


def start_worker(
    document: LocatedDocument,
    base_dir: str,
    threads: int | None,
    checkpoints: list[Checkpoint],
    spans: list[Span],
    order: np.ndarray,
    example: Samples,
) -> ShardWorker:
    """In a worker process: the plan rebuilt from the spec document with the installed plugins,
    onnxruntime set to *threads* threads (None: its default) and torch to one (:mod:`layerscope.engine.threads`)."""
    from layerscope.host.loader import load_plugins

    from .plan import build_plan

    set_threads(threads)
    plan = build_plan(document, Path(base_dir), load_plugins())
    return ShardWorker(plan, checkpoints, spans, order, example)


def auto_shards(requested: int | str, workers: int, checkpoints: int) -> int:
    """Shards per checkpoint: as asked, or (``auto``) enough for every worker to have a task per pass."""
    return requested if isinstance(requested, int) else max(1, -(-workers // checkpoints))


def run_spans(plan: RunPlan, workers: int, checkpoints: int, warnings: list[str]) -> list[Span]:
    """The data shards of a run with *workers* workers (``runtime.shards``; a shard holds at least one batch,
    and a warning says when fewer shards than asked for were made)."""
    shards = auto_shards(plan.spec.runtime.shards, workers, checkpoints)
    spans = shard_spans(len(plan.order), plan.spec.data.batch_size, shards)
    if len(spans) < shards and "shards" in plan.spec.runtime.model_fields_set:
        warnings.append(
            f"runtime.shards is {shards} but the data has {len(spans)} batch(es) of {plan.spec.data.batch_size} "
            f"samples; a shard holds whole batches, so {len(spans)} shard(s) ran"
        )
    return spans


_WORKER: ShardWorker | None = None  # in a worker process of the pool
_START_ERROR: str | None = None  # why this worker process could not rebuild the run


def _start_pool_worker(arguments: bytes, driver: int) -> None:
    """Rebuild the run from the pickled :func:`worker_arguments`; a failure (an object from Python
    that a fresh process cannot import) is kept and handed back as every task's error, since a pool
    whose initializer raises only reports that a process died."""
    global _WORKER, _START_ERROR
    _exit_with_parent(driver)
    try:
        _WORKER = start_worker(*pickle.loads(arguments))
    except Exception as error:  # any failure here is reported to the driver by message
        _START_ERROR = (
            f"runtime.workers: a worker process could not rebuild the run ({type(error).__name__}: "
            f"{error}); a model or data given from Python must be importable by a fresh Python process "
            "(its classes defined in a module on the path, not in a script run as __main__), or use "
            "runtime.workers: 1"
        )


def _exit_with_parent(driver: int, interval: float = 0.5) -> None:
    """End this worker process as soon as the driver that spawned it (process id *driver*) is gone.

    A driver killed outright (``kill -9``) cannot shut its pool down, and a worker busy with a
    task would run on for minutes. On Linux the kernel kills the worker with its driver
    (``PR_SET_PDEATHSIG``), before it can report the broken connection to the driver in a
    traceback; elsewhere, and for a driver already gone, a daemon thread notices that the process was
    handed to another parent and exits. The driver's id comes from the driver itself: a driver
    killed while this worker was still starting has already handed it to another parent.
    """
    signal_on_parent_death(signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == driver:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="layerscope-exit-with-parent", daemon=True).start()


def _start_quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (the process that removes a pool's semaphores once no
    process uses them) without its warning that it removed semaphores left by a killed driver: after
    ``kill -9`` that clean-up is expected, not a leak to report."""
    from multiprocessing import resource_tracker

    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    sys.warnoptions.append(quiet)  # the tracker is started with this process's -W options
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(quiet)


def _run_in_worker(task: ShardTask) -> ShardOutcome:
    if _WORKER is None:
        return ShardOutcome(str(task.checkpoint), error=_START_ERROR)
    return _WORKER.run(task)


class PoolExecutor:
    """Runs tasks on a pool of spawned processes and in this process (see :meth:`run`). A pool that lost a
    process (killed, out of memory) is replaced and the tasks it held run again, each at most
    ``retries`` times; beyond that the run ends with an :class:`InfrastructureError`."""

    parallel = True

    def __init__(
        self,
        new_pool: Callable[[], ProcessPoolExecutor],
        processes: int,
        here: ShardWorker,
        retries: int,
        warnings: list[str],
    ):
        self.new_pool, self.processes, self.here, self.retries = new_pool, processes, here, retries
        self.warnings = warnings  # the run's: a lost process is named there
        self.pool = new_pool()
        self.shards = len(here.spans)
        self.lost: collections.Counter[tuple[int, int, int]] = collections.Counter()  # by task key

    def run(self, queue: TaskQueue) -> Iterator[tuple[ShardTask, ShardOutcome]]:
        """The pool's processes take the most urgent tasks (two queued each, so none idles), while this
        process takes the least urgent one whenever more are waiting (it starts at once, while the spawned
        processes are still starting up). A task runs here on a copy, as in a worker."""
        running: dict[Future, ShardTask] = {}
        while queue or running:
            broken = False  # the pool lost a process: noticed by submit() or by the futures it failed
            while queue and len(running) < 2 * self.processes and not broken:
                task = queue.pop()
                try:
                    with interrupts_held():  # the processes submit() starts never see Ctrl-C: this one ends them
                        running[self.pool.submit(_run_in_worker, task)] = task
                except BrokenProcessPool:
                    queue.push(task)
                    broken = True
            if queue and not broken:
                task = queue.pop_last()
                yield task, self.here.run(pickle.loads(pickle.dumps(task)))
            done, _ = wait(running, timeout=0 if queue or broken else None, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                yield running.pop(future), outcome
            if broken:  # the pool's other tasks are lost with it
                self._retry(list(running.values()), queue)
                running.clear()

    def _retry(self, lost: list[ShardTask], queue: TaskQueue) -> None:
        """Queue the tasks a broken pool held again on a new pool, or end the run when one of them has
        been lost more often than ``runtime.retries`` allows."""
        self.kill()
        self.warnings.append(
            f"runtime.workers: a worker process ended abruptly (killed, or out of memory); the {len(lost)} "
            "task(s) its pool held ran again in new worker processes"
        )
        queue.requeue_lost(
            lost,
            self.lost,
            self.retries,
            lambda task, times: (
                f"runtime.workers: a worker process ended abruptly (killed, or out of memory) while running "
                f"pass {task.pass_index + 1} of data shard {task.shard + 1} of checkpoint "
                f"{self.here.checkpoints[task.checkpoint].label}, {times} (runtime.retries: {self.retries})"
            ),
        )
        self.pool = self.new_pool()

    def kill(self) -> None:
        """Kill the pool's processes and let it go: a broken pool (Python 3.11 can leave one process running,
        which submit() started while the pool's manager was terminating the others, and which that manager
        then waits for without end), or the pool of a run that ended early (an interrupt, an error): its
        processes ignore Ctrl-C and would finish their tasks first."""
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):
            process.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Shut the pool down once its tasks are done."""
        if getattr(self.pool, "_broken", False):
            self.kill()
        else:
            self.pool.shutdown(cancel_futures=True)


@contextmanager
def process_pool(
    plan: RunPlan, checkpoints: list[Checkpoint], example: Samples, workers: int, warnings: list[str]
) -> Iterator[PoolExecutor]:
    """An executor of this process and ``workers - 1`` spawned ones, each with ``cpu_count // workers``
    threads. Workers are spawned: forking a process whose torch and onnxruntime thread pools already
    run deadlocks the child."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    spans = run_spans(plan, workers, len(checkpoints), warnings)
    context = multiprocessing.get_context("spawn")
    here = ShardWorker(plan, checkpoints, spans, plan.order, example)
    try:
        arguments = pickle.dumps(worker_arguments(plan, checkpoints, spans, plan.order, example, threads))
    except Exception as error:  # PicklingError, or TypeError/AttributeError for a lambda or a local class
        raise UserError(
            f"runtime.workers: the run cannot be sent to worker processes ({type(error).__name__}: "
            f"{error}); give objects that pickle (no lambdas or local classes), or use "
            "runtime.workers: 1"
        ) from None

    def new_pool() -> ProcessPoolExecutor:
        _start_quiet_resource_tracker()
        return ProcessPoolExecutor(
            workers - 1, mp_context=context, initializer=_start_pool_worker, initargs=(arguments, os.getpid())
        )

    with run_threads(threads):
        executor = PoolExecutor(new_pool, workers - 1, here, plan.spec.runtime.retries, warnings)
        try:
            yield executor
        except BaseException:
            executor.kill()
            raise
        executor.close()
