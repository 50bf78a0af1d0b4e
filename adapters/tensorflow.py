"""Adapter for TensorFlow and Keras models: Keras 3 ``.keras`` files, TensorFlow SavedModel
directories, and (from Python) a live ``keras.Model`` or ``tf.function``.

TensorFlow graphs are converted with tf2onnx (``tf2onnx.convert.from_function`` on a
``tf.function`` that calls the model, which works for Sequential and Functional Keras models
alike; tf2onnx's ``from_keras`` fails on Sequential models) at opset 17 (tf2onnx supports
≤ 18; the opset used is recorded in the results). A Keras model on the torch backend is a
``torch.nn.Module`` and goes through torch's exporter instead. Layer names in results are
the Keras layer names, read back from the converted node names
(``…/functional_1/conv1_1/Relu`` → ``conv1``; ``sequential_1/dense_1_2/Relu`` → ``dense_1``, see
:func:`keras_layer_name`).

Layout: Keras tensors are NHWC; tf2onnx turns convolutions into ONNX's NCHW with
transposes around them. The converted model is marked as having an NHWC input, and
:func:`layerscope.graph.tensors.infer_layouts` follows the layout through the graph, so every 4-D
tensor carries ``layout`` (NCHW or NHWC, shown by ``inspect`` and in ``results.json``'s
model tensors) and estimators that reduce over spatial axes move channels first
(``TensorInfo.channels_first``). Requires the ``layerscope[tensorflow]`` extra.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from layerscope import Adapter, Checkpoint, LoadedModel, hookimpl
from layerscope.graph.tensors import INPUT_LAYOUT_KEY
from layerscope.util.errors import UserError
from layerscope.util.files import regular_file
from layerscope.util.lazy import lazy_module

from .export_cache import with_weights
from .op_rewrites import rewrite_unsupported_ops
from .quiet import quiet

if TYPE_CHECKING:
    import onnx
else:
    onnx = lazy_module("onnx")  # imported on first use: listing plugins does not load it

OPSET = 17
_CALL_SUFFIX = re.compile(r"_\d+$")
_WRAPPERS = {"StatefulPartitionedCall", "PartitionedCall"}


def _tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
        import tf2onnx  # noqa: F401
    except ImportError:
        raise UserError(
            "model.source: TensorFlow/Keras models need the extra: pip install 'layerscope[tensorflow]'"
        ) from None
    return tf


def is_saved_model(path: Path) -> bool:
    return path.is_dir() and (path / "saved_model.pb").exists()


class KerasNames(NamedTuple):
    """What a converted graph's node names are read against: the model's name and its layers' names."""

    model: str | None
    layers: frozenset[str]

    @classmethod
    def of(cls, model) -> KerasNames:
        """The names of a Keras *model* and of its layers."""
        return cls(model.name, frozenset(layer.name for layer in model.layers))


def keras_layer_name(names: KerasNames, proto: onnx.ModelProto):
    """The layer-name rule for a converted graph: the layer scope of each node's name.

    Node names are TensorFlow name scopes, ``[<model scope>/]<layer scope>/<op>``, and TensorFlow
    makes scopes unique by appending ``_<n>``. In a Keras 3 trace every layer scope carries such a
    suffix — a layer named ``dense`` is scoped ``dense_1``, one named ``dense_1`` ``dense_1_2`` — so
    when removing one suffix from every layer scope of *proto* gives a layer name, exactly one is
    removed. Otherwise a known layer name is taken as it is, then with its suffix removed."""
    known = names.layers

    def layer_scope(node) -> list[str]:
        parts = [p for p in node.name.split("/") if p not in _WRAPPERS]
        if (
            len(parts) >= 3
            and parts[0] not in known
            and names.model in (None, parts[0], _CALL_SUFFIX.sub("", parts[0]))
        ):
            return parts[1:]  # below the model's own scope
        return parts

    scopes = [layer_scope(node) for node in proto.graph.node]
    every_suffixed = bool(known) and all(
        _CALL_SUFFIX.sub("", parts[0]) in known and _CALL_SUFFIX.search(parts[0]) for parts in scopes if len(parts) >= 2
    )

    def layer_of(node: onnx.NodeProto) -> str:
        parts = layer_scope(node)
        if every_suffixed and len(parts) >= 2:
            return _CALL_SUFFIX.sub("", parts[0])
        for part in parts:
            if part in known:
                return part
            if _CALL_SUFFIX.sub("", part) in known:
                return _CALL_SUFFIX.sub("", part)
        if len(parts) >= 2:  # layer scope / op
            return _CALL_SUFFIX.sub("", parts[0])
        return node.name or (node.output[0] if node.output else node.op_type)

    return layer_of


