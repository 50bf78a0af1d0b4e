"""Several checkpoints analysed by worker processes on one machine (``runtime.workers``).

Checkpoints advance pass by pass. Every pass of every checkpoint is a task for the pool
(the heavy part: forward passes and estimator updates); between passes the driver ends
the pass of each checkpoint in training order, handing each estimator its predecessor
first (``carry_over``), so methods that smooth across checkpoints (the information plane's
kernel width) get exactly what the single-process engine gives them.

Workers are *spawned* (forking a process whose torch and onnxruntime thread pools already
run deadlocks the child); each rebuilds the plan from the spec document and loads the
installed plugins, so plugin objects passed to ``layerscope.run(plugins=…)`` stay in the
driver (the engine then runs sequentially). Each worker runs onnxruntime and torch with
``cpu_count // workers`` threads.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .engine import CheckpointRun
from .model import Checkpoint
from .plan import RunPlan
from .progress import Progress

_PLAN: RunPlan | None = None  # the plan, rebuilt once in every worker


def _initialise(document: dict, filename: str, base_dir: str, threads: int) -> None:
    """In a new worker: the same plan as the driver's, from the same spec document."""
    global _PLAN
    import torch

    from . import session
    from .plan import build_plan
    from .plugin_host import load_plugins
    from .spec import parse_spec
    from .yaml_locations import LocatedDocument

    session.THREADS = threads
    torch.set_num_threads(threads)
    doc = LocatedDocument(data=document, filename=filename)
    _PLAN = build_plan(parse_spec(doc, Path(base_dir)), doc, load_plugins())


def _pass_task(checkpoint: Checkpoint, order: np.ndarray, example: np.ndarray, pass_index: int, estimators):
    """In a worker: one pass of one checkpoint; returns the estimators and what the run recorded."""
    run = CheckpointRun(_PLAN, checkpoint, order, example, estimators)
    run.run_pass(pass_index, Progress(0, enabled=False))
    return run.estimators, run.provider, run.groups, run.isolation.failures, run.isolation.warnings


def analyse_in_parallel(plan: RunPlan, checkpoints: list[Checkpoint], order: np.ndarray, example: np.ndarray,
                        workers: int, progress: Progress) -> list[tuple[list[dict], list[str], dict, list[dict]]]:
    """The outcome of every checkpoint, computed by *workers* processes (see module docstring)."""
    runs = [CheckpointRun(plan, checkpoint, order, example) for checkpoint in checkpoints]
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    setup = (plan.doc.data, plan.doc.filename, str(plan.spec.base_dir), threads)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_initialise, initargs=setup) as pool:
        for pass_index in range(max(run.passes for run in runs)):
            futures = [pool.submit(_pass_task, checkpoint, order, example, pass_index, run.estimators)
                       for checkpoint, run in zip(checkpoints, runs)]
            for run, future in zip(runs, futures):
                estimators, provider, groups, failures, warnings = future.result()
                run.estimators, run.provider = estimators, provider or run.provider
                run.groups += groups
                run.isolation.failures.update(failures)
                run.isolation.warnings += warnings
                progress.advance(len(order), run.loaded.label)
            previous: dict = {}
            for run in runs:  # in training order
                if pass_index == 0:
                    run.carry_over(previous)
                    previous = dict(run.estimators)
                run.end_pass(pass_index)
    return [run.finish() for run in runs]
