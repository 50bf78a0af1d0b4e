"""The paper gallery's claims (specs/papers/*/README.md): each entry's stated outcome, asserted on a
reduced run, so that a change that breaks a reproduction fails here. Sizes and tolerances are in each
test; the full-size numbers are in the READMEs."""

from __future__ import annotations

from pathlib import Path

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
