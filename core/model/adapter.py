"""Model sources: adapters turn what the user names into an ONNX graph.

An adapter claims a model section (``claims``), validates the section's keys with its own
``Params`` (a :class:`ModelParams`), lists the checkpoints it names (``checkpoints``) and
loads one of them to an :class:`onnx.ModelProto` (``load``). Exactly one adapter may claim
a section: two claims are an error naming both plugins.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from layerscope.graph.layer_names import layer_name
from layerscope.graph.weights import Weights, external_tensors, weight_free
from layerscope.util.errors import UserError
from layerscope.util.files import regular_file
from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    from layerscope.data.source import Samples
    from layerscope.host.registry import Registry
    from layerscope.spec.schema import ModelSection, Spec

if TYPE_CHECKING:
    import numpy as np
    import onnx
else:
    onnx = lazy_module("onnx")


@dataclass
class LoadedModel:
    """An ONNX graph ready for the runner, with provenance and the layer-name rule.

    *proto* may hold its weights; the engine then sets them apart once (:func:`layerscope.graph.weights.
    weight_free`). An adapter that reads a file passes the graph and *weights* of :func:`load_onnx_file`,
    so that the weights stay in the file: the graph alone is held in memory, and onnxruntime reads the
    weights itself. :meth:`initializer` reads any initializer's value."""

    proto: onnx.ModelProto
    label: str
    source: str
    framework: str = "onnx"
    layer_of: Callable[[onnx.NodeProto], str] = layer_name
    details: dict[str, Any] = field(default_factory=dict)
    #: Where the large initializers of *proto* are, when it holds references to them (external data).
    weights: Weights = field(default_factory=Weights)

    @property
    def graph(self) -> onnx.GraphProto:
        """The model's graph (``proto.graph``)."""
        return self.proto.graph

    def initializer(self, name: str) -> np.ndarray:
        """The value of initializer *name* (read from the model's file when the graph holds a reference)."""
        return self.weights.array(self.proto, name)

    def weight_free(self) -> LoadedModel:
        """This model with its large initializers set apart (itself when they are already)."""
        if self.weights.folder is not None or self.weights.files:
            return self
        proto, weights = weight_free(self.proto)
        return replace(self, proto=proto, weights=weights)


@dataclass(frozen=True)
class Checkpoint:
    """One model to analyse: a label (e.g. ``epoch_03``), what the adapter needs to load it, and the
    training step or epoch it was saved at when known (records then carry it as ``step``)."""

    label: str
    ref: Any
    step: int | None = None
    #: The label of the model it belongs to in a spec with several models (``models:``), else None.
    network: str | None = None


def steps_from_labels(labels: list[str]) -> list[int | None]:
    """The training step of each checkpoint of a series named by number (``epoch_3``, ``step-1000.pt``:
    the last number in the label); all None when the series has one checkpoint or a label without a number."""
    numbers = [re.findall(r"\d+", label) for label in labels]
    if len(labels) < 2 or not all(numbers):
        return [None] * len(labels)
    return [int(found[-1]) for found in numbers]


class ModelParams(BaseModel):
    """The model section as an adapter reads it: ``source`` and the adapter's own keys (an adapter's
    ``Params`` subclasses this and adds fields; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    source: Any = Field(None, description="the model: a path or name this adapter claims, or (from Python) an object")


#: The parameters an adapter validates its model section with (its ``Params``).
ParamsT = TypeVar("ParamsT", bound=ModelParams)


class Adapter(Generic[ParamsT]):
    """Base class of adapter plugins; ``Adapter[MyParams]`` for one whose ``Params`` is ``MyParams`` (the section
    :meth:`checkpoints` receives)."""

    name: ClassVar[str]
    #: The model section's keys this adapter reads (validated from the spec, errors at file:line:col).
    Params: ClassVar[type[ModelParams]] = ModelParams

    def claims(self, section: ModelSection) -> bool:
        """True when this adapter loads the model the section names (``section.source``, ``section.get(key)``)."""
        raise NotImplementedError

    def checkpoints(self, params: ParamsT, spec: Spec) -> list[Checkpoint]:
        """The models to analyse, in order, from the validated section (a single one unless the
        adapter's parameters name several)."""
        raise NotImplementedError

    def load(self, checkpoint: Checkpoint, spec: Spec, example: Samples) -> LoadedModel:
        """Load *checkpoint* as ONNX; *example* is a small input batch from the data: one array, or arrays
        by input name for a model with several inputs (their dtypes are the data's, e.g. int64 token ids)."""
        raise NotImplementedError

    def follow(self, model: Any, label: str, spec: Spec, example: Samples) -> LoadedModel:
        """The current state of a live *model* object (one being trained, followed by
        :class:`layerscope.Monitor`) as ONNX, labelled *label*. Adapters that can put new weights
        into the graph they exported for the same object override this to export once; the default
        loads it as a checkpoint, which may export it again."""
        return self.load(Checkpoint(label, model), spec, example)


def find_adapter(section: ModelSection, adapters: Registry) -> Adapter:
    """The registered adapter that claims *section*; a user error when none does (listing the accepted
    forms) or when several do (naming their plugins)."""
    claiming = [
        adapter for adapter in (adapter_class() for _, adapter_class in adapters.items()) if adapter.claims(section)
    ]
    if len(claiming) > 1:
        named = ", ".join(f"'{a.name}' of plugin '{adapters.origin.get(a.name, '?')}'" for a in claiming)
        raise UserError(
            f"model.source: {len(claiming)} adapters claim '{section.source}': {named}; uninstall one "
            "of the plugins or restrict loading with LAYERSCOPE_LOAD_PLUGINS"
        )
    if not claiming and section.source is None:
        raise UserError("model.source: required key is missing (the model: a file, 'demo:NAME', or a python: factory)")
    if not claiming:
        raise UserError(
            f"model.source: no adapter loads '{section.source}' (accepted: a .onnx, .pt2 or .keras "
            f"file, a SavedModel folder, 'demo:NAME', a python: factory, or a model object from Python; "
            f"adapters: {', '.join(n for n, _ in adapters.items())})"
        )
    return claiming[0]


def load_onnx_file(path: Path) -> tuple[onnx.ModelProto, Weights]:
    """The graph of an ONNX file and where its weights are (:func:`layerscope.graph.weights.weight_free`: large
    initializers stay in the file, or in the external-data files beside it, unread); a file that is not
    an ONNX model, or whose external data is missing, is a user error naming it."""
    path = regular_file(path, "model.source")
    try:
        proto, weights = weight_free(path)
        for tensor, entries in external_tensors(proto):
            data = path.parent / entries["location"]
            needed = int(entries.get("offset", 0)) + int(entries.get("length", 0))
            if not data.is_file() or data.stat().st_size < needed:
                raise ValueError(f"the data of initializer '{tensor.name}' is not in {data}")
    except Exception as error:  # not protobuf, not a model, missing external data
        raise UserError(
            f"model.source: {path} is not a readable ONNX model ({type(error).__name__}: {error})"
        ) from None
    return proto, weights
