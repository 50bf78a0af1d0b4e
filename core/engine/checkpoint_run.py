"""Feeding a checkpoint's estimators: the shard tasks of the engines (:mod:`layerscope.engine.lifecycle`).

:class:`ShardWorker` runs a :class:`~layerscope.engine.lifecycle.ShardTask` of a run: it loads the
checkpoint (keeping the last one loaded, so the passes of a checkpoint load it once),
builds the analyses' estimators on the tensors their selectors pick (or takes the merged
ones the task carries) and feeds them one pass over the task's data shard: the plain data
stream through the runner, or an estimator's own input plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from layerscope.data.source import Samples, iter_batches
from layerscope.graph.selectors import as_selector, resolve
from layerscope.graph.session import check_runnable
from layerscope.graph.tensors import TensorInfo, describe_tensors, structure_fingerprint
from layerscope.graph.tokens import token_axes_by_tensor
from layerscope.graph.weights import external_bytes
from layerscope.model.adapter import Checkpoint, LoadedModel
from layerscope.util.errors import UserError
from layerscope.util.memory import ensure_room_for_weights

from .estimator import DataBatch, PlanBatch, PlanEstimator, TensorBatch
from .feeds import ModelFeeds
from .lifecycle import Estimators, Isolation, ShardOutcome, ShardTask, analyses_in_pass
from .plan import RunPlan
from .progress import Progress
from .reused_sessions import ReusedSessions
from .runner import Runner, to_torch

Span = tuple[int, int]


@dataclass
class CheckpointModel:
    """A checkpoint loaded for a run: the graph (weights apart), its tensors (constant inputs unobservable),
    the sha256 of its graph and weights, and how batches feed it."""

    loaded: LoadedModel
    tensors: list[TensorInfo]
    sha256: str
    feeds: ModelFeeds


def build_estimators(plan: RunPlan, model: CheckpointModel) -> Estimators:
    """Instantiate every analysis on the tensors its selector picks among the tensors of *model*."""
    loaded, tensors = model.loaded, model.tensors
    axes = token_axes_by_tensor(tensors, model.feeds.token_mask)
    built = []
    for planned in plan.analyses:
        selector = planned.section.on or as_selector(planned.estimator_class.default_selector)
        try:
            chosen = resolve(selector, tensors, strict=planned.section.on is not None)
        except UserError as error:
            path = ("analyses", planned.index, "on") if planned.section.on else ("analyses", planned.index, "estimator")
            raise UserError(f"{plan.where(*path)}: {error} (model {loaded.label})") from None
        estimator = planned.estimator_class(planned.params, chosen)
        estimator.token_axes = axes
        try:
            estimator.bind_graph(tensors, loaded)
        except UserError as error:
            raise UserError(f"{plan.where('analyses', planned.index, 'on')}: {error} (model {loaded.label})") from None
        built.append((planned.section.id, estimator))
    return built


def all_finite(values: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf. A sum is NaN or Inf whenever an element is, and costs one
    pass without a temporary; only a sum that is not finite (or overflowed) is checked element-wise."""
    if not values.is_floating_point():
        return True
    return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


def splittable(estimators) -> set[str]:
    """The tensors the runner may fetch in micro-batches (parts of a batch): those that no estimator tagged
    ``per_batch`` reads, since a per-batch method must see each batch whole."""

    def read_by(chosen) -> set[str]:
        return {name for est in chosen for group in est.fetch_groups() for name in group}

    return read_by([e for e in estimators if not e.tags.per_batch]) - read_by(
        [e for e in estimators if e.tags.per_batch]
    )