def _convert(function, spec) -> onnx.ModelProto:
    """*function* converted by tf2onnx for *spec* (one ``tf.TensorSpec``, or a list for several inputs)."""
    import tf2onnx

    try:
        with quiet("tf2onnx"):
            proto, _ = tf2onnx.convert.from_function(
                function, input_signature=spec if isinstance(spec, list) else [spec], opset=OPSET
            )
    except Exception as error:
        raise UserError(
            f"model.source: tf2onnx could not convert the model: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    return proto


def _keras_model_to_onnx(model, example):
    """(proto, layer names, framework) for a live Keras model (either backend)."""
    import keras

    names = KerasNames.of(model)
    if keras.config.backend() == "torch":
        from .torch_export import export_to_onnx

        return export_to_onnx(model, example), names, "keras (torch backend)"
    tf = _tensorflow()
    shape = [None, *model.inputs[0].shape[1:]] if getattr(model, "inputs", None) else [None, *example.shape[1:]]
    spec = tf.TensorSpec(shape, model.inputs[0].dtype if getattr(model, "inputs", None) else tf.float32, name="x")

    @tf.function(autograph=False)
    def call(x):
        return model(x, training=False)

    return _convert(call, spec), names, "keras"


def _keras_graph_taking_weights(model, example) -> onnx.ModelProto:
    """A live Keras model (TensorFlow backend) as ONNX whose weights are initializers named by the
    variables' paths (``sequential/dense/kernel``): converted from ``model.stateless_call`` with the
    weights as inputs, which then become initializers. A plain conversion freezes the weights into
    constants that tf2onnx folds (biases into adds, BatchNorm into a scale); this graph takes new
    weights by name (:func:`.export_cache.with_weights`), which is how :class:`layerscope.Monitor`
    converts a Keras model once."""
    tf = _tensorflow()
    variables = [*model.trainable_variables, *model.non_trainable_variables]
    trainable = len(model.trainable_variables)
    shape = [None, *model.inputs[0].shape[1:]] if getattr(model, "inputs", None) else [None, *np.shape(example)[1:]]
    signature = [
        tf.TensorSpec(shape, model.inputs[0].dtype if getattr(model, "inputs", None) else tf.float32, name="x")
    ]
    signature += [tf.TensorSpec(v.shape, v.dtype, name=f"weight_{i}") for i, v in enumerate(variables)]

    @tf.function(autograph=False)
    def call(x, *weights):
        return model.stateless_call(list(weights[:trainable]), list(weights[trainable:]), x, training=False)[0]

    proto = _convert(call, signature)
    weights = keras_weights(model)
    names = dict(zip((f"weight_{i}" for i in range(len(variables))), weights))
    kept = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    for node in proto.graph.node:
        node.input[:] = [names.get(name, name) for name in node.input]
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(value, name) for name, value in weights.items())
    return proto


def keras_weights(model) -> dict[str, np.ndarray]:
    """A Keras model's variables by the initializer names of :func:`_keras_graph_taking_weights`."""
    variables = [*model.trainable_variables, *model.non_trainable_variables]
    paths = [v.path for v in variables]
    unique = len(set(paths)) == len(paths)
    return {
        (path if unique else f"{path}:{i}"): np.asarray(v.numpy()) for i, (path, v) in enumerate(zip(paths, variables))
    }


def _saved_model_to_onnx(path: Path):
    tf = _tensorflow()
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as error:
        raise UserError(f"model.source: {path} is not a loadable TensorFlow SavedModel: {error}") from None
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise UserError(f"model.source: {path} has no 'serving_default' signature")
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1:
        raise UserError(
            f"model.source: the SavedModel takes {len(inputs)} inputs ({', '.join(inputs)}); "
            "layerscope currently analyses single-input models"
        )
    ((name, spec),) = inputs.items()

    @tf.function(autograph=False)
    def call(x):
        outputs = signature(**{name: x})
        return outputs[sorted(outputs)[0]]

    return (
        _convert(call, tf.TensorSpec(spec.shape, spec.dtype, name="x")),
        KerasNames(None, frozenset()),
        "tensorflow (SavedModel)",
    )


def _is_keras_model(source) -> bool:
    keras = sys.modules.get("keras")
    return keras is not None and isinstance(source, keras.Model)


