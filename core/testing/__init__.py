"""``layerscope.testing``: the conformance suite and samplers for estimator authors.

Any estimator, built-in or third-party, should pass :func:`check_conformance`::

    from layerscope.testing import check_conformance, make_batches
    batches = make_batches({"t": array}, labels=y, batch_size=32)
    check_conformance(lambda: MyEstimator(MyEstimator.Params(), tensor_infos(batches)), batches)

Names are imported on first use, as layerscope's own are: the pytest plugin that installing layerscope
registers loads this package in every pytest run, which should not cost a torch import.
"""

from typing import TYPE_CHECKING

from layerscope.util.lazy import lazy_exports

_MODULES = {
    "conformance": (
        "assert_records_close",
        "check_conformance",
        "check_finalize_idempotent",
        "check_merge_order",
        "check_pickle_roundtrip",
        "check_saturation",
        "check_schedule_independence",
        "check_streaming_equals_one_shot",
        "feed",
        "run_sharded",
    ),
    "samplers": ("exact_on_pattern", "make_batches", "plan_batches", "tensor_infos"),
}
__getattr__, __all__ = lazy_exports(__name__, _MODULES)

if TYPE_CHECKING:
    from .conformance import assert_records_close as assert_records_close
    from .conformance import check_conformance as check_conformance
    from .conformance import check_finalize_idempotent as check_finalize_idempotent
    from .conformance import check_merge_order as check_merge_order
    from .conformance import check_pickle_roundtrip as check_pickle_roundtrip
    from .conformance import check_saturation as check_saturation
    from .conformance import check_schedule_independence as check_schedule_independence
    from .conformance import check_streaming_equals_one_shot as check_streaming_equals_one_shot
    from .conformance import feed as feed
    from .conformance import run_sharded as run_sharded
    from .samplers import exact_on_pattern as exact_on_pattern
    from .samplers import make_batches as make_batches
    from .samplers import plan_batches as plan_batches
    from .samplers import tensor_infos as tensor_infos


def __dir__() -> list[str]:
    return __all__