class FedBatch:
    """A prepared batch as estimators see it: the feeds as torch tensors, labels and token mask, cut to
    the rows of a fetch."""

    def __init__(self, model: CheckpointModel, samples: Samples, labels: np.ndarray | None, source: str):
        feeds = model.feeds.prepare(samples, source)
        self.arrays = feeds
        self.feeds = {name: to_torch(array) for name, array in feeds.items()}
        self.primary = self.feeds[model.feeds.primary.name]
        mask = model.feeds.mask(feeds)
        self.mask = torch.from_numpy(mask) if mask is not None else None
        self.labels = torch.from_numpy(np.asarray(labels)) if labels is not None else None
        self.size = len(self.primary)

    def batch(self, tensors: dict, start: int, rows: slice = slice(None), plan: PlanBatch | None = None) -> TensorBatch:
        """A :class:`TensorBatch` of *tensors* for *rows* of this batch; *start* is the first sample of the
        data batch. A data batch's rows start at ``start + rows.start``; the rows of an input plan's batch
        (*plan*) are recorded with it and keep *start*."""
        return TensorBatch(
            tensors,
            self.primary[rows],
            None if self.labels is None else self.labels[rows],
            start if plan is not None else start + (rows.start or 0),
            plan=plan,
            rows=rows if plan is not None else None,
            feeds={n: v[rows] for n, v in self.feeds.items()},
            token_mask=None if self.mask is None else self.mask[rows],
        )


def _feed_pass(
    plan: RunPlan,
    active: Estimators,
    model: CheckpointModel,
    order: np.ndarray,
    span: Span,
    progress: Progress,
    isolation: Isolation,
    reuse: ReusedSessions | None = None,
) -> tuple[str, dict]:
    """One pass over the batches of *span* for *active* estimators; returns (provider that ran, fetch statistics)."""
    spec, loaded = plan.spec, model.loaded
    atomic = list(dict.fromkeys(group for _, est in active for group in est.fetch_groups()))
    runner = Runner(
        loaded.proto,
        model.tensors,
        atomic,
        spec.runtime.device,
        spec.runtime.memory_budget,
        spec.data.batch_size,
        splittable([est for _, est in active]),
        loaded.weights,
        model.feeds,
        reuse,
    )
    wanted = [{name for group in est.fetch_groups() for name in group} for _, est in active]
    nonfinite: set[str] = set()
    read = _unsaturated_span(active, span, spec.data.batch_size)
    for batch_index, (start, x, y) in enumerate(
        iter_batches(plan.data, order, spec.data.batch_size, span=read, classes=plan.classes)
    ):
        fed = FedBatch(model, x, y, plan.data.describe())
        feeding = [not estimator.saturated(start) for _, estimator in active]
        for (aid, estimator), names, feeds in zip(active, wanted, feeding):
            if feeds and not names:  # reads only the data this pass (e.g. to fit a basis)
                isolation.call(aid, estimator, "update", estimator.update, fed.batch({}, start))
        for part, fetched in runner.run(fed.arrays):
            nonfinite.update(name for name, value in fetched.items() if not all_finite(value))
            for (aid, estimator), names, feeds in zip(active, wanted, feeding):
                mine = {name: value for name, value in fetched.items() if name in names} if feeds else {}
                if mine:
                    batch = fed.batch(mine, start, part)
                    isolation.call(aid, estimator, "update", estimator.update, batch)
                    del batch
                del mine
            del fetched  # released before the runner fetches the next group (one group's tensors at a time)
        plan.host.hook.after_batch(model=loaded.label, batch_index=batch_index, samples=fed.size)
        progress.advance(fed.size, f"{loaded.label}")
    if read[1] < span[1]:  # the samples no estimator of the pass needed
        progress.advance(span[1] - read[1], f"{loaded.label}")
    isolation.warnings.extend(runner.warnings)
    for name in sorted(nonfinite):
        isolation.warnings.append(
            f"tensor '{name}' of {loaded.label} contains NaN or Inf values; estimates that read it may be meaningless"
        )
    return runner.provider, {"groups": len(runner.groups or []), "peak_fetched_bytes": runner.peak_fetched_bytes}


def _unsaturated_span(active: Estimators, span: Span, batch_size: int) -> Span:
    """*span* cut before its first batch from which every estimator of the pass is saturated
    (:meth:`Estimator.saturated`): the data after it is neither read nor run through the model."""
    first, stop = span
    for start in range(first, stop, batch_size):
        if all(estimator.saturated(start) for _, estimator in active):
            return first, start
    return span


