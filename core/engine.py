"""The local engine: for each model, one forward pass per batch feeds every analysis.

Data flow (design §2): plan → adapter loads each checkpoint as ONNX → selectors pick
tensors → the runner fetches them in budget-sized groups → estimators update → records.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import iter_batches, sample_order
from .errors import UserError
from .estimator import DataBatch, Estimator, TensorBatch
from .graph import describe_tensors
from .model import Checkpoint, LoadedModel
from .plan import RunPlan
from .progress import Progress
from .results import RESULTS_FILE, Results, finite_records
from .resume import ResumeStore
from .runner import Runner, to_torch
from .selectors import resolve


def build_estimators(plan: RunPlan, loaded: LoadedModel) -> tuple[list[tuple[str, Estimator]], list]:
    """Instantiate every analysis on the tensors its selector picks in *loaded*."""
    tensors = describe_tensors(loaded.proto, loaded.layer_of)
    built = []
    for planned in plan.analyses:
        selector = planned.section.on or planned.estimator_class.selector()
        try:
            chosen = resolve(selector, tensors, strict=planned.section.on is not None)
        except UserError as error:
            path = ("analyses", planned.index, "on") if planned.section.on else ("analyses", planned.index, "estimator")
            raise UserError(f"{plan.where(*path)}: {error} (model {loaded.label})") from None
        estimator = planned.estimator_class(planned.params, chosen)
        try:
            estimator.bind_graph(tensors, loaded.proto)
        except UserError as error:
            raise UserError(f"{plan.where('analyses', planned.index, 'on')}: {error} (model {loaded.label})") from None
        built.append((planned.section.id, estimator))
    return built, tensors


class Isolation:
    """Runs estimator code so that one failing plugin does not take the run down.

    A :class:`UserError` still ends the run; any other exception marks that analysis as
    failed (recorded with the plugin that contributed the estimator) and it is skipped from
    then on, while the other analyses complete.
    """

    def __init__(self, plan: RunPlan, model: str):
        self.plan, self.model = plan, model
        self.failures: dict[str, dict] = {}
        self.warnings: list[str] = []  # about the model's tensors (e.g. NaN activations)

    def call(self, analysis_id: str, estimator: Estimator, phase: str, function, *args):
        if analysis_id in self.failures:
            return None
        try:
            return function(*args)
        except UserError:
            raise
        except Exception as error:  # a bug in the estimator's plugin
            plugin = self.plan.host.estimators.origin.get(estimator.name, "?")
            self.failures[analysis_id] = {
                "analysis": analysis_id, "estimator": estimator.name, "plugin": plugin, "model": self.model,
                "phase": phase, "error": f"{type(error).__name__}: {error}"}
            return None


def _feed_pass(plan: RunPlan, active: list[tuple[str, Estimator]], tensors, loaded: LoadedModel,
               order: np.ndarray, progress: Progress, isolation: Isolation) -> tuple[str, dict]:
    """One pass over the data for *active* estimators; returns (provider that ran, fetch statistics)."""
    spec = plan.spec
    atomic = list(dict.fromkeys(group for _, est in active for group in est.fetch_groups()))
    splittable = ({name for _, est in active if not est.per_batch for group in est.fetch_groups() for name in group}
                  - {name for _, est in active if est.per_batch for group in est.fetch_groups() for name in group})
    runner = Runner(loaded.proto, tensors, atomic, spec.runtime.device, spec.runtime.memory_budget,
                    spec.data.batch_size, splittable, loaded.external_dir)
    wanted = [{name for group in est.fetch_groups() for name in group} for _, est in active]
    nonfinite: set[str] = set()
    for batch_index, (start, x, y) in enumerate(iter_batches(plan.data, order, spec.data.batch_size)):
        x = runner.prepare(x)
        inputs = to_torch(x)
        labels = torch.from_numpy(np.asarray(y)) if y is not None else None
        for (aid, estimator), names in zip(active, wanted):
            if not names:  # reads only the data this pass (e.g. to fit a basis)
                isolation.call(aid, estimator, "update", estimator.update, TensorBatch({}, inputs, labels, start))
        for part, fetched in runner.run(x):
            nonfinite.update(name for name, value in fetched.items()
                             if value.is_floating_point() and not bool(torch.isfinite(value).all()))
            for (aid, estimator), names in zip(active, wanted):
                mine = {name: value for name, value in fetched.items() if name in names}
                if mine:
                    batch = TensorBatch(mine, inputs[part], None if labels is None else labels[part],
                                        start + (part.start or 0))
                    isolation.call(aid, estimator, "update", estimator.update, batch)
        plan.host.hook.after_batch(model=loaded.label, batch_index=batch_index, samples=len(x))
        progress.advance(len(x), f"{loaded.label}")
    for name in sorted(nonfinite):
        isolation.warnings.append(f"tensor '{name}' of {loaded.label} contains NaN or Inf values; estimates that read "
                                  "it may be meaningless")
    return runner.provider, {"groups": len(runner.groups or []), "peak_fetched_bytes": runner.peak_fetched_bytes}


def _feed_plan(plan: RunPlan, analysis_id: str, estimator: Estimator, loaded: LoadedModel, tensors,
               order: np.ndarray, progress: Progress, isolation: Isolation) -> tuple[str, dict]:
    """The input-plan pass of one estimator: its plan batches, evaluated by the runner."""
    spec = plan.spec
    model = estimator.transform_model(loaded.proto)
    if model is not loaded.proto:
        tensors = describe_tensors(model, loaded.layer_of)
    groups = estimator.fetch_groups()
    splittable = set() if estimator.per_batch else {name for group in groups for name in group}
    runner = Runner(model, tensors, groups, spec.runtime.device, spec.runtime.memory_budget,
                    estimator.plan_rows(spec.data.batch_size), splittable, loaded.external_dir)
    batches = iter_batches(plan.data, order, spec.data.batch_size, estimator.lookahead)
    for batch_index, (start, x, y) in enumerate(batches):
        size = min(spec.data.batch_size, len(order) - start)
        plans = isolation.call(analysis_id, estimator, "input_plan", list,
                               estimator.input_plan(DataBatch(x, y, start, size))) or []
        for plan_batch in plans:
            rows = runner.prepare(plan_batch.inputs)
            inputs = to_torch(rows)
            for part, fetched in runner.run(rows):
                batch = TensorBatch(fetched, inputs[part], None, start, plan=plan_batch, rows=part)
                isolation.call(analysis_id, estimator, "update", estimator.update, batch)
        plan.host.hook.after_batch(model=loaded.label, batch_index=batch_index, samples=size)
        progress.advance(size, f"{loaded.label} ({estimator.name})")
    return runner.provider, {"groups": len(runner.groups or []), "peak_fetched_bytes": runner.peak_fetched_bytes}


class CheckpointRun:
    """The analyses of one model checkpoint, as steps: passes over the data (which may run in a
    worker process), the ends of passes (in checkpoint order, after ``carry_over``), and the
    records."""

    def __init__(self, plan: RunPlan, checkpoint: Checkpoint, order: np.ndarray, example: np.ndarray,
                 estimators: list[tuple[str, Estimator]] | None = None):
        self.plan, self.order = plan, order
        self.loaded = plan.adapter.load(checkpoint, plan.spec, example)
        built, self.tensors = build_estimators(plan, self.loaded)
        self.estimators = estimators if estimators is not None else built
        self.passes = max(est.passes for _, est in self.estimators)
        self.isolation = Isolation(plan, self.loaded.label)
        self.provider, self.groups = "", []

    def carry_over(self, previous: dict[str, Estimator]) -> None:
        for analysis_id, estimator in self.estimators:
            if analysis_id in previous:
                estimator.carry_over(previous[analysis_id])

    def _active(self, pass_index: int) -> tuple[list, list]:
        planned = [(aid, est) for aid, est in self.estimators if est.reads_plan and est.passes == pass_index + 1
                   and aid not in self.isolation.failures]
        active = [(aid, est) for aid, est in self.estimators
                  if est.passes > pass_index and (aid, est) not in planned and aid not in self.isolation.failures]
        return active, planned

    def run_pass(self, pass_index: int, progress: Progress) -> None:
        """Feed pass *pass_index* of the data (or of the input plans) to the estimators that need it."""
        active, planned = self._active(pass_index)
        if active:
            self.provider, fetch = _feed_pass(self.plan, active, self.tensors, self.loaded, self.order, progress,
                                              self.isolation)
            self.groups.append(fetch)
        for analysis_id, estimator in planned:
            self.provider, fetch = _feed_plan(self.plan, analysis_id, estimator, self.loaded, self.tensors,
                                              self.order, progress, self.isolation)
            self.groups.append(fetch)

    def end_pass(self, pass_index: int) -> None:
        active, planned = self._active(pass_index)
        for analysis_id, estimator in active + planned:
            self.isolation.call(analysis_id, estimator, "end_pass", estimator.end_pass)

    def finish(self) -> tuple[list[dict], list[str], dict, list[dict]]:
        """(records, warnings, model details, failures) of this checkpoint."""
        loaded, isolation, estimators = self.loaded, self.isolation, self.estimators
        records, warnings = [], []
        by_id = {p.section.id: p for p in self.plan.analyses}
        for analysis_id, estimator in estimators:
            finished = isolation.call(analysis_id, estimator, "finalize", estimator.finalize) or []
            records += [{"analysis": analysis_id, "estimator": by_id[analysis_id].section.estimator,
                         "model": loaded.label, **record} for record in finished]
            if analysis_id not in isolation.failures:
                warnings += [f"{analysis_id} ({loaded.label}): {w}" for w in estimator.collect_warnings()]
        warnings += list(dict.fromkeys(isolation.warnings))
        for failure in isolation.failures.values():
            warnings.append(f"{failure['analysis']} ({loaded.label}): estimator '{failure['estimator']}' of plugin "
                            f"'{failure['plugin']}' failed in {failure['phase']}: {failure['error']}; "
                            "its results are missing, the other analyses completed")
        analysed = {name: info for _, est in estimators for name, info in est.tensors.items()}
        model_info = {
            "label": loaded.label, "source": loaded.source, "framework": loaded.framework,
            "sha256": hashlib.sha256(loaded.proto.SerializeToString()).hexdigest(), "provider": self.provider,
            **({"external_data": "memory-mapped into onnxruntime (the hash covers the graph and the data "
                                 "references)"} if loaded.external_dir else {}),
            "fetch_groups": [g["groups"] for g in self.groups], "passes": self.passes,
            "peak_fetched_bytes": max((g["peak_fetched_bytes"] for g in self.groups), default=0), **loaded.details,
            "tensors": [{k: v for k, v in info.to_dict().items() if k in ("name", "layer", "op_type", "shape", "layout")}
                        | {"analyses": [aid for aid, est in estimators if name in est.tensors]}
                        for name, info in sorted(analysed.items(), key=lambda item: item[1].order)]}
        return records, warnings, model_info, list(isolation.failures.values())


def analyse_checkpoint(plan: RunPlan, checkpoint: Checkpoint, order: np.ndarray, example: np.ndarray,
                       progress: Progress, previous: dict[str, Estimator]
                       ) -> tuple[list[dict], list[str], dict, list[dict]]:
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


def execute(plan: RunPlan, out_dir: Path | None, show_progress: bool = True, resume: bool = False) -> Results:
    """Run every analysis of *plan* on every checkpoint and write the requested outputs.

    With *out_dir*, each finished checkpoint of a multi-checkpoint run is saved so that an
    interrupted run continues with *resume* (see :mod:`layerscope.resume`).
    """
    spec = plan.spec
    started = time.perf_counter()
    order = sample_order(len(plan.data), spec.data.limit, spec.data.shuffle, spec.runtime.seed)
    example = plan.data.read(order[: min(2, len(order))])[0]
    checkpoints = plan.adapter.checkpoints(spec.model, spec)
    plan.host.hook.before_run(spec=spec, models=[c.label for c in checkpoints])
    passes = max(p.estimator_class.passes_for(p.params) for p in plan.analyses)
    records, warnings, models, failures = [], [], [], []
    previous: dict[str, Estimator] = {}
    store = ResumeStore(out_dir, spec_to_dict(spec), resume) if out_dir is not None and len(checkpoints) > 1 else None
    parallel = spec.runtime.workers > 1 and len(checkpoints) > 1 and not plan.host.extra_plugins
    if spec.runtime.workers > 1 and plan.host.extra_plugins:
        warnings.append("runtime.workers is ignored when plugin objects are passed from Python (workers load "
                        "installed plugins only); the checkpoints ran one after another")
    with Progress(len(order) * passes * len(checkpoints), enabled=show_progress) as progress:
        if parallel:
            from .parallel import analyse_in_parallel

            outcomes = analyse_in_parallel(plan, checkpoints, order, example, spec.runtime.workers, progress)
            for model_records, model_warnings, model_info, model_failures in outcomes:
                records, failures, warnings = records + model_records, failures + model_failures, warnings + model_warnings
                models.append(model_info)
        for index, checkpoint in enumerate(checkpoints if not parallel else []):
            saved = store.load(index, checkpoint.label) if store else None
            if saved is not None:
                model_records, model_warnings, model_info, model_failures = saved["outcome"]
                previous = saved["estimators"]
                progress.advance(len(order) * passes, f"{checkpoint.label} (resumed)")
            else:
                model_records, model_warnings, model_info, model_failures = analyse_checkpoint(
                    plan, checkpoint, order, example, progress, previous)
                if store:
                    store.save(index, checkpoint.label, {"estimators": previous, "outcome": (
                        model_records, model_warnings, model_info, model_failures)})
            records += model_records
            failures += model_failures
            warnings += model_warnings
            models.append(model_info)
    records = finite_records(records, warnings)
    import onnxruntime

    results = Results(
        layerscope=__version__,
        spec=spec_to_dict(spec),
        runtime={"provider": models[-1]["provider"], "device": spec.runtime.device,
                 "seconds": round(time.perf_counter() - started, 3), "samples": int(len(order)),
                 "seed": spec.runtime.seed, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
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


def write_outputs(results: Results, reporters, out_dir: Path) -> None:
    """Run every reporter; ``results.json`` (the json reporter) goes last so it lists all artifacts."""
    results.out_dir = out_dir
    ordered = sorted(reporters, key=lambda r: r.name == "json")
    for reporter in ordered:
        artifacts = reporter.write(results, out_dir)
        results.artifacts += [a for a in artifacts if a != RESULTS_FILE]


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
