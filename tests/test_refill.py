"""New weights computed into an optimised graph (layerscope.adapters.refill): the optimiser's own bytes, or no
refill at all when a weight of the optimised graph follows from the module's in a way not recognised."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import layerscope
from layerscope.adapters import torch_export
from layerscope.adapters.export_cache import with_weights
from layerscope.adapters.refill import Copied, FoldedBias, FoldedWeight, learn_refill, module_state
from layerscope.adapters.torch_export import export_unoptimized, optimized
from layerscope.graph.weights import weight_free
from layerscope.testing import assert_records_close


class Block(nn.Module):
    """ResNet's basic block: two convolutions without bias, each followed by a BatchNorm, and the skip."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Block(8), nn.Flatten(), nn.Linear(8 * 36, 5)
    )


def linear_batchnorm() -> nn.Module:
    """A BatchNorm after a Linear layer: the optimiser folds it into the Gemm, a fold not recognised here."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(108, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


def stepped(model: nn.Module, steps: int = 2) -> nn.Module:
    """*model* after *steps* SGD steps in train mode (the BatchNorms' running statistics move too)."""
    generator = torch.Generator().manual_seed(1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 6, 6, generator=generator), torch.randint(0, 5, (16,), generator=generator)
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model


EXAMPLE = np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype(np.float32)


def test_folded_weight_and_bias_are_the_batchnorm_closed_form():
    """W·γ/√(σ²+ε) per output channel and (b − μ)·γ/√(σ²+ε) + β, on numbers worked by hand (ε = 0)."""
    state = {
        "w": np.array([[[[1.0]]], [[[2.0]]]], np.float32),
        "b": np.array([1.0, -1.0], np.float32),
        "gamma": np.array([2.0, 3.0], np.float32),
        "beta": np.array([0.5, 0.0], np.float32),
        "mean": np.array([3.0, 1.0], np.float32),
        "var": np.array([4.0, 9.0], np.float32),
    }
    weight = FoldedWeight("w", "gamma", "var", 0.0).value(state)
    assert weight.shape == (2, 1, 1, 1) and weight.ravel().tolist() == [1.0, 2.0]  # scales 2/2 and 3/3
    assert FoldedBias("b", "gamma", "beta", "mean", "var", 0.0).value(state).tolist() == [-1.5, -2.0]
    assert FoldedBias(None, "gamma", "beta", "mean", "var", 0.0).value(state).tolist() == [-2.5, -1.0]


def test_a_refill_gives_the_optimisers_bytes_for_new_weights():
    """Learnt on one state, the refill of another is the optimiser's graph for it byte for byte: the graph
    apart from its weights, and the weights."""
    model = resnet_like()
    raw = export_unoptimized(model, EXAMPLE)
    stepped(model, 1)
    proto = optimized(with_weights(raw, model.state_dict(), unused=True))
    refill = learn_refill(raw, proto, module_state(model.state_dict()), optimized)
    assert refill is not None
    kinds = sorted(type(d).__name__ for d in refill.derived.values())
    assert kinds == sorted(["Copied"] * 2 + ["FoldedWeight"] * 3 + ["FoldedBias"] * 3)
    assert refill.derived["0.bias"] == FoldedBias(
        "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", float(np.float32(1e-5))
    )

    stepped(model, 2)
    state = module_state(model.state_dict())
    graph, weights = refill.graph(state)
    expected_graph, expected_weights = weight_free(optimized(with_weights(raw, model.state_dict(), unused=True)))
    assert graph.SerializeToString() == expected_graph.SerializeToString()
    assert weights.fingerprint(graph) == expected_weights.fingerprint(expected_graph)
    for tensor in expected_graph.graph.initializer:
        assert np.array_equal(weights.array(graph, tensor.name), expected_weights.array(expected_graph, tensor.name))


def test_an_unrecognised_fold_gives_no_refill():
    model = linear_batchnorm()
    raw = export_unoptimized(model, EXAMPLE)
    proto = optimized(raw)
    assert "BatchNormalization" not in {node.op_type for node in proto.graph.node}  # folded into the Gemm
    assert learn_refill(raw, proto, module_state(model.state_dict()), optimized) is None


def test_a_weight_that_moves_with_no_known_derivation_gives_no_refill():
    """An optimiser whose output holds a weight computed in a way not known (here: doubled) is not refilled,
    even where the parameter keeps its name."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 5))
    raw = export_unoptimized(model, EXAMPLE)

    def doubling(graph: onnx.ModelProto) -> onnx.ModelProto:
        proto = optimized(graph)
        for index, tensor in enumerate(proto.graph.initializer):
            if tensor.name == "1.weight":
                doubled = onnx.numpy_helper.to_array(tensor) * 2
                proto.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(doubled, tensor.name))
        return proto

    state = module_state(model.state_dict())
    assert learn_refill(raw, optimized(raw), state, optimized).derived == {
        "1.weight": Copied("1.weight"),
        "1.bias": Copied("1.bias"),
    }
    assert learn_refill(raw, doubling(raw), state, doubling) is None


def spec():
    return {"model": {}, "data": {"shuffle": False}, "analyses": [{"id": "entropy", "estimator": "activation_entropy"}]}


def probe():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(64, 3, 6, 6, generator=generator), torch.randint(0, 5, (64,), generator=generator)


@pytest.mark.parametrize("make, refilled", [(resnet_like, True), (linear_batchnorm, False)])
def test_the_monitor_refills_what_it_recognises_and_optimises_the_rest(monkeypatch, make, refilled):
    """Records equal to a fresh run at every step either way (float32 round-off apart: kept sessions run at
    onnxruntime's extended level); the optimiser runs at every step only where no refill was learnt."""
    calls = []
    real = torch_export.optimized
    monkeypatch.setattr(torch_export, "optimized", lambda graph: calls.append(1) or real(graph))
    model, batch = make(), probe()
    monitor = layerscope.Monitor(spec())
    for step in range(4):
        stepped(model, 1)
        got = monitor.observe(model, step=step, batch=batch)
        before = len(calls)
        fresh = layerscope.run({**spec(), "model": {"source": model}}, data=batch, write=False, progress=False)
        del calls[before:]  # the fresh run's own export
        assert_records_close(got, [{**r, "model": f"step_{step}", "step": step} for r in fresh.records], rtol=1e-6)
    # the export, the second step's and the second optimisation of the learning; then every step's or none
    assert len(calls) == (3 if refilled else 5)


def test_a_first_refill_that_does_not_reproduce_the_model_is_dropped(monkeypatch):
    """The first refill is checked against the module itself: a wrong derivation (here a BatchNorm's ε made
    0.5) is caught there, and that step and the later ones are optimised as before."""
    model, batch = resnet_like(), probe()
    monitor = layerscope.Monitor(spec())
    for step in range(2):
        stepped(model, 1)
        monitor.observe(model, step=step, batch=batch)
    (architecture, refill), *_ = monitor._adapter._refills.items()
    name, derivation = next((n, d) for n, d in refill.derived.items() if isinstance(d, FoldedWeight))
    refill.derived[name] = FoldedWeight(derivation.weight, derivation.gamma, derivation.variance, 0.5)
    stepped(model, 1)
    got = monitor.observe(model, step=2, batch=batch)
    assert monitor._adapter._refills[architecture] is None
    fresh = layerscope.run({**spec(), "model": {"source": model}}, data=batch, write=False, progress=False)
    assert_records_close(got, [{**r, "model": "step_2", "step": 2} for r in fresh.records], rtol=1e-6)


class Offset(nn.Module):
    """A linear layer whose output is shifted by an integer buffer the forward reads."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(108, 5)
        self.register_buffer("offset", torch.tensor([0], dtype=torch.int64))

    def forward(self, x):
        return self.linear(x.flatten(1)) + self.offset


def test_an_integer_buffer_that_changes_is_optimised_again():
    """Integer buffers are not shifted when the refill is learnt, so it holds only while they keep their values:
    a changed one sends the step back to the optimiser, and the records follow it."""
    model, batch = Offset(), probe()
    analyses = {"analyses": [{"id": "entropy", "estimator": "activation_entropy", "on": {"op_type": "Add"}}]}
    monitor = layerscope.Monitor({**spec(), **analyses})
    for step in range(3):
        got = monitor.observe(model, step=step, batch=batch)
    assert min(r["value"] for r in got if r["metric"] == "entropy") > 0.5  # units on for some samples
    (architecture, refill), *_ = monitor._adapter._refills.items()
    assert refill is not None and refill.fixed["offset"].tolist() == [0]
    model.offset.fill_(-1000)  # every output negative: no unit is ever on
    got = monitor.observe(model, step=3, batch=batch)
    assert {r["value"] for r in got if r["metric"] == "entropy"} == {0.0}
    assert monitor._adapter._refills[architecture] is None
