"""The analyses of one model checkpoint: estimators fed pass by pass, then records.

:class:`CheckpointAnalyses` is what outlives a pass: the estimators, the failures, the
fetch statistics. :class:`CheckpointRun` adds the loaded checkpoint, which feeds a pass of
the data (or of a data shard) to the estimators. The local engine runs both in one
process; sharded engines (worker processes, Ray) feed shards in workers and keep the
merged :class:`CheckpointAnalyses` in the driver.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .data import iter_batches
from .errors import UserError
from .estimator import DataBatch, Estimator, TensorBatch
from .graph import describe_tensors
from .model import Checkpoint, LoadedModel
from .plan import RunPlan
from .progress import Progress
from .results import records_in_range
from .runner import Runner, to_torch
from .selectors import resolve

Span = tuple[int, int]
Outcome = tuple[list[dict], list[str], dict, list[dict]]  # a checkpoint's records, warnings, model details, failures


def build_estimators(plan: RunPlan, loaded: LoadedModel) -> tuple[list[tuple[str, Estimator]], list]:
    """Instantiate every analysis on the tensors its selector picks in *loaded* (a single-input model)."""
    initializers = {t.name for t in loaded.proto.graph.initializer}
    inputs = [i.name for i in loaded.proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{plan.where('model', 'source')}: model.source: the model has {len(inputs)} inputs "
                        f"({', '.join(inputs)}); layerscope currently analyses single-input models "
                        f"(model {loaded.label})")
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


def all_finite(values: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf. A sum is NaN or Inf whenever an element is, and costs one
    pass without a temporary; only a sum that is not finite (or overflowed) is checked element-wise."""
    if not values.is_floating_point():
        return True
    return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


def _feed_pass(plan: RunPlan, active: list[tuple[str, Estimator]], tensors, loaded: LoadedModel,
               order: np.ndarray, span: Span, progress: Progress, isolation: Isolation) -> tuple[str, dict]:
    """One pass over the batches of *span* for *active* estimators; returns (provider that ran, fetch statistics)."""
    spec = plan.spec
    atomic = list(dict.fromkeys(group for _, est in active for group in est.fetch_groups()))
    splittable = ({name for _, est in active if not est.per_batch for group in est.fetch_groups() for name in group}
                  - {name for _, est in active if est.per_batch for group in est.fetch_groups() for name in group})
    runner = Runner(loaded.proto, tensors, atomic, spec.runtime.device, spec.runtime.memory_budget,
                    spec.data.batch_size, splittable, loaded.external_dir)
    wanted = [{name for group in est.fetch_groups() for name in group} for _, est in active]
    nonfinite: set[str] = set()
    for batch_index, (start, x, y) in enumerate(iter_batches(plan.data, order, spec.data.batch_size, span=span,
                                                                         classes=plan.classes)):
        x = runner.prepare(x)
        inputs = to_torch(x)
        labels = torch.from_numpy(np.asarray(y)) if y is not None else None
        for (aid, estimator), names in zip(active, wanted):
            if not names:  # reads only the data this pass (e.g. to fit a basis)
                isolation.call(aid, estimator, "update", estimator.update, TensorBatch({}, inputs, labels, start))
        for part, fetched in runner.run(x):
            nonfinite.update(name for name, value in fetched.items() if not all_finite(value))
            for (aid, estimator), names in zip(active, wanted):
                mine = {name: value for name, value in fetched.items() if name in names}
                if mine:
                    batch = TensorBatch(mine, inputs[part], None if labels is None else labels[part],
                                        start + (part.start or 0))
                    isolation.call(aid, estimator, "update", estimator.update, batch)
                    del batch
                del mine
            del fetched  # released before the runner fetches the next group (one group's tensors at a time)
        plan.host.hook.after_batch(model=loaded.label, batch_index=batch_index, samples=len(x))
        progress.advance(len(x), f"{loaded.label}")
    for name in sorted(nonfinite):
        isolation.warnings.append(f"tensor '{name}' of {loaded.label} contains NaN or Inf values; estimates that read "
                                  "it may be meaningless")
    return runner.provider, {"groups": len(runner.groups or []), "peak_fetched_bytes": runner.peak_fetched_bytes}


def _feed_plan(plan: RunPlan, analysis_id: str, estimator: Estimator, loaded: LoadedModel, tensors,
               order: np.ndarray, span: Span, progress: Progress, isolation: Isolation) -> tuple[str, dict]:
    """The input-plan pass of one estimator over the batches of *span*, evaluated by the runner."""
    spec = plan.spec
    model = estimator.transform_model(loaded.proto)
    if model is not loaded.proto:
        tensors = describe_tensors(model, loaded.layer_of)
    groups = estimator.fetch_groups()
    splittable = set() if estimator.per_batch else {name for group in groups for name in group}
    runner = Runner(model, tensors, groups, spec.runtime.device, spec.runtime.memory_budget,
                    estimator.plan_rows(spec.data.batch_size), splittable, loaded.external_dir)
    batches = iter_batches(plan.data, order, spec.data.batch_size, estimator.lookahead, span, plan.classes)
    for batch_index, (start, x, y) in enumerate(batches):
        size = min(spec.data.batch_size, span[1] - start)
        plans = isolation.call(analysis_id, estimator, "input_plan", list,
                               estimator.input_plan(DataBatch(x, y, start, size))) or []
        for plan_batch in plans:
            rows = runner.prepare(plan_batch.inputs)
            inputs = to_torch(rows)
            for part, fetched in runner.run(rows):
                batch = TensorBatch(fetched, inputs[part], None, start, plan=plan_batch, rows=part)
                isolation.call(analysis_id, estimator, "update", estimator.update, batch)
                del batch, fetched  # released before the runner fetches the next rows
        plan.host.hook.after_batch(model=loaded.label, batch_index=batch_index, samples=size)
        progress.advance(size, f"{loaded.label} ({estimator.name})")
    return runner.provider, {"groups": len(runner.groups or []), "peak_fetched_bytes": runner.peak_fetched_bytes}


