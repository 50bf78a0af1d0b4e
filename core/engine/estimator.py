"""The estimator lifecycle: declare → update(batch)* → merge(other)* → finalize() → records.

An estimator keeps sufficient statistics declared with :meth:`Estimator.add_state`
together with a reduction, so that :meth:`Estimator.merge` of shards of any size is
exact, associative and commutative. State values may be tensors, numbers, lists or
dicts of those (dicts merge key by key, so per-class state needs no class count up
front).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
from pydantic import BaseModel

from layerscope.graph.tensors import TensorInfo
from layerscope.util.errors import did_you_mean
from layerscope.util.lazy import lazy_module
from layerscope.util.params import NoParams

if TYPE_CHECKING:
    import torch

    from layerscope.data.source import Samples
    from layerscope.model.adapter import LoadedModel
else:
    torch = lazy_module("torch")  # imported on first use: listing plugins does not load it

Reduction = str | Callable[[Any, Any], Any]


@dataclass
class TensorBatch:
    """What one forward pass hands to an estimator.

    ``tensors`` holds some or all of the estimator's tensors for the same samples (the
    runner may fetch them in memory-budget groups); ``labels`` are the samples' labels
    (or None), ``inputs`` the model's (first) data input, ``start`` the index of the first
    sample in the stream. ``feeds`` holds every data input by name (models with several
    inputs: ``input_ids``, ``attention_mask``, …) and ``token_mask`` marks each sample's
    real tokens (True) against padding, sample × token, for models with a token mask
    (:mod:`layerscope.engine.feeds`).
    """

    tensors: dict[str, torch.Tensor]
    inputs: torch.Tensor
    labels: torch.Tensor | None = None
    start: int = 0
    #: For estimators that evaluate their own input plan: the :class:`PlanBatch` these rows
    #: belong to and which of its rows they are (the runner may split a plan batch).
    plan: PlanBatch | None = None
    rows: slice | None = None
    feeds: dict[str, torch.Tensor] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class DataBatch:
    """A batch of the data stream as an input plan sees it: ``x``/``y`` hold the batch's
    ``size`` samples followed by up to ``lookahead`` samples of the next batch; ``x`` is one array, or
    arrays by model input name when the data source gives named arrays."""

    x: Samples
    y: np.ndarray | None
    start: int
    size: int


@dataclass
class PlanBatch:
    """Model inputs an estimator asks the runner to evaluate, with what it needs to read the outputs."""

    inputs: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


#: The named reductions of :meth:`Estimator.add_state`.
REDUCTIONS = ("sum", "min", "max", "cat")


def _combine(a: Any, b: Any, reduction: Reduction) -> Any:
    if a is None:
        return copy.deepcopy(b)
    if b is None:
        return a
    if isinstance(a, dict):
        merged = dict(a)
        for key, value in b.items():
            merged[key] = _combine(a.get(key), value, reduction)
        return merged
    if callable(reduction):
        return reduction(a, b)
    if reduction == "sum":
        return a + b
    if reduction == "cat":
        return torch.cat([a, b]) if isinstance(a, torch.Tensor) else list(a) + list(b)
    if reduction in ("min", "max"):
        if isinstance(a, torch.Tensor):
            return torch.minimum(a, b) if reduction == "min" else torch.maximum(a, b)
        return min(a, b) if reduction == "min" else max(a, b)
    raise ValueError(f"unknown reduction {reduction!r}")


@dataclass
class _State:
    default: Any
    reduction: Reduction


@dataclass(frozen=True)
class EstimatorTags:
    """What an estimator declares about its method, for the engine to read (after scikit-learn's estimator
    tags): one declaration instead of a class attribute per need. An estimator sets
    ``tags = EstimatorTags(needs_labels=True, ...)``; every field has the default most methods want."""

    #: The method needs class labels: a spec whose data has none is refused before the run.
    needs_labels: bool = False
    #: The method is defined per data batch: the runner never splits a batch into micro-batches, and
    #: shards and the conformance suite keep batches whole.
    per_batch: bool = False
    #: Why the method is a reconstruction rather than checked against the paper or its code (shown with
    #: the analysis in ``results.json``); None when it follows the authors.
    reconstructed: str | None = None
    #: How the method treats the token axes of a model with a token mask (:mod:`layerscope.graph.tokens`),
    #: recorded with the analysis in ``results.json``.
    tokens: str = "token axes are features like any other: padding counts as data"


#: Class attributes of layerscope 0.1 that :class:`EstimatorTags`, :meth:`Estimator.passes_for` and
#: :class:`PlanEstimator` replaced, with what to write instead.
_REPLACED_ATTRIBUTES = {
    "needs_labels": "tags = EstimatorTags(needs_labels=...)",
    "per_batch": "tags = EstimatorTags(per_batch=...)",
    "reconstructed": "tags = EstimatorTags(reconstructed=...)",
    "tokens": "tags = EstimatorTags(tokens=...)",
    "passes": "a passes_for(cls, params) classmethod",
    "reads_plan": "a subclass of PlanEstimator",
}


class Estimator:
    """Base class of every estimator plugin.

    Subclasses set ``name``, ``Params`` (a pydantic model validated from the spec's ``params``),
    ``default_selector`` and, where the defaults do not fit, ``tags`` (:class:`EstimatorTags`) and
    ``metric_ranges``; declare state in :meth:`setup`; implement :meth:`update` and :meth:`finalize`.
    The other methods are extension points with working defaults: :meth:`bind_graph`,
    :meth:`fetch_groups`, :meth:`passes_for` with :meth:`end_pass`, :meth:`carry_over`,
    :meth:`saturated`, :meth:`value_range` and :meth:`plot`. Estimators that evaluate inputs of their
    own subclass :class:`PlanEstimator`.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    #: A selector dict, a list of them (union), or "all".
    default_selector: ClassVar[dict | list[dict] | Literal["all"]] = "all"
    tags: ClassVar[EstimatorTags] = EstimatorTags()
    #: The closed interval each metric lies in mathematically, e.g. ``{"affinity_score": (0, 1)}``;
    #: a value outside it (beyond round-off) is never recorded (see :meth:`value_range`).
    metric_ranges: ClassVar[dict[str, tuple[float, float]]] = {}
    #: Declared state every estimator has (:meth:`warn`); a subclass annotates its own state the same way
    #: (``counts: dict[str, torch.Tensor]`` beside ``self.add_state("counts", {}, "sum")``) for type checkers.
    warnings: list[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse the class attributes of layerscope 0.1 that now have another form, naming it (an
        estimator declaring ``per_batch = True`` would otherwise be split into micro-batches silently)."""
        super().__init_subclass__(**kwargs)
        for attribute, instead in _REPLACED_ATTRIBUTES.items():
            if attribute in vars(cls):
                raise TypeError(f"estimator {cls.__qualname__}: '{attribute}' is no longer read; declare {instead}")

    def __init__(self, params: BaseModel | None = None, tensors: Sequence[TensorInfo] = ()):
        self.params = params if params is not None else self.Params()
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in tensors}
        self.pass_index = 0
        #: tensor name -> its token axes (:func:`layerscope.graph.tokens.token_axes`), set by the engine
        self.token_axes: dict[str, tuple[int, ...]] = {}
        self.passes = self.passes_for(self.params)
        self._states: dict[str, _State] = {}
        self.add_state("warnings", [], "cat")
        self.setup()

    # --- declaration -------------------------------------------------------------
    @classmethod
    def passes_for(cls, params: BaseModel) -> int:
        """Passes over the data these parameters need (default 1; e.g. 2 when a first pass finds
        histogram ranges). After each pass but the last, :meth:`end_pass` prepares the next."""
        return 1

    def setup(self) -> None:
        """Declare state with :meth:`add_state`."""

    def add_state(self, name: str, default: Any, reduction: Reduction) -> None:
        """Declare a piece of mergeable state, reset to a copy of *default*: *reduction* (``"sum"``,
        ``"min"``, ``"max"``, ``"cat"`` or a function of two values) folds two shards' values into one.
        A reduction that is none of these, a ``"cat"`` state whose default cannot be concatenated, or a
        name already taken is a ``ValueError`` here, when it is declared, not when shards first merge."""
        where = f"{type(self).__name__}.add_state('{name}')"
        if not callable(reduction) and reduction not in REDUCTIONS:
            choices = ", ".join(map(repr, REDUCTIONS))
            raise ValueError(
                f"{where}: unknown reduction {reduction!r}; use one of {choices} or a function of two values."
                + did_you_mean(str(reduction), REDUCTIONS)
            )
        if reduction == "cat" and not (default is None or isinstance(default, list | dict | torch.Tensor)):
            raise ValueError(
                f"{where}: a 'cat' state needs a list, tensor or dict default, not {type(default).__name__}"
            )
        if not name.isidentifier() or name in self._states or hasattr(self, name):
            raise ValueError(f"{where}: the name is not an identifier or is already taken")
        self._states[name] = _State(default, reduction)
        setattr(self, name, copy.deepcopy(default))

    def accumulate(self, name: str, value: Any, *keys: Any) -> None:
        """Fold *value* into state *name* with the state's declared reduction, as :meth:`merge` folds
        a shard's state: at ``state[keys[0]][keys[1]]…`` (dicts created as needed) when *keys* are
        given. ``accumulate("samples", n, tensor, cls)`` adds n to the count of one tensor and class.
        *value* is kept, not copied: pass a value the caller no longer changes."""
        reduction = self._states[name].reduction
        if not keys:
            current = getattr(self, name)
            setattr(self, name, value if current is None else _combine(current, value, reduction))
            return
        store = getattr(self, name)
        for key in keys[:-1]:
            store = store.setdefault(key, {})
        last = keys[-1]
        store[last] = _combine(store[last], value, reduction) if last in store else value

    def bind_graph(self, tensors: Sequence[TensorInfo], model: LoadedModel | None = None) -> None:
        """Receive every tensor of the model and the model itself (a :class:`~layerscope.LoadedModel`:
        ``model.graph`` its ONNX graph, ``model.initializer(name)`` an initializer's value, read from the
        model's file when it is kept there) before the run, for estimators that read more than their
        selected tensors (e.g. the inputs of activations, or the weights after a layer)."""

    def fetch_groups(self) -> list[tuple[str, ...]]:
        """Tensors that must arrive in the same batch; by default each tensor on its own."""
        return [(name,) for name in self.tensors]

    # --- lifecycle ---------------------------------------------------------------
    def saturated(self, start: int) -> bool:
        """True when no batch from stream position *start* on can change this estimator's state in
        the current pass, whatever it has seen: a property of its parameters and the position only
        (an estimator that keeps the first N samples of the stream is saturated from N on). The engine
        then stops feeding it, and stops reading data and running the model once every estimator
        of the pass is saturated. Default: never."""
        return False

    def update(self, batch: TensorBatch) -> None:
        raise NotImplementedError

    def carry_over(self, previous: Self) -> None:
        """Receive the estimator of the previous checkpoint (e.g. to smooth a kernel width).

        Called before this checkpoint's first pass ends; *previous* has ended at least its
        first pass (in sharded runs it is the merged state, and the shards' updates ran
        before this call, so ``update`` must not depend on it). Read only *previous*'s declared
        state (:meth:`add_state`) and parameters: a resumed run hands over an estimator rebuilt
        from its saved state.
        """

    def end_pass(self) -> None:
        """Called after each pass over the data, on the merged state when the run is sharded.

        Multi-pass estimators turn the pass's statistics into what the next pass needs
        here (and reset sums that shards would otherwise count twice); call ``super()``.
        """
        self.pass_index += 1

    def merge(self, other: Self) -> Self:
        """Fold *other*'s state into this one (in place; returns self)."""
        for name, state in self._states.items():
            setattr(self, name, _combine(getattr(self, name), getattr(other, name), state.reduction))
        return self

    def finalize(self) -> list[dict]:
        """Pure function of the state returning tidy records (``layer``, ``tensor``, ``metric``, ``value`` …)."""
        raise NotImplementedError

    def value_range(self, record: dict) -> tuple[float, float] | None:
        """The range *record*'s value must lie in (default: ``metric_ranges`` by metric; None: any).
        The engine drops a record outside it, with a warning, and sets one past a bound by
        round-off to the bound."""
        return self.metric_ranges.get(record["metric"])

    def collect_warnings(self) -> list[str]:
        """The warnings to put in ``results.json`` (those recorded with :meth:`warn`, once each)."""
        return list(dict.fromkeys(self.warnings))

    @classmethod
    def plot(cls, records: list[dict]):
        """A matplotlib figure of this estimator's records, or None for the default plot."""
        return None

    def warn(self, message: str) -> None:
        """Record a warning that will appear in ``results.json``."""
        if message not in self.warnings:
            self.warnings.append(message)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle everything but per-batch caches (attributes named ``_cache*``)."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_cache")}

    def state_dict(self) -> dict[str, Any]:
        """The declared state (see :meth:`add_state`), by name."""
        return {name: getattr(self, name) for name in self._states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the declared state from :meth:`state_dict` output (exactly the declared names)."""
        if set(state) != set(self._states):
            raise ValueError(f"state has {sorted(state)}, {self.name} declares {sorted(self._states)}")
        for name, value in state.items():
            setattr(self, name, value)

    def record(self, tensor: str, metric: str, value: float, unit: str = "", **keys: Any) -> dict:
        """Build one tidy record for *tensor* (the layer name is filled in)."""
        info = self.tensors.get(tensor)
        return {
            "layer": info.layer if info else tensor,
            "tensor": tensor,
            "metric": metric,
            "value": float(value),
            "unit": unit,
            **keys,
        }


class PlanEstimator(Estimator):
    """An estimator whose last pass evaluates inputs of its own instead of reading the model's tensors on
    the data (mean dimension perturbs each data pair): from each data batch, with ``lookahead`` samples of
    the next batch, :meth:`input_plan` yields :class:`PlanBatch` inputs that the engine evaluates with the
    same runner, session and memory budget on :meth:`transform_model`'s model; :meth:`update` then
    receives the selected tensors of those rows with ``batch.plan`` and ``batch.rows``."""

    #: Samples of the next data batch that come with every data batch (e.g. 1 to pair the last sample).
    lookahead: ClassVar[int] = 0

    def transform_model(self, model):
        """The model the plan is evaluated on (e.g. with a layer prepended); the model itself by default."""
        return model

    def input_plan(self, data: DataBatch) -> Iterator[PlanBatch]:
        """Yield :class:`PlanBatch` objects of inputs derived from one data batch."""
        raise NotImplementedError

    def plan_rows(self, batch_size: int) -> int:
        """The largest number of rows one plan batch has, for memory planning."""
        return batch_size


__all__ = ["DataBatch", "Estimator", "EstimatorTags", "PlanBatch", "PlanEstimator", "TensorBatch"]
