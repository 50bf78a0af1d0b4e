"""The paper gallery's claims (specs/papers/*/README.md): each entry's stated outcome, asserted on a
reduced run, so that a change that breaks a reproduction fails here. Sizes and tolerances are in each
test; the full-size numbers are in the READMEs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

import layerscope
from layerscope.spec.yaml_locations import load_yaml

PAPERS = Path(__file__).parent.parent / "specs" / "papers"


def entry_spec(entry: str, name: str) -> dict:
    """The gallery spec *entry*/*name* as layerscope reads it, to be reduced by the test."""
    path = PAPERS / entry / name
    spec = load_yaml(path.read_text(), str(path)).data
    spec.pop("outputs", None)
    return spec


def values(results: layerscope.Results, metric: str, *keys: str) -> dict[tuple, float]:
    """{(record[key] for key in keys): value} of the records of *metric*."""
    return {tuple(r[k] for k in keys): r["value"] for r in results.records if r["metric"] == metric}


def test_mean_dimension_falls_at_the_output_in_every_checkpoint():
    """README: in every checkpoint the output has the lowest mean dimension of its network (full size,
    epochs 1 and 10)."""
    spec = entry_spec("mean-dimension", "architectures.yaml")
    for model in spec["models"]:
        model["checkpoints"] = ["epoch_01", "epoch_10"]
    results = layerscope.run(spec, write=False, progress=False)
    md = values(results, "mean_dimension", "network", "step", "layer")
    for network, output in (("mlp", "out"), ("cnn", "fc2")):
        for step in (1, 10):
            layers = {layer: v for (n, s, layer), v in md.items() if (n, s) == (network, step)}
            assert len(layers) == 4, (network, step, layers)
            hidden = min(v for layer, v in layers.items() if layer != output)
            assert layers[output] < hidden, (network, step, layers)


def test_aggregation_predicts_means_and_ranks_but_not_the_spread_of_the_output_nodes():
    """README, at epoch 10 on the 450 test digits: channel means within 4 % (median), output-node
    variances under-predicted by about 70 % (channels taken as independent), the predicted KL
    ranking the output nodes as the measured KL does (Spearman 0.66) but about twice as large."""
    spec = entry_spec("aggregation", "gap.yaml")
    spec["model"]["checkpoints"] = ["epoch_10"]
    results = layerscope.run(spec, write=False, progress=False)
    predicted, measured = (values(results, m, "channel", "class") for m in ("predicted_mean", "empirical_mean"))
    pooled = [predicted[k] / measured[k] - 1 for k in predicted if k[1] == "all" and measured[k] > 1e-6]
    assert len(pooled) >= 30 and np.median(np.abs(pooled)) < 0.08
    node_predicted, node_measured = (
        values(results, m, "node", "class") for m in ("node_predicted_var", "node_empirical_var")
    )
    under = np.median([node_predicted[k] / node_measured[k] - 1 for k in node_predicted])
    assert -0.9 < under < -0.4
    kl_predicted, kl_measured = (values(results, m, "node", "class") for m in ("kl_predicted", "kl_empirical"))
    pairs = np.array([(kl_predicted[k], kl_measured[k]) for k in kl_predicted])
    assert len(pairs) == 100 and spearmanr(pairs[:, 0], pairs[:, 1])[0] > 0.45
    assert 1.3 < np.median(pairs[:, 0] / pairs[:, 1]) < 3.5


def load_script(entry: str, name: str):
    """The gallery script *entry*/*name* as a module."""
    loaded = importlib.util.spec_from_file_location(f"gallery_{name[:-3]}", PAPERS / entry / name)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_signature_separates_architectures_and_falls_as_each_model_learns():
    """README, at 300 samples instead of 1 797: at epoch 10 the mean affinity score orders MLP > CNN >
    GAP-CNN; within each model the largest score falls as test accuracy rises (Spearman below −0.5,
    full size −0.78 to −0.81), while over all 30 checkpoints it does not track accuracy (full size
    +0.25)."""
    script = load_script("nonlinearity-signature", "accuracy.py")
    spec = entry_spec("nonlinearity-signature", "training.yaml")
    spec["analyses"][0]["params"]["samples"] = 300
    table = script.signature_and_accuracy(layerscope.run(spec, write=False, progress=False))
    assert len(table) == 30
    assert table["mlp", 10]["mean"] > table["cnn", 10]["mean"] > table["gap-cnn", 10]["mean"]
    rho = script.correlations(table)
    assert max(rho["mlp"], rho["cnn"], rho["gap-cnn"]) < -0.5, rho
    assert abs(rho["all"]) < 0.5, rho


DEFAULTS = {"smoothing": 0.0, "sigma_grid": 300}  # information_plane's defaults, in place of the paper's


@pytest.mark.slow
def test_information_plane_compresses_in_the_late_layers_once_accurate():
    """README, observing once per epoch instead of every iteration, with the estimator's default
    smoothing and width grid: after 40 epochs the CNN is above 95 % test accuracy, and I(X;T) has
    fallen from its peak by more than 0.8 bits in the output layer and 0.15 bits in the last hidden
    layer (full size 1.28 and 0.32), while I(T;Y) of the output has risen."""
    script = load_script("information-plane", "train.py")
    results, accuracies = script.train(epochs=40, every=13, iterations=None, overrides=DEFAULTS, out=None)
    assert len({r["step"] for r in results.records}) == 40
    assert accuracies[-1] > 0.95
    fall = script.compression(results, window=3)
    assert fall["fc2"]["fall"] > 0.8 and fall["relu3"]["fall"] > 0.15, fall
    i_ty = sorted((r["step"], r["value"]) for r in results.records if r["metric"] == "I_TY" and r["layer"] == "fc2")
    assert np.mean([v for _, v in i_ty[-3:]]) > np.mean([v for _, v in i_ty[:3]]) + 0.2


def test_activation_entropy_rises_in_the_late_layers():
    """README, on 200 digits instead of 450: the pooled entropy of relu2 and relu3 rises over epochs
    1, 3, 10 while relu1's stays within 0.05 bits."""
    spec = entry_spec("activation-entropy", "per-class.yaml")
    spec["data"]["limit"] = 200
    entropy = values(layerscope.run(spec, write=False, progress=False), "entropy", "layer", "step", "class")
    for layer in ("relu2", "relu3"):
        assert entropy[layer, 1, "all"] < entropy[layer, 3, "all"] < entropy[layer, 10, "all"], layer
    assert max(abs(entropy["relu1", step, "all"] - entropy["relu1", 1, "all"]) for step in (3, 10)) < 0.05
