"""Model sources: adapters turn what the user names into an ONNX graph.

An adapter claims a model section (``claims``), validates the section's keys with its own
``Params`` (a :class:`ModelParams`), lists the checkpoints it names (``checkpoints``) and
loads one of them to an :class:`onnx.ModelProto` (``load``). Exactly one adapter may claim
a section: two claims are an error naming both plugins.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from layerscope.graph.layer_names import layer_name
from layerscope.util.errors import UserError
from layerscope.util.files import regular_file
from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    from layerscope.data.source import Samples
    from layerscope.host.registry import Registry
    from layerscope.spec.schema import ModelSection, Spec

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")


@dataclass
class LoadedModel:
    """An ONNX graph ready for the runner, with provenance and the layer-name rule."""

    proto: onnx.ModelProto
    label: str
    source: str
    framework: str = "onnx"
    layer_of: Callable[[onnx.NodeProto], str] = layer_name
    details: dict[str, Any] = field(default_factory=dict)
    #: Set for models over 2 GB: their initializers stay in external files in this folder
    #: (the proto holds only references) and are handed to onnxruntime from memory maps
    #: (onnxruntime may still copy them into its own memory).
    external_dir: Path | None = None


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


PROTOBUF_LIMIT = 2**31 - 1


def external_data_bytes(model: onnx.ModelProto) -> int:
    """Bytes the model's initializers keep in external files (from the references' lengths)."""
    total = 0
    for tensor in model.graph.initializer:
        if onnx.external_data_helper.uses_external_data(tensor):
            entries = {e.key: e.value for e in tensor.external_data}
            total += int(entries.get("length", 0))
    return total


def load_onnx_file(path: Path) -> tuple[onnx.ModelProto, Path | None]:
    """Load an ONNX file with user-level errors; returns (model, external-data folder or None).

    External data beside the file is loaded into the proto, unless the model would pass
    protobuf's 2 GB limit: then the proto keeps the references and the folder is returned.
    """
    path = regular_file(path, "model.source")
    try:
        model = onnx.load(str(path), load_external_data=False)
        if external_data_bytes(model) + path.stat().st_size > PROTOBUF_LIMIT:  # the file is the proto's bytes
            return model, path.parent
        onnx.load_external_data_for_model(model, str(path.parent))
        return model, None
    except Exception as error:  # protobuf DecodeError, missing external data, ...
        raise UserError(
            f"model.source: {path} is not a readable ONNX model ({type(error).__name__}: {error})"
        ) from None
