"""Running a plan: for each model, one forward pass per batch feeds every analysis.

Data flow: plan → adapter loads each checkpoint as ONNX → selectors pick
tensors → the runner fetches them in budget-sized groups → estimators update → records.
The passes of every checkpoint run as shard tasks (:mod:`layerscope.engine.lifecycle`) in this process,
in worker processes or on Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from layerscope import __version__
from layerscope.data.source import Samples
from layerscope.graph.cost import macs_per_sample
from layerscope.model.adapter import Checkpoint
from layerscope.results.contract import Results, finite_records
from layerscope.results.outputs import OutputFolder, output_folder
from layerscope.results.reporter import check_reporters

from .checkpoint_run import ShardWorker
from .lifecycle import Executor, Isolation, SequentialExecutor, drive
from .outcomes import CheckpointOutcome, finish_checkpoint
from .plan import RunPlan
from .progress import Progress
from .resume import ResumeStore, input_fingerprints
from .threads import run_threads

#: What starting one worker process costs: spawning it, its imports, the plan rebuilt and the model loaded
#: (about 2.5 s on a 2-core machine).
WORKER_START_SECONDS = 3.0
#: Multiply-accumulates one process runs per second (ResNet-18 on onnxruntime, 2 cores: about 1.9e10).
MACS_PER_SECOND = 2e10


def spreading_pays(plan: RunPlan, worker: ShardWorker, checkpoints: int, warnings: list[str]) -> bool:
    """Whether worker processes can end the run sooner than this process alone: yes for several
    checkpoints or shards the spec sets; for one checkpoint with ``shards: auto`` only when its forward
    passes, estimated from the graph (:func:`layerscope.graph.cost.macs_per_sample`), take longer than the
    workers take to start (w workers save at most (w − 1)/w of the time). Otherwise a warning says the
    run stayed in this process."""
    runtime = plan.spec.runtime
    if checkpoints > 1 or runtime.shards != "auto":
        return True
    model = worker.load(0)
    seconds = macs_per_sample(model.loaded.proto, model.tensors) * len(plan.order) * plan.passes / MACS_PER_SECOND
    if seconds * (runtime.workers - 1) / runtime.workers > WORKER_START_SECONDS:
        return True
    warnings.append(
        f"runtime.workers: {runtime.workers} left unused: one checkpoint's forward passes take about "
        f"{seconds:.1g} s, less than starting worker processes takes ({WORKER_START_SECONDS:g} s); the run "
        "stayed in this process (set runtime.shards to spread it anyway)"
    )
    return False


@contextmanager
def open_executor(
    plan: RunPlan, checkpoints: list[Checkpoint], example: Samples, progress: Progress, warnings: list[str]
) -> Iterator[Executor]:
    """The executor the spec asks for (``runtime.engine``, ``runtime.workers``): this process,
    worker processes on this machine (:mod:`layerscope.engine.process_pool`) or Ray actors
    (:mod:`layerscope.engine.ray_engine`)."""
    runtime = plan.spec.runtime
    if runtime.parallel and plan.host.extra_plugins:
        warnings.append(
            f"runtime.{'engine: ray' if runtime.engine == 'ray' else 'workers'} is ignored when plugin "
            "objects are passed from Python (workers load installed plugins only); the run stayed in "
            "this process"
        )
    elif runtime.engine == "ray":
        from .ray_engine import ray_actors

        with ray_actors(plan, checkpoints, example, warnings) as executor:
            yield executor
        return
    worker = ShardWorker(plan, checkpoints, [(0, len(plan.order))], plan.order, example, progress)
    if runtime.workers > 1 and spreading_pays(plan, worker, len(checkpoints), warnings):
        from .process_pool import process_pool

        with process_pool(plan, checkpoints, example, runtime.workers, warnings) as executor:
            yield executor
        return
    yield SequentialExecutor(worker.run)


def analyse(
    plan: RunPlan,
    checkpoints: list[Checkpoint],
    example: Samples,
    progress: Progress,
    store: ResumeStore | None,
    warnings: list[str],
) -> list[CheckpointOutcome]:
    """Every checkpoint's outcome, its tasks run by the spec's executor (:func:`layerscope.engine.lifecycle.drive`);
    each finished checkpoint is saved to *store*, and checkpoints saved by an interrupted run are reused."""
    outcomes: dict[int, CheckpointOutcome] = {}
    samples = len(plan.order)

    def restored(index: int):
        saved = store.load(index, checkpoints[index].label, plan) if store else None
        if saved is None:
            return None
        outcomes[index], estimators = saved
        progress.advance(samples * plan.passes, f"{checkpoints[index].label} (resumed)")
        return estimators

    def finished(index: int, state) -> None:
        outcomes[index] = finish_checkpoint(plan, state, checkpoints[index])
        if store:
            store.save(index, state.label, outcomes[index], dict(state.estimators))

    with open_executor(plan, checkpoints, example, progress, warnings) as executor:

        def advanced(outcome) -> None:  # tasks in this process advance the bar batch by batch
            if executor.parallel:
                progress.advance(outcome.samples, outcome.label)

        drive(
            len(checkpoints),
            executor,
            lambda label: Isolation(label, plan.host.origin_of),
            restored=restored,
            finished=finished,
            advanced=advanced,
            continues=lambda index: checkpoints[index].network == checkpoints[index - 1].network,
        )
    return [outcomes[index] for index in range(len(checkpoints))]


def execute(plan: RunPlan, out_dir: Path | None, show_progress: bool = True, resume: bool = False) -> Results:
    """Run every analysis of *plan* on every checkpoint and write the requested outputs.

    With *out_dir*, the run holds the folder's lock throughout, writes its files only once
    every record exists (:mod:`layerscope.results.outputs`), and saves each finished checkpoint of a
    multi-checkpoint run in this process so that an interrupted run continues with *resume*
    (see :mod:`layerscope.engine.resume`).
    """
    with run_threads():
        if out_dir is None:
            return _execute(plan, None, show_progress, resume)
        with output_folder(out_dir) as folder:
            check_reporters(plan.reporters, out_dir, "outputs.formats")  # before the model runs
            return _execute(plan, folder, show_progress, resume)


def _execute(plan: RunPlan, folder: OutputFolder | None, show_progress: bool, resume: bool) -> Results:
    spec = plan.spec
    started = time.perf_counter()
    order = plan.order
    example = plan.example()
    checkpoints = plan.checkpoints()
    plan.host.hook.before_run(spec=spec, models=[c.label for c in checkpoints])
    warnings: list[str] = []
    store = None
    if folder is not None and len(checkpoints) > 1:
        fingerprints = input_fingerprints(plan.data, checkpoints, spec.base_dir)
        store = ResumeStore(folder.path, spec_to_dict(spec), resume, fingerprints)
    with Progress(len(order) * plan.passes * len(checkpoints), enabled=show_progress) as progress:
        outcomes = analyse(plan, checkpoints, example, progress, store, warnings)
    warnings += store.warnings if store else []
    results = assemble_results(plan, outcomes, warnings, started)
    if folder is not None:
        folder.write(results, plan.reporters)
    if store:
        store.clear()
    plan.host.hook.after_run(results=results)
    return results


def assemble_results(
    plan: RunPlan, outcomes: list[CheckpointOutcome], warnings: list[str], started: float, **runtime
) -> Results:
    """The :class:`Results` of *plan* from its checkpoints' outcomes (in training order): records with
    non-finite values dropped (with a warning), the run's provenance, and each analysis's parameters and
    the seconds spent in its estimator code (summed over checkpoints); *runtime* adds entries to ``runtime``."""
    import onnxruntime

    from layerscope.graph.ort_package import ort_package

    spec = plan.spec
    package, package_warnings = ort_package()
    warnings = package_warnings + warnings + [w for outcome in outcomes for w in outcome.warnings]
    records = finite_records([r for outcome in outcomes for r in outcome.records], warnings)
    models = [outcome.model for outcome in outcomes]
    return Results(
        layerscope=__version__,
        spec=spec_to_dict(spec),
        runtime={
            "run_id": plan.run_id,
            "provider": models[-1]["provider"],
            "device": spec.runtime.device,
            "seconds": round(time.perf_counter() - started, 3),
            "samples": int(len(plan.order)),
            "seed": spec.runtime.seed,
            "engine": spec.runtime.engine,
            "onnxruntime": onnxruntime.__version__,
            "onnxruntime_package": package,
            "torch": torch.__version__,
            **runtime,
        },
        models=models,
        records=records,
        warnings=plan.host.load_warnings() + warnings,
        failures=[f for outcome in outcomes for f in outcome.failures],
        analyses=[
            {
                "id": p.section.id,
                "estimator": p.section.estimator,
                "params": p.params.model_dump(mode="json"),
                "tokens": p.estimator_class.tags.tokens,
                "seconds": round(sum(o.seconds.get(p.section.id, 0.0) for o in outcomes), 3),
                **(
                    {"reconstructed": p.estimator_class.tags.reconstructed}
                    if p.estimator_class.tags.reconstructed
                    else {}
                ),
            }
            for p in plan.analyses
        ],
    )


def spec_to_dict(spec) -> dict:
    """The resolved spec as JSON-ready data (a model object given from Python is named, not dumped)."""
    data = spec.model_dump(mode="python", exclude_none=True)
    for section in [data["model"]] if "model" in data else data["models"]:
        source = section.get("source")
        if not isinstance(source, (str, int, float)):
            section["source"] = f"<{type(source).__module__}.{type(source).__name__} object>"
    return _jsonable(data)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
