"""The conformance suite every estimator must pass.

- streaming equals one shot: feeding batches one by one gives the records of feeding the
  whole data at once (for ``per_batch`` estimators, whose method is defined per batch, and
  for input-plan estimators, whose batches are plan batches, shard-wise instead);
- merge order does not matter: shards merged in any order or tree shape agree;
- the state survives a pickle round-trip;
- ``finalize`` is pure and idempotent.

Multi-pass estimators are run as the engine runs them on shards: after every pass but
the last, the shards are merged, ``end_pass`` runs on the merged estimator, and every
shard continues from a copy of it. So ``end_pass`` must turn the pass's statistics into
what the next pass needs and reset sums that would otherwise be counted once per shard
(min/max state may simply stay).
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable, Sequence

import torch

from ..estimator import Estimator, TensorBatch

Factory = Callable[[], Estimator]


def feed(estimator: Estimator, batches: Sequence[TensorBatch]) -> Estimator:
    """Run every pass of *estimator* over *batches*."""
    for _ in range(estimator.passes):
        for batch in batches:
            estimator.update(batch)
        estimator.end_pass()
    return estimator


def _merge_all(estimators: Sequence[Estimator]) -> Estimator:
    merged = copy.deepcopy(estimators[0])
    for other in estimators[1:]:
        merged.merge(other)
    return merged


def run_sharded(make: Factory, shards: Sequence[Sequence[TensorBatch]],
                order: Sequence[int] | None = None) -> Estimator:
    """Feed each shard to its own estimator, pass by pass, and merge them in *order*."""
    estimators = [make() for _ in shards]
    passes = estimators[0].passes
    for pass_index in range(passes):
        for estimator, shard in zip(estimators, shards):
            for batch in shard:
                estimator.update(batch)
        if pass_index < passes - 1:
            merged = _merge_all(estimators)
            merged.end_pass()
            estimators = [copy.deepcopy(merged) for _ in shards]
        else:
            for estimator in estimators:
                estimator.end_pass()
    order = list(order) if order is not None else list(range(len(shards)))
    return _merge_all([estimators[i] for i in order])


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
    labels = None if batches[0].labels is None else torch.cat([b.labels for b in batches])
    return TensorBatch(tensors={name: torch.cat([b.tensors[name] for b in batches]) for name in batches[0].tensors},
                       inputs=torch.cat([b.inputs for b in batches]), labels=labels, start=0)


def check_streaming_equals_one_shot(make: Factory, batches: Sequence[TensorBatch], **tolerance) -> None:
    streamed = feed(make(), batches).finalize()
    if make().per_batch or make().reads_plan:  # batches are the method's units: compare shards instead
        assert_records_close(run_sharded(make, [batches[:1], batches[1:]]).finalize(), streamed, **tolerance)
        return
    assert_records_close(feed(make(), [concatenate(batches)]).finalize(), streamed, **tolerance)


def check_merge_order(make: Factory, batches: Sequence[TensorBatch], **tolerance) -> None:
    shards = [batches[i::3] for i in range(3)]
    shards = [s for s in shards if s]
    reference = run_sharded(make, shards).finalize()
    assert_records_close(run_sharded(make, shards, order=reversed(range(len(shards)))).finalize(), reference, **tolerance)
    uneven = [batches[:1], batches[1:]] if len(batches) > 1 else [batches]
    assert_records_close(run_sharded(make, uneven, order=reversed(range(len(uneven)))).finalize(),
                         feed(make(), batches).finalize(), **tolerance)


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


def check_conformance(make: Factory, batches: Sequence[TensorBatch], rtol: float = 1e-9, atol: float = 1e-9) -> None:
    """Run every conformance check on estimators built by *make* over *batches* (≥ 3 batches)."""
    assert len(batches) >= 3, "conformance needs at least three batches"
    for check in (check_streaming_equals_one_shot, check_merge_order, check_pickle_roundtrip, check_finalize_idempotent):
        check(make, batches, rtol=rtol, atol=atol)
