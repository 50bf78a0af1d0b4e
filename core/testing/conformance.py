"""The conformance suite every estimator must pass, run by the engine's own driver.

Estimators are fed prepared batches through :func:`layerscope.engine.lifecycle.drive`, the driver
every engine uses, so the kit checks what a run really does: every pass of every shard,
shards merged in shard order, ``end_pass`` on the merged state, ``carry_over`` from the
previous checkpoint, tasks shipped to workers as pickles.

- streaming equals one shot: feeding batches one by one gives the records of feeding the
  whole data at once (for ``per_batch`` estimators, whose method is defined per batch, and
  for input-plan estimators, whose batches are plan batches, shard-wise instead);
- merge order does not matter: shards merged in any order or tree shape agree (a parallel run
  merges runs of adjacent shards as they arrive);
- the schedule does not matter: two checkpoints analysed one after the other in one
  process, or side by side in shards by workers, give the same records (``carry_over``
  sees the previous checkpoint after its first pass at least);
- the state survives a pickle round-trip;
- ``finalize`` is pure and idempotent;
- saturation holds: leaving out the batches from which the estimator says it is
  :meth:`~layerscope.engine.estimator.Estimator.saturated` gives the records of feeding them all.

Multi-pass estimators see the same batches in every pass. After every pass the driver
merges the shards and calls ``end_pass`` once on the merged estimator, and every shard of
the next pass continues from a copy of it. So ``end_pass`` must turn the pass's statistics
into what the next pass needs and reset sums that would otherwise be counted once per
shard (min/max state may simply stay).
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from layerscope.engine.estimator import Estimator, PlanEstimator, TensorBatch
from layerscope.engine.lifecycle import (
    Isolation,
    SequentialExecutor,
    ShardOutcome,
    ShardTask,
    TaskQueue,
    copied,
    drive,
)

Factory = Callable[[], Estimator]
ANALYSIS = "estimator"  # the analysis id the kit gives the estimator under test


class _BatchFeeder:
    """Runs a task of the kit: feeds the task's shard of prepared batches to its estimator (a fresh
    one from *make* in the first pass)."""

    def __init__(self, make: Factory, shards: Sequence[Sequence[TensorBatch]]):
        self.make, self.shards = make, shards

    def run(self, task: ShardTask) -> ShardOutcome:
        estimators = task.estimators if task.estimators is not None else [(ANALYSIS, self.make())]
        for _, estimator in estimators:
            for batch in self.shards[task.shard]:
                estimator.update(batch)
        return ShardOutcome(f"checkpoint {task.checkpoint}", estimators)


class _WorkerExecutor:
    """Runs the kit's tasks side by side as worker processes would: every ready task at once, each on a
    pickled copy, the outcomes handed back last shard first (so the driver merges runs of shards in a
    tree: shard 1 with shard 2 before shard 0 with both)."""

    parallel = True

    def __init__(self, feeder: _BatchFeeder):
        self.feeder, self.shards = feeder, len(feeder.shards)

    def run(self, queue: TaskQueue) -> Iterator[tuple[ShardTask, ShardOutcome]]:
        while queue:
            started = [queue.pop() for _ in range(len(queue))]
            outcomes = [
                pickle.loads(pickle.dumps(self.feeder.run(pickle.loads(pickle.dumps(copied(t)))))) for t in started
            ]
            yield from reversed(list(zip(started, outcomes)))


def _drive(
    make: Factory, shards: Sequence[Sequence[TensorBatch]], checkpoints: int = 1, in_workers: bool = False
) -> list[Estimator]:
    """The estimator of every checkpoint after the driver ran all its passes over *shards*."""
    feeder = _BatchFeeder(make, shards)
    executor = _WorkerExecutor(feeder) if in_workers else SequentialExecutor(feeder.run, len(shards))
    ended: dict[int, Estimator] = {}
    drive(
        checkpoints,
        executor,
        lambda label: Isolation(label, strict=True),
        finished=lambda index, state: ended.update({index: dict(state.estimators)[ANALYSIS]}),
    )
    return [ended[index] for index in range(checkpoints)]


def feed(estimator: Estimator, batches: Sequence[TensorBatch]) -> Estimator:
    """Run every pass of *estimator* over *batches* (as a run in one process does) and return it."""
    (fed,) = _drive(lambda: estimator, [batches])
    return fed


def run_sharded(
    make: Factory, shards: Sequence[Sequence[TensorBatch]], order: Iterable[int] | None = None
) -> Estimator:
    """Feed each shard to its own estimator, pass by pass, and merge them in *order* (shard order
    by default), as the driver does with the tasks of a sharded run."""
    order = list(order) if order is not None else list(range(len(shards)))
    (merged,) = _drive(make, [shards[index] for index in order], in_workers=True)
    return merged


def _record_key(record: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in record.items() if k != "value"))


def assert_records_close(actual: list[dict], expected: list[dict], rtol: float = 1e-9, atol: float = 1e-9) -> None:
    """Same records (any order); numeric values equal within tolerances."""
    left = {_record_key(r): r["value"] for r in actual}
    right = {_record_key(r): r["value"] for r in expected}
    assert len(left) == len(actual) and len(right) == len(expected), "records are not uniquely keyed"
    assert left.keys() == right.keys(), f"different records: {sorted(left.keys() ^ right.keys())[:3]}"
    for key, value in left.items():
        assert math.isclose(value, right[key], rel_tol=rtol, abs_tol=atol), f"{dict(key)}: {value} != {right[key]}"


def concatenate(batches: Sequence[TensorBatch]) -> TensorBatch:
    """All batches as one."""
    labels = [b.labels for b in batches if b.labels is not None]
    return TensorBatch(
        tensors={name: torch.cat([b.tensors[name] for b in batches]) for name in batches[0].tensors},
        inputs=torch.cat([b.inputs for b in batches]),
        labels=torch.cat(labels) if len(labels) == len(batches) else None,
        start=0,
    )


def _whole_batches(estimator: Estimator) -> bool:
    """True when batches are the method's units: per-batch methods and input plans (rows of a data batch)."""
    return estimator.tags.per_batch or isinstance(estimator, PlanEstimator)