def _is_tf_function(source) -> bool:
    tf = sys.modules.get("tensorflow")
    return tf is not None and hasattr(tf, "types") and isinstance(source, tf.types.experimental.PolymorphicFunction)


class TensorFlowAdapter(Adapter):
    """Keras models (.keras files, keras.Model objects), SavedModel folders and tf.functions, converted to ONNX."""

    name = "tensorflow"

    def __init__(self):
        self._followed: dict[int, onnx.ModelProto] = {}  # a live Keras model's graph taking weights by name

    def claims(self, section) -> bool:
        source = section.source
        if isinstance(source, str):
            return (
                source.endswith(".keras") or is_saved_model(Path(source)) or source.rstrip("/").endswith("saved_model")
            )
        return _is_keras_model(source) or _is_tf_function(source)

    def checkpoints(self, section, spec) -> list[Checkpoint]:
        source = section.source
        if not isinstance(source, str):
            return [Checkpoint("model", source)]
        path = spec.resolve_path(source)
        return [Checkpoint(path.stem if path.suffix else path.name, path)]

    def load(self, checkpoint: Checkpoint, spec, example) -> LoadedModel:
        ref = checkpoint.ref
        if isinstance(ref, Path):
            if ref.suffix == ".keras":
                regular_file(ref, "model.source")
                _tensorflow()
                import keras

                try:
                    model = keras.saving.load_model(str(ref), safe_mode=True)  # no arbitrary code from the file
                except Exception as error:
                    raise UserError(f"model.source: {ref} is not a loadable Keras model: {error}") from None
                proto, names, framework = _keras_model_to_onnx(model, example)
            elif not ref.is_dir():
                raise UserError(f"model.source: SavedModel folder not found: {ref}")
            else:
                proto, names, framework = _saved_model_to_onnx(ref)
            source = str(ref)
        elif _is_keras_model(ref):
            proto, names, framework = _keras_model_to_onnx(ref, example)
            source = f"<{type(ref).__name__}>"
        else:
            tf = _tensorflow()
            signature = ref.input_signature
            spec_ = signature[0] if signature else tf.TensorSpec([None, *np.shape(example)[1:]], tf.float32, name="x")
            proto, names, framework = _convert(ref, spec_), KerasNames(None, frozenset()), "tensorflow (tf.function)"
            source = "<tf.function>"
        return _loaded(proto, names, framework, checkpoint.label, source)

    def follow(self, model, label: str, spec, example) -> LoadedModel:
        """A live Keras model (TensorFlow backend) converted once, by :func:`_keras_graph_taking_weights`,
        then given its current weights by variable path at every call (0.3 s for a conversion, a
        millisecond for a swap); other models are loaded as checkpoints."""
        if not _is_keras_model(model) or "torch" in _keras_model_framework():
            return super().follow(model, label, spec, example)
        if id(model) not in self._followed:
            self._followed[id(model)] = _keras_graph_taking_weights(model, example)
        proto = with_weights(self._followed[id(model)], keras_weights(model))
        if proto is None:  # the model gained or lost variables since it was converted
            self._followed[id(model)] = proto = _keras_graph_taking_weights(model, example)
        return _loaded(proto, KerasNames.of(model), "keras", label, f"<{type(model).__name__}>")


def _keras_model_framework() -> str:
    import keras

    return "keras (torch backend)" if keras.config.backend() == "torch" else "keras"


def _loaded(proto: onnx.ModelProto, names: KerasNames, framework: str, label: str, source: str) -> LoadedModel:
    """The converted *proto* as a loaded model: Keras/TF inputs marked channels-last, ops onnxruntime lacks
    rewritten (:func:`.op_rewrites.rewrite_unsupported_ops`), layer names read back from the node names
    (:func:`keras_layer_name`), the opset and the rewrites recorded."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    details: dict = {"opset": opset}
    if "torch" not in framework:  # Keras/TF inputs are channels-last
        onnx.helper.set_model_props(proto, {INPUT_LAYOUT_KEY: "NHWC"})
        if rewritten := rewrite_unsupported_ops(proto):
            details["rewritten_ops"] = dict(rewritten)
    loaded = LoadedModel(proto, label, source, framework=framework, details=details)
    if "torch" not in framework:
        loaded.layer_of = keras_layer_name(names, proto)
    return loaded


@hookimpl
def register_adapters(register):
    register(TensorFlowAdapter)
