"""``layerscope inspect``: what a model offers for observation."""

from __future__ import annotations

import json
from collections import Counter

from layerscope.graph.tensors import describe_tensors, format_dims
from layerscope.util.errors import UserError


def load_for_inspection(source: str):
    """Load the last checkpoint of *source* (a model source, or a spec file whose (first) model is used)."""
    from layerscope.api import prepare
    from layerscope.host.loader import load_plugins
    from layerscope.model.adapter import find_adapter
    from layerscope.spec.schema import Spec

    if source.endswith((".yaml", ".yml")):
        plan = prepare(source)
        spec, example = plan.spec, plan.example()
        adapter, params = plan.networks[0].adapter, plan.networks[0].params
    else:
        # A model source alone: a minimal spec (its analysis is never run) gives the adapter its paths.
        spec = Spec.model_validate({"model": {"source": source}, "analyses": [{"id": "inspect", "estimator": "-"}]})
        assert spec.model is not None  # for type checkers: validated from a model section
        adapter, example = find_adapter(spec.model, load_plugins().adapters), None
        params = adapter.Params(source=source)
    checkpoints = adapter.checkpoints(params, spec)
    if not checkpoints:
        raise UserError(f"model.source: '{source}' names no model")
    return adapter.load(checkpoints[-1], spec, example)


def inspect_model(source: str, as_json: bool = False, show_all: bool = False) -> None:
    """Print the model's inputs and every tensor: op type, layer, dtype, shape and why it is not
    observable; the ops that compute activations out of sight (LSTM gates, fused attention); and the
    ops onnxruntime cannot run."""
    from layerscope.graph.activations import find_attention, fused_activations
    from layerscope.graph.session import unknown_ops

    loaded = load_for_inspection(source).weight_free()  # the graph alone: shape inference on the weights is slow
    tensors = describe_tensors(loaded.proto, loaded.layer_of)
    inputs = [t for t in tensors if t.role == "input"]
    fused = fused_activations(loaded.proto)
    attention = find_attention(tensors)
    unknown = unknown_ops(loaded.proto)
    if as_json:
        print(
            json.dumps(
                {
                    "model": loaded.source,
                    "label": loaded.label,
                    "framework": loaded.framework,
                    "inputs": [t.to_dict() for t in inputs],
                    "attention": [a.output for a in attention],
                    "fused_activations": fused,
                    "unknown_ops": unknown,
                    "tensors": [t.to_dict() for t in tensors],
                },
                indent=2,
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    shown = (
        tensors
        if show_all
        else [t for t in tensors if t.observable or t.reason not in ("constant", "shape arithmetic")]
    )
    table = Table(title=f"{loaded.source} ({loaded.framework}, {len(tensors)} tensors)")
    for column in ("tensor", "op type", "layer", "dtype", "shape", "observable"):
        table.add_column(column)
    for t in shown:
        table.add_row(
            t.name,
            t.op_type,
            t.layer,
            t.dtype or "?",
            format_dims(t.shape),
            "yes" if t.observable else f"no: {t.reason}",
        )
    console = Console()
    console.print(table)
    console.print("inputs: " + ", ".join(f"{t.name} ({t.dtype}, {format_dims(t.shape)})" for t in inputs))
    if attention:
        console.print(f"attention softmaxes ({{attention: probabilities}}): {len(attention)}")
    for line in fused:
        console.print(line)
    if unknown:
        console.print(f"onnxruntime cannot run the model: it has no op {', '.join(unknown)}")
    hidden = Counter(t.reason for t in tensors if t not in shown)
    if hidden:
        console.print("not shown (use --all): " + ", ".join(f"{n} {reason}" for reason, n in hidden.items()))