def _feed_plan(
    plan: RunPlan,
    analysis_id: str,
    estimator: PlanEstimator,
    model: CheckpointModel,
    order: np.ndarray,
    span: Span,
    progress: Progress,
    isolation: Isolation,
    reuse: ReusedSessions | None = None,
) -> tuple[str, dict]:
    """The input-plan pass of one estimator over the batches of *span*, evaluated by the runner."""
    spec, loaded, tensors = plan.spec, model.loaded, model.tensors
    proto = estimator.transform_model(loaded.proto)
    if proto is not loaded.proto:  # new inputs (e.g. principal components in front of the model)
        described = describe_tensors(proto, loaded.layer_of)
        model = CheckpointModel(loaded, described, model.sha256, ModelFeeds.for_model(described, model.feeds.constants))
        tensors = model.feeds.mark_constants(described)
    runner = Runner(
        proto,
        tensors,
        estimator.fetch_groups(),
        spec.runtime.device,
        spec.runtime.memory_budget,
        estimator.plan_rows(spec.data.batch_size),
        splittable([estimator]),
        loaded.weights,
        model.feeds,
        reuse,
    )
    batches = iter_batches(plan.data, order, spec.data.batch_size, estimator.lookahead, span, plan.classes)
    for batch_index, (start, x, y) in enumerate(batches):
        size = min(spec.data.batch_size, span[1] - start)
        plans = (
            isolation.call(
                analysis_id, estimator, "input_plan", list, estimator.input_plan(DataBatch(x, y, start, size))
            )
            or []
        )
        for plan_batch in plans:
            fed = FedBatch(model, plan_batch.inputs, None, f"{estimator.name} input plan")
            for part, fetched in runner.run(fed.arrays):
                batch = fed.batch(fetched, start, part, plan=plan_batch)
                isolation.call(analysis_id, estimator, "update", estimator.update, batch)
                del batch, fetched  # released before the runner fetches the next rows
        plan.host.hook.after_batch(model=loaded.label, batch_index=batch_index, samples=size)
        progress.advance(size, f"{loaded.label} ({estimator.name})")
    return runner.provider, {"groups": len(runner.groups or []), "peak_fetched_bytes": runner.peak_fetched_bytes}


def describe_model(model: CheckpointModel) -> dict:
    """The model details that ``results.json`` lists for a checkpoint: provenance, the sha256 of its graph
    and weights, its data inputs and token mask, and the bytes of weights left in the model's files."""
    loaded, feeds = model.loaded, model.feeds
    return {
        "label": loaded.label,
        "source": loaded.source,
        "framework": loaded.framework,
        "sha256": model.sha256,
        "inputs": [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape) if t.shape is not None else None}
            for t in feeds.inputs
        ],
        **({"constants": sorted(feeds.constants)} if feeds.constants else {}),
        **({"token_mask": feeds.token_mask} if feeds.token_mask else {}),
        **({"weights_apart_bytes": apart} if (apart := external_bytes(loaded.proto)) else {}),
        **loaded.details,
    }


