"""Adapter for ONNX files (``.onnx``, external data beside it) and in-memory ``onnx.ModelProto``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from layerscope import Adapter, Checkpoint, LoadedModel, hookimpl
from layerscope.model.adapter import ModelParams, load_onnx_file
from layerscope.util.errors import UserError
from layerscope.util.lazy import lazy_module

from .checkpoints import CheckpointFiles, checkpoint_files, file_checkpoints

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it


class OnnxFileParams(ModelParams):
    checkpoints: CheckpointFiles = checkpoint_files(".onnx")


class OnnxFileAdapter(Adapter):
    """ONNX files (.onnx, with external data beside them) and onnx.ModelProto objects from Python."""

    name = "onnx"
    Params = OnnxFileParams

    def claims(self, section) -> bool:
        source = section.source
        if isinstance(source, str):
            return source.lower().endswith(".onnx")
        loaded = sys.modules.get("onnx")  # a ModelProto exists only once onnx is imported
        return loaded is not None and isinstance(source, loaded.ModelProto)

    def checkpoints(self, section, spec) -> list[Checkpoint]:
        if section.checkpoints:
            return file_checkpoints(section.checkpoints, spec, (".onnx",))
        if isinstance(section.source, onnx.ModelProto):
            return [Checkpoint("model", section.source)]
        path = spec.resolve_path(section.source)
        return [Checkpoint(path.stem, path)]

    def load(self, checkpoint: Checkpoint, spec, example) -> LoadedModel:
        if isinstance(checkpoint.ref, onnx.ModelProto):
            return LoadedModel(checkpoint.ref, checkpoint.label, "<onnx.ModelProto>")
        proto, weights = load_onnx_file(checkpoint.ref)
        if not proto.HasField("graph") or not proto.graph.node:
            raise UserError(f"model.source: {checkpoint.ref} is not an ONNX model (no graph inside)")
        return LoadedModel(proto, checkpoint.label, str(checkpoint.ref), weights=weights)


@hookimpl
def register_adapters(register):
    register(OnnxFileAdapter)
