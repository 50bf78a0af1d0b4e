"""Model sources: adapters turn what the user names into an ONNX graph.

An adapter claims a model section (``claims``), lists the checkpoints it names
(``checkpoints``) and loads one of them to an :class:`onnx.ModelProto` (``load``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import onnx

from .errors import UserError
from .files import regular_file
from .layer_names import layer_name

if TYPE_CHECKING:
    from .spec import ModelSection, Spec


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
    """One model to analyse: a label (e.g. ``epoch_03``) and what the adapter needs to load it."""

    label: str
    ref: Any


class Adapter:
    """Base class of adapter plugins."""

    name: ClassVar[str]

    def claims(self, section: "ModelSection") -> bool:
        """True when this adapter loads the model the section names."""
        raise NotImplementedError

    def checkpoints(self, section: "ModelSection", spec: "Spec") -> list[Checkpoint]:
        """The models to analyse, in order (a single one unless ``checkpoints`` is set)."""
        raise NotImplementedError

    def load(self, checkpoint: Checkpoint, spec: "Spec", example: np.ndarray) -> LoadedModel:
        """Load *checkpoint* as ONNX; *example* is a small input batch from the data."""
        raise NotImplementedError


def find_adapter(section: "ModelSection", adapters) -> Adapter:
    """The registered adapter that claims *section*, or a user error listing the accepted forms."""
    for _, adapter_class in adapters.items():
        adapter = adapter_class()
        if adapter.claims(section):
            return adapter
    raise UserError(f"model.source: no adapter loads '{section.source}' (accepted: a .onnx or .pt2 file, "
                    f"'demo:NAME', a python: factory, or a model object from Python; "
                    f"adapters: {', '.join(n for n, _ in adapters.items())})")


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
        if external_data_bytes(model) + model.ByteSize() > PROTOBUF_LIMIT:
            return model, path.parent
        onnx.load_external_data_for_model(model, str(path.parent))
        return model, None
    except Exception as error:  # protobuf DecodeError, missing external data, ...
        raise UserError(f"model.source: {path} is not a readable ONNX model ({type(error).__name__}: {error})") from None
