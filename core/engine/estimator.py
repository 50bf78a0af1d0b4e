"""The estimator lifecycle: declare → update(batch)* → merge(other)* → finalize() → records.

An estimator keeps sufficient statistics declared with :meth:`Estimator.add_state`
together with a reduction, so that :meth:`Estimator.merge` of shards of any size is
exact, associative and commutative. State values may be tensors, numbers, lists or
dicts of those (dicts merge key by key, so per-class state needs no class count up
front).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from layerscope.graph.selectors import SelectorSpec
from layerscope.graph.tensors import TensorInfo
from layerscope.util.lazy import lazy_module
from layerscope.util.params import NoParams

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
    ``size`` samples followed by up to ``lookahead`` samples of the next batch."""

    x: np.ndarray
    y: np.ndarray | None
    start: int
    size: int


@dataclass
class PlanBatch:
    """Model inputs an estimator asks the runner to evaluate, with what it needs to read the outputs."""

    inputs: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


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


class Estimator:
    """Base class of every estimator plugin.

    Subclasses set ``name``, ``Params`` (a pydantic model validated from the spec's
    ``params``), ``default_selector`` and ``needs_labels``; declare state in
    :meth:`setup`; implement :meth:`update` and :meth:`finalize`.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams
    #: A selector dict, a list of them (union), or "all".
    default_selector: ClassVar[dict | list[dict] | str] = "all"
    needs_labels: ClassVar[bool] = False
    #: True when the method is defined per data batch, so the runner must not split batches.
    per_batch: ClassVar[bool] = False
    #: Number of passes over the data (e.g. 2 when a first pass finds histogram ranges).
    passes: ClassVar[int] = 1
    #: True when the last pass evaluates the estimator's own inputs (:meth:`input_plan`)
    #: instead of reading the model's tensors on the data; ``lookahead`` extra samples of
    #: the next batch come with every data batch.
    reads_plan: ClassVar[bool] = False
    lookahead: ClassVar[int] = 0
    #: Set when the method was reconstructed rather than checked against the paper/code.
    reconstructed: ClassVar[str | None] = None
    #: The closed interval each metric lies in mathematically, e.g. ``{"affinity_score": (0, 1)}``;
    #: a value outside it (beyond round-off) is never recorded (see :meth:`value_range`).
    metric_ranges: ClassVar[dict[str, tuple[float, float]]] = {}
    #: How the method treats the token axes of a model with a token mask (:mod:`layerscope.graph.tokens`),
    #: recorded with the analysis in ``results.json``.
    tokens: ClassVar[str] = "token axes are features like any other: padding counts as data"

    def __init__(self, params: BaseModel | None = None, tensors: Sequence[TensorInfo] = ()):
        self.params = params if params is not None else self.Params()
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in tensors}
        self.pass_index = 0
        #: tensor name -> its token axes (:func:`layerscope.graph.tokens.token_axes`), set by :meth:`bind_tokens`
        self.token_axes: dict[str, tuple[int, ...]] = {}
        self.passes = self.passes_for(self.params)
        self._states: dict[str, _State] = {}
        self.add_state("warnings", [], "cat")
        self.setup()

    # --- declaration -------------------------------------------------------------
    @classmethod
    def selector(cls) -> SelectorSpec | list[SelectorSpec] | str:
        default = cls.default_selector
        if isinstance(default, str):
            return default
        return [SelectorSpec(**d) for d in default] if isinstance(default, list) else SelectorSpec(**default)

    @classmethod
    def passes_for(cls, params: BaseModel) -> int:
        """Passes over the data these parameters need (default: the class's ``passes``)."""
        return cls.passes

    def setup(self) -> None:
        """Declare state with :meth:`add_state`."""

    def add_state(self, name: str, default: Any, reduction: Reduction) -> None:
        """Declare a piece of mergeable state, reset to a copy of *default*."""
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

    def bind_graph(self, tensors: Sequence[TensorInfo], model=None) -> None:
        """Receive every tensor of the model (and the ``onnx.ModelProto``) before the run, for
        estimators that read more than their selected tensors (e.g. the inputs of activations)."""

    def bind_tokens(self, tensors: Sequence[TensorInfo], token_mask: str | None) -> None:
        """Record the token axes of every tensor of the model, given the name of the token-mask input
        (None: the model has none); the batches' ``token_mask`` marks the real tokens."""
        from layerscope.graph.tokens import sequence_dims, token_axes

        sequences = sequence_dims([t for t in tensors if t.role == "input"], token_mask)
        self.token_axes = {t.name: axes for t in tensors if sequences and (axes := token_axes(t, sequences))}

    def fetch_groups(self) -> list[tuple[str, ...]]:
        """Tensors that must arrive in the same batch; by default each tensor on its own."""
        return [(name,) for name in self.tensors]

    # --- input plans (estimators with ``reads_plan``) ------------------------------
    def transform_model(self, model):
        """The model the plan is evaluated on (e.g. with a layer prepended); the model itself by default."""
        return model

    def input_plan(self, data: DataBatch):
        """Yield :class:`PlanBatch` objects of inputs derived from one data batch."""
        raise NotImplementedError

    def plan_rows(self, batch_size: int) -> int:
        """The largest number of rows one plan batch has, for memory planning."""
        return batch_size

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

    def carry_over(self, previous: Estimator) -> None:
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

    def merge(self, other: Estimator) -> Estimator:
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


__all__ = ["DataBatch", "Estimator", "PlanBatch", "TensorBatch"]
