"""Adapter for ONNX files (``.onnx``, external data beside it) and in-memory ``onnx.ModelProto``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from layerscope import Adapter, Checkpoint, LoadedModel, hookimpl
from layerscope.model.adapter import ModelParams, load_onnx_file
from layerscope.util.errors import UserError
from layerscope.util.lazy import lazy_module

from .checkpoints import CheckpointFiles, checkpoint_files, file_checkpoints
from .op_rewrites import rewrite_unsupported_ops, with_ops_rewritten

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
        """The model, with the TensorFlow ops a converter left in it rewritten into ONNX ops
        (:mod:`.op_rewrites`: an ``.onnx`` made by tf2onnx outside layerscope runs as one made
        inside), counted in ``rewritten_ops``; a ModelProto from Python is not changed."""
        if isinstance(checkpoint.ref, onnx.ModelProto):
            proto, rewritten = with_ops_rewritten(checkpoint.ref)
            return LoadedModel(proto, checkpoint.label, "<onnx.ModelProto>", details=_rewrites(rewritten))
        proto, weights = load_onnx_file(checkpoint.ref)
        if not proto.HasField("graph") or not proto.graph.node:
            raise UserError(f"model.source: {checkpoint.ref} is not an ONNX model (no graph inside)")
        rewritten = dict(rewrite_unsupported_ops(proto))
        return LoadedModel(proto, checkpoint.label, str(checkpoint.ref), weights=weights, details=_rewrites(rewritten))


def _rewrites(rewritten: dict[str, int]) -> dict[str, dict[str, int]]:
    """The model details recording *rewritten* (none when nothing was)."""
    return {"rewritten_ops": rewritten} if rewritten else {}


@hookimpl
def register_adapters(register):
    register(OnnxFileAdapter)