def describe_model(loaded: LoadedModel) -> dict:
    """The model details that ``results.json`` lists for a checkpoint (its hash included)."""
    return {"label": loaded.label, "source": loaded.source, "framework": loaded.framework,
            "sha256": hashlib.sha256(loaded.proto.SerializeToString()).hexdigest(),
            **({"external_data": "memory-mapped into onnxruntime (the hash covers the graph and the data "
                                 "references)"} if loaded.external_dir else {}),
            **loaded.details}


class CheckpointAnalyses:
    """The estimators of one checkpoint and what their passes recorded (failures, warnings,
    provider, fetch statistics): the state kept between passes, ended in checkpoint order."""

    def __init__(self, plan: RunPlan, label: str, estimators: list[tuple[str, Estimator]]):
        self.plan, self.label, self.estimators = plan, label, estimators
        self.passes = max(est.passes for _, est in estimators)
        self.isolation = Isolation(plan, label)
        self.provider, self.groups = "", []
        self.model_info: dict = {}

    def carry_over(self, previous: dict[str, Estimator]) -> None:
        for analysis_id, estimator in self.estimators:
            if analysis_id in previous:
                estimator.carry_over(previous[analysis_id])

    def active(self, pass_index: int) -> tuple[list, list]:
        """(estimators fed by the data pass, estimators evaluating their input plan) in pass *pass_index*."""
        planned = [(aid, est) for aid, est in self.estimators if est.reads_plan and est.passes == pass_index + 1
                   and aid not in self.isolation.failures]
        active = [(aid, est) for aid, est in self.estimators
                  if est.passes > pass_index and (aid, est) not in planned and aid not in self.isolation.failures]
        return active, planned

    def end_pass(self, pass_index: int) -> None:
        active, planned = self.active(pass_index)
        for analysis_id, estimator in active + planned:
            self.isolation.call(analysis_id, estimator, "end_pass", estimator.end_pass)

    def _named_class(self, record: dict) -> dict:
        """A record's ``class`` as the data names it (estimators see class codes; see layerscope.labels)."""
        return {"class": self.plan.classes.decode(record["class"])} if "class" in record and self.plan.classes else {}

    def finish(self) -> Outcome:
        """(records, warnings, model details, failures) of this checkpoint."""
        isolation, estimators = self.isolation, self.estimators
        records, warnings = [], []
        by_id = {p.section.id: p for p in self.plan.analyses}
        for analysis_id, estimator in estimators:
            finished = isolation.call(analysis_id, estimator, "finalize", estimator.finalize) or []
            finished = records_in_range(finished, estimator.value_range, warnings, f"{analysis_id} ({self.label})")
            records += [{"analysis": analysis_id, "estimator": by_id[analysis_id].section.estimator,
                         "model": self.label, **record, **self._named_class(record)} for record in finished]
            if analysis_id not in isolation.failures:
                warnings += [f"{analysis_id} ({self.label}): {w}" for w in estimator.collect_warnings()]
        warnings += list(dict.fromkeys(isolation.warnings))
        for failure in isolation.failures.values():
            warnings.append(f"{failure['analysis']} ({self.label}): estimator '{failure['estimator']}' of plugin "
                            f"'{failure['plugin']}' failed in {failure['phase']}: {failure['error']}; "
                            "its results are missing, the other analyses completed")
        analysed = {name: info for _, est in estimators for name, info in est.tensors.items()}
        model_info = {
            **self.model_info, "provider": self.provider,
            "fetch_groups": [g["groups"] for g in self.groups], "passes": self.passes,
            "peak_fetched_bytes": max((g["peak_fetched_bytes"] for g in self.groups), default=0),
            "tensors": [{k: v for k, v in info.to_dict().items() if k in ("name", "layer", "op_type", "shape", "layout")}
                        | {"analyses": [aid for aid, est in estimators if name in est.tensors]}
                        for name, info in sorted(analysed.items(), key=lambda item: item[1].order)]}
        return records, warnings, model_info, list(isolation.failures.values())


class CheckpointRun(CheckpointAnalyses):
    """A loaded checkpoint with its analyses (fresh, or *estimators* handed over from a
    previous pass), able to feed a pass of the data to them."""

    def __init__(self, plan: RunPlan, checkpoint: Checkpoint, order: np.ndarray, example: np.ndarray,
                 estimators: list[tuple[str, Estimator]] | None = None):
        self.loaded = plan.adapter.load(checkpoint, plan.spec, example)
        built, self.tensors = build_estimators(plan, self.loaded)
        super().__init__(plan, self.loaded.label, estimators if estimators is not None else built)
        self.order = order

    def run_pass(self, pass_index: int, progress: Progress, span: Span | None = None) -> None:
        """Feed pass *pass_index* of the data (or of the input plans) to the estimators that need it,
        over the batches of *span* (a data shard) or of the whole stream."""
        span = span or (0, len(self.order))
        active, planned = self.active(pass_index)
        if active:
            self.provider, fetch = _feed_pass(self.plan, active, self.tensors, self.loaded, self.order, span,
                                              progress, self.isolation)
            self.groups.append(fetch)
        for analysis_id, estimator in planned:
            self.provider, fetch = _feed_plan(self.plan, analysis_id, estimator, self.loaded, self.tensors,
                                              self.order, span, progress, self.isolation)
            self.groups.append(fetch)

    def finish(self) -> Outcome:
        self.model_info = describe_model(self.loaded)
        return super().finish()