class ShardWorker:
    """Runs the shard tasks of one run: *checkpoints* in training order, the data cut into *spans*
    of the sample *order*; *example* is what adapters trace a model with."""

    def __init__(
        self,
        plan: RunPlan,
        checkpoints: list[Checkpoint],
        spans: list[Span],
        order: np.ndarray,
        example: Samples,
        progress: Progress | None = None,
        live: bool = False,
        described: dict[str, list[TensorInfo]] | None = None,
        reuse: ReusedSessions | None = None,
    ):
        self.plan, self.checkpoints, self.spans, self.order, self.example = plan, checkpoints, spans, order, example
        #: The checkpoints' refs are live model objects (a monitor's), loaded with the adapter's ``follow``.
        self.live = live
        #: Tensors described per graph structure (:func:`structure_fingerprint`), kept by a caller that loads
        #: one model with new weights again and again (a monitor): shape inference runs once.
        self.described = described
        #: Sessions kept across the calls of such a caller, their weights refilled (:mod:`.reused_sessions`).
        self.reuse = reuse
        #: Advanced batch by batch (the in-process engine's live bar); off in workers, whose tasks the
        #: driver counts as they return.
        self.progress = progress or Progress(0, enabled=False)
        self._loaded: tuple[int, CheckpointModel] | None = None  # the last checkpoint loaded

    def _described(self, loaded) -> list[TensorInfo]:
        """The tensors of *loaded*'s graph (:func:`describe_tensors`), reused for a graph of the same structure."""
        if self.described is None:
            return describe_tensors(loaded.proto, loaded.layer_of)
        key = structure_fingerprint(loaded.proto)
        if key not in self.described:
            self.described[key] = describe_tensors(loaded.proto, loaded.layer_of)
        return self.described[key]

    def _where_source(self, checkpoint: Checkpoint) -> str:
        """The spec's place of *checkpoint*'s model source (``model.source``, or ``models.<i>.source``)."""
        if checkpoint.network is None:
            return self.plan.where("model", "source")
        index = next(i for i, n in enumerate(self.plan.networks) if n.label == checkpoint.network)
        return self.plan.where("models", index, "source")

    def load(self, index: int) -> CheckpointModel:
        """Checkpoint *index* loaded (the previous task's when it was the same checkpoint), its inputs
        checked against the data's first samples. Its weights are set apart first (the adapters that read a
        file leave them there): the tensors are described and the hash taken on the graph alone, the
        weights hashed where they lie."""
        if self._loaded is None or self._loaded[0] != index:
            self._loaded = None  # the previous model is released before the next one loads
            data = self.plan.spec.data
            checkpoint = self.checkpoints[index]
            adapter = self.plan.adapter_of(checkpoint)
            loaded = (
                adapter.follow(checkpoint.ref, checkpoint.label, self.plan.spec, self.example)
                if self.live
                else adapter.load(checkpoint, self.plan.spec, self.example)
            )
            loaded = loaded.weight_free()
            try:
                check_runnable(loaded.proto)
            except UserError as error:
                raise UserError(f"{self._where_source(checkpoint)}: {error} (model {loaded.label})") from None
            ensure_room_for_weights(external_bytes(loaded.proto), loaded.label)
            tensors = self._described(loaded)
            try:
                feeds = ModelFeeds.for_model(tensors, data.constants, data.token_mask)
            except UserError as error:
                raise UserError(f"{self.plan.doc.where(('data',))}: {error} (model {loaded.label})") from None
            feeds.prepare(self.example, self.plan.data.describe())  # the data fits the inputs, before any selector
            self._loaded = (
                index,
                CheckpointModel(loaded, feeds.mark_constants(tensors), loaded.weights.fingerprint(loaded.proto), feeds),
            )
        return self._loaded[1]

    def run(self, task: ShardTask) -> ShardOutcome:
        """Feed pass ``task.pass_index`` of shard ``task.shard`` to the task's estimators (fresh ones
        when it carries none); a user error comes back as the outcome's ``error``."""
        label = self.checkpoints[task.checkpoint].label
        try:
            model = self.load(task.checkpoint)
            estimators = task.estimators
            if estimators is None:  # the first pass: fresh estimators
                estimators = build_estimators(self.plan, model)
            isolation = Isolation(model.loaded.label, self.plan.host.origin_of)
            isolation.failures.update(task.failures)
            span = self.spans[task.shard]
            fed, planned = analyses_in_pass(estimators, task.pass_index, isolation.failures)
            provider, fetches, progress = "", [], self.progress
            if fed:
                provider, fetch = _feed_pass(self.plan, fed, model, self.order, span, progress, isolation, self.reuse)
                fetches.append(fetch)
            for analysis_id, estimator in planned:  # the whole input-plan pass is the analysis's time
                started, before = time.perf_counter(), isolation.seconds.get(analysis_id, 0.0)
                provider, fetch = _feed_plan(
                    self.plan, analysis_id, estimator, model, self.order, span, progress, isolation, self.reuse
                )
                isolation.seconds[analysis_id] = before + time.perf_counter() - started
                fetches.append(fetch)
        except UserError as error:
            return ShardOutcome(label, error=str(error))
        return ShardOutcome(
            label,
            estimators,
            isolation.failures,
            isolation.warnings,
            provider,
            fetches,
            describe_model(model) if task.describe else None,
            samples=span[1] - span[0],
            seconds=isolation.seconds,
        )
