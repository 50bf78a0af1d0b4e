"""Batches and constructed data with known answers, for estimator tests."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from layerscope.engine.estimator import DataBatch, PlanEstimator, TensorBatch
from layerscope.graph.tensors import TensorInfo


def make_batches(
    tensors: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    batch_size: int = 32,
    inputs: np.ndarray | None = None,
) -> list[TensorBatch]:
    """Split whole arrays (first axis = sample) into :class:`TensorBatch` objects as the runner would."""
    size = len(next(iter(tensors.values())))
    inputs = inputs if inputs is not None else np.zeros((size, 1), dtype=np.float32)
    batches = []
    for start in range(0, size, batch_size):
        part = slice(start, start + batch_size)
        batches.append(
            TensorBatch(
                tensors={name: torch.as_tensor(np.ascontiguousarray(values[part])) for name, values in tensors.items()},
                inputs=torch.as_tensor(np.ascontiguousarray(inputs[part])),
                labels=None if labels is None else torch.as_tensor(np.asarray(labels[part])),
                start=start,
            )
        )
    return batches


def tensor_infos(batches: list[TensorBatch], op_type: str = "Relu") -> list[TensorInfo]:
    """:class:`TensorInfo` for every tensor in *batches* (layer name = tensor name)."""
    first = batches[0]
    return [
        TensorInfo(
            name=name,
            op_type=op_type,
            layer=name,
            dtype=str(value.numpy().dtype),
            shape=("batch", *value.shape[1:]),
            observable=True,
        )
        for name, value in first.tensors.items()
    ]


def exact_on_pattern(on_fractions: list[float], samples: int, seed: int = 0) -> np.ndarray:
    """A (samples, neurons) 0/1 matrix where neuron j is on in exactly round(f_j·samples) rows (shuffled)."""
    rng = np.random.default_rng(seed)
    columns = []
    for fraction in on_fractions:
        column = np.zeros(samples, dtype=np.float32)
        column[: int(round(fraction * samples))] = 1.0
        columns.append(rng.permutation(column))
    return np.stack(columns, axis=1)


def plan_batches(
    estimator: PlanEstimator, x: np.ndarray, y: np.ndarray | None, function, batch_size: int = 32, parts: int = 1
) -> list[TensorBatch]:
    """Evaluate *estimator*'s input plan over data *x* (labels *y*) with *function* (rows → dict of
    named output arrays), as the engine does; each plan batch is delivered in *parts* row slices."""
    batches = []
    for start in range(0, len(x), batch_size):
        stop = start + batch_size + estimator.lookahead
        data = DataBatch(x[start:stop], None if y is None else y[start:stop], start, min(batch_size, len(x) - start))
        for plan in estimator.input_plan(data):
            outputs = function(plan.inputs)
            edges = np.linspace(0, len(plan.inputs), parts + 1).astype(int)
            for begin, end in zip(edges[:-1], edges[1:]):
                batches.append(
                    TensorBatch(
                        tensors={
                            name: torch.as_tensor(np.ascontiguousarray(v[begin:end])) for name, v in outputs.items()
                        },
                        inputs=torch.as_tensor(plan.inputs[begin:end]),
                        start=start,
                        plan=plan,
                        rows=slice(begin, end),
                    )
                )
    return batches
