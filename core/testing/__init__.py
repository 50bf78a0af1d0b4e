"""``layerscope.testing``: the conformance suite and samplers for estimator authors.

Any estimator, built-in or third-party, should pass :func:`check_conformance`::

    from layerscope.testing import check_conformance, make_batches
    batches = make_batches({"t": array}, labels=y, batch_size=32)
    check_conformance(lambda: MyEstimator(MyEstimator.Params(), tensor_infos(batches)), batches)
"""

from .conformance import (
    assert_records_close,
    check_conformance,
    check_finalize_idempotent,
    check_merge_order,
    check_pickle_roundtrip,
    check_saturation,
    check_schedule_independence,
    check_streaming_equals_one_shot,
    feed,
    run_sharded,
)
from .samplers import exact_on_pattern, make_batches, plan_batches, tensor_infos

__all__ = [
    "assert_records_close",
    "check_conformance",
    "check_finalize_idempotent",
    "check_merge_order",
    "check_pickle_roundtrip",
    "check_saturation",
    "check_schedule_independence",
    "check_streaming_equals_one_shot",
    "exact_on_pattern",
    "feed",
    "make_batches",
    "plan_batches",
    "run_sharded",
    "tensor_infos",
]
