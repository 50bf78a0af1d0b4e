"""Running a plan: for each model, one forward pass per batch feeds every analysis.

Data flow (design §2): plan → adapter loads each checkpoint as ONNX → selectors pick
tensors → the runner fetches them in budget-sized groups → estimators update → records.
Checkpoints run in this process, or as shard tasks in worker processes or on Ray
(:mod:`layerscope.sharding`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint_run import CheckpointRun, Outcome
from .estimator import Estimator
from .model import Checkpoint
from .plan import RunPlan
from .progress import Progress
from .outputs import output_folder, write_outputs
from .results import Results, finite_records
from .resume import ResumeStore
from .threads import run_threads


def analyse_checkpoint(plan: RunPlan, checkpoint: Checkpoint, order: np.ndarray, example: np.ndarray,
                       progress: Progress, previous: dict[str, Estimator]) -> Outcome:
    """Records and warnings of every analysis for one model checkpoint, in this process.

    *previous* maps analysis ids to the estimators of the previous checkpoint; it is
    updated with this checkpoint's estimators.
    """
    run = CheckpointRun(plan, checkpoint, order, example)
    run.carry_over(previous)
    previous.update(run.estimators)
    for pass_index in range(run.passes):
        run.run_pass(pass_index, progress)
        run.end_pass(pass_index)
    return run.finish()


def _analyse_in_process(plan: RunPlan, checkpoints: list[Checkpoint], order: np.ndarray, example: np.ndarray,
                        progress: Progress, store: ResumeStore | None) -> list[Outcome]:
    """Every checkpoint in this process, in training order, each saved to *store* once finished."""
    outcomes, previous = [], {}
    for index, checkpoint in enumerate(checkpoints):
        saved = store.load(index, checkpoint.label, plan) if store else None
        if saved is not None:
            outcome, previous = saved
            progress.advance(len(order) * plan.passes, f"{checkpoint.label} (resumed)")
        else:
            outcome = analyse_checkpoint(plan, checkpoint, order, example, progress, previous)
            if store:
                store.save(index, checkpoint.label, outcome, previous)
        outcomes.append(outcome)
    return outcomes


def _analyse(plan: RunPlan, checkpoints: list[Checkpoint], order: np.ndarray, example: np.ndarray,
             progress: Progress, store: ResumeStore | None, warnings: list[str]) -> list[Outcome]:
    """Every checkpoint's outcome from the engine the spec asks for (``runtime.engine``, ``runtime.workers``)."""
    runtime = plan.spec.runtime
    if runtime.parallel and plan.host.extra_plugins:
        warnings.append(f"runtime.{'engine: ray' if runtime.engine == 'ray' else 'workers'} is ignored when plugin "
                        "objects are passed from Python (workers load installed plugins only); the run stayed in "
                        "this process")
    elif runtime.engine == "ray":
        from .ray_engine import analyse_on_ray

        return analyse_on_ray(plan, checkpoints, order, example, progress, warnings)
    elif runtime.workers > 1:
        from .sharding import analyse_in_processes

        return analyse_in_processes(plan, checkpoints, order, example, runtime.workers, progress)
    return _analyse_in_process(plan, checkpoints, order, example, progress, store)


def execute(plan: RunPlan, out_dir: Path | None, show_progress: bool = True, resume: bool = False) -> Results:
    """Run every analysis of *plan* on every checkpoint and write the requested outputs.

    With *out_dir*, the run holds the folder's lock throughout, writes its files only once
    every record exists (:mod:`layerscope.outputs`), and saves each finished checkpoint of a
    multi-checkpoint run in this process so that an interrupted run continues with *resume*
    (see :mod:`layerscope.resume`).
    """
    with run_threads():
        if out_dir is None:
            return _execute(plan, None, show_progress, resume)
        with output_folder(out_dir):
            return _execute(plan, out_dir, show_progress, resume)


def _execute(plan: RunPlan, out_dir: Path | None, show_progress: bool, resume: bool) -> Results:
    spec = plan.spec
    started = time.perf_counter()
    order = plan.order
    example = plan.example()
    checkpoints = plan.adapter.checkpoints(spec.model, spec)
    plan.host.hook.before_run(spec=spec, models=[c.label for c in checkpoints])
    warnings: list[str] = []
    store = ResumeStore(out_dir, spec_to_dict(spec), resume) if out_dir is not None and len(checkpoints) > 1 else None
    if resume and spec.runtime.parallel:
        warnings.append("--resume continues runs made in one process; this parallel run analysed every checkpoint")
    with Progress(len(order) * plan.passes * len(checkpoints), enabled=show_progress) as progress:
        outcomes = _analyse(plan, checkpoints, order, example, progress, store, warnings)
    warnings += store.warnings if store else []
    records, failures, models = [], [], []
    for model_records, model_warnings, model_info, model_failures in outcomes:
        records, failures, warnings = records + model_records, failures + model_failures, warnings + model_warnings
        models.append(model_info)
    records = finite_records(records, warnings)
    import onnxruntime

    results = Results(
        layerscope=__version__,
        spec=spec_to_dict(spec),
        runtime={"provider": models[-1]["provider"], "device": spec.runtime.device,
                 "seconds": round(time.perf_counter() - started, 3), "samples": int(len(order)),
                 "seed": spec.runtime.seed, "engine": spec.runtime.engine, "onnxruntime": onnxruntime.__version__,
                 "torch": torch.__version__},
        models=models, records=records, warnings=plan.host.load_warnings() + warnings, failures=failures,
        analyses=[{"id": p.section.id, "estimator": p.section.estimator, "params": p.params.model_dump(mode="json"),
                   **({"reconstructed": p.estimator_class.reconstructed} if p.estimator_class.reconstructed else {})}
                  for p in plan.analyses],
    )
    if out_dir is not None:
        write_outputs(results, plan.reporters, out_dir)
    if store:
        store.clear()
    plan.host.hook.after_run(results=results)
    return results


def spec_to_dict(spec) -> dict:
    """The resolved spec as JSON-ready data (a model object given from Python is named, not dumped)."""
    data = spec.model_dump(mode="python", exclude_none=True)
    source = data["model"].get("source")
    if not isinstance(source, (str, int, float)):
        data["model"]["source"] = f"<{type(source).__module__}.{type(source).__name__} object>"
    return _jsonable(data)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
