"""The Estimator base class: declarations checked when they are made, not when shards first merge."""

from __future__ import annotations

import operator
import re

import numpy as np
import pytest

from layerscope import Estimator, EstimatorTags, PlanEstimator
from layerscope.testing import check_conformance, make_batches, tensor_infos


class Summing(Estimator):
    """Sums a tensor's values with the reduction given to the class."""

    name = "summing"
    reduction: object = "sum"
    default: object = 0.0

    def setup(self) -> None:
        self.add_state("total", self.default, self.reduction)

    def update(self, batch) -> None:
        for values in batch.tensors.values():
            self.accumulate("total", float(values.sum()))

    def finalize(self) -> list[dict]:
        return [self.record(name, "total", self.total) for name in self.tensors]


@pytest.mark.parametrize("reduction, hint", [("summ", "Did you mean 'sum'?"), ("mean", ""), ("", "")])
def test_an_unknown_reduction_is_an_error_when_declared(reduction, hint):
    class Misspelt(Summing):
        pass

    Misspelt.reduction = reduction
    with pytest.raises(ValueError, match=r"Misspelt.add_state\('total'\): unknown reduction") as raised:
        Misspelt()
    assert str(raised.value).endswith(hint or "function of two values.")


def test_declarations_that_cannot_merge_are_errors():
    class Concatenated(Summing):
        reduction, default = "cat", 0

    with pytest.raises(ValueError, match="a 'cat' state needs a list, tensor or dict default, not int"):
        Concatenated()

    class Twice(Summing):
        def setup(self) -> None:
            super().setup()
            self.add_state("total", 0.0, "sum")

    with pytest.raises(ValueError, match="already taken"):
        Twice()

    for taken in ("update", "params", "tensors", "pass_index"):  # a method, or what the base class keeps

        class Shadowing(Summing):
            def setup(self, taken=taken) -> None:
                self.add_state(taken, 0.0, "sum")

        with pytest.raises(
            ValueError, match=f"add_state\\('{taken}'\\): the name is not an identifier or is already taken"
        ):
            Shadowing()


class Largest(Summing):
    reduction = "max"

    def update(self, batch) -> None:
        for values in batch.tensors.values():
            self.accumulate("total", float(values.max()))


class Added(Summing):
    reduction = operator.add


@pytest.mark.parametrize("estimator", [Summing, Largest, Added])
def test_named_and_callable_reductions_merge_shards_exactly(estimator):
    """Every accepted kind of reduction passes the conformance suite (sharded equals one pass, …)."""
    batches = make_batches({"t": np.arange(60, dtype=np.float32).reshape(20, 3)}, batch_size=4)
    check_conformance(lambda: estimator(estimator.Params(), tensor_infos(batches)), batches)


@pytest.mark.parametrize(
    "attribute, value, instead",
    [
        ("per_batch", True, "tags = EstimatorTags(per_batch=...)"),
        ("needs_labels", True, "tags = EstimatorTags(needs_labels=...)"),
        ("reconstructed", "from the abstract", "tags = EstimatorTags(reconstructed=...)"),
        ("tokens", "tokens are features", "tags = EstimatorTags(tokens=...)"),
        ("passes", 2, "a passes_for(cls, params) classmethod"),
        ("reads_plan", True, "a subclass of PlanEstimator"),
    ],
)
def test_attributes_of_layerscope_0_1_are_refused_naming_their_replacement(attribute, value, instead):
    """A 0.1 estimator declaring ``per_batch = True`` would otherwise be split into micro-batches silently."""
    message = f"estimator Old: '{attribute}' is no longer read; declare {instead}"
    with pytest.raises(TypeError, match=re.escape(message)):
        type("Old", (Summing,), {attribute: value})


def test_tags_and_plan_estimators_are_what_the_engine_reads():
    assert Summing.tags == EstimatorTags()
    assert not Summing.tags.per_batch and not Summing.tags.needs_labels and Summing.tags.reconstructed is None
    assert Summing.passes_for(Summing.Params()) == 1
    from layerscope.plugins.information_plane.estimator import InformationPlane
    from layerscope.plugins.mean_dimension.estimator import MeanDimension

    assert InformationPlane.tags.per_batch and InformationPlane.tags.needs_labels
    assert issubclass(MeanDimension, PlanEstimator) and MeanDimension.lookahead == 1
    assert not issubclass(InformationPlane, PlanEstimator)