def check_streaming_equals_one_shot(make: Factory, batches: Sequence[TensorBatch], **tolerance) -> None:
    streamed = feed(make(), batches).finalize()
    if _whole_batches(make()):  # batches are the method's units: compare shards instead
        assert_records_close(run_sharded(make, [batches[:1], batches[1:]]).finalize(), streamed, **tolerance)
        return
    assert_records_close(feed(make(), [concatenate(batches)]).finalize(), streamed, **tolerance)


def check_merge_order(make: Factory, batches: Sequence[TensorBatch], **tolerance) -> None:
    shards = [batches[i::3] for i in range(3)]
    shards = [s for s in shards if s]
    reference = run_sharded(make, shards).finalize()
    assert_records_close(
        run_sharded(make, shards, order=reversed(range(len(shards)))).finalize(), reference, **tolerance
    )
    uneven = [batches[:1], batches[1:]] if len(batches) > 1 else [batches]
    assert_records_close(
        run_sharded(make, uneven, order=reversed(range(len(uneven)))).finalize(),
        feed(make(), batches).finalize(),
        **tolerance,
    )


def check_schedule_independence(make: Factory, batches: Sequence[TensorBatch], **tolerance) -> None:
    """Two checkpoints: one after the other in one process, or side by side in three shards run as
    workers run them; the second checkpoint's records (which ``carry_over`` may shape) agree."""
    one_by_one = _drive(make, [batches], checkpoints=2)[1].finalize()
    shards = [batches[i::3] for i in range(3)]
    if _whole_batches(make()):  # batches are the method's units: keep them whole and in order
        shards = [batches[:1], batches[1:2], batches[2:]]
    side_by_side = _drive(make, [s for s in shards if s], checkpoints=2, in_workers=True)[1].finalize()
    assert_records_close(side_by_side, one_by_one, **tolerance)


def check_pickle_roundtrip(make: Factory, batches: Sequence[TensorBatch], **tolerance) -> None:
    estimator = feed(make(), batches)
    restored = pickle.loads(pickle.dumps(estimator))
    assert_records_close(restored.finalize(), estimator.finalize(), **tolerance)


def check_finalize_idempotent(make: Factory, batches: Sequence[TensorBatch], **tolerance) -> None:
    estimator = feed(make(), batches)
    before = pickle.dumps(estimator.state_dict())
    first = estimator.finalize()
    assert_records_close(estimator.finalize(), first, **tolerance)
    assert pickle.dumps(estimator.state_dict()) == before, "finalize() changed the estimator's state"
    assert first, "finalize() returned no records"


def check_saturation(make: Factory, batches: Sequence[TensorBatch], **tolerance) -> None:
    """Batches from a position at which the estimator is saturated change nothing: feeding only the
    batches before it gives the records of feeding them all."""
    estimator = make()
    kept = [batch for batch in batches if not estimator.saturated(batch.start)]
    assert kept, "saturated from the first batch on: nothing would ever be fed"
    assert_records_close(feed(make(), kept).finalize(), feed(make(), batches).finalize(), **tolerance)


def check_conformance(make: Factory, batches: Sequence[TensorBatch], rtol: float = 1e-9, atol: float = 1e-9) -> None:
    """Run every conformance check on estimators built by *make* over *batches* (≥ 3 batches)."""
    assert len(batches) >= 3, "conformance needs at least three batches"
    for check in (
        check_streaming_equals_one_shot,
        check_merge_order,
        check_schedule_independence,
        check_pickle_roundtrip,
        check_finalize_idempotent,
        check_saturation,
    ):
        check(make, batches, rtol=rtol, atol=atol)
