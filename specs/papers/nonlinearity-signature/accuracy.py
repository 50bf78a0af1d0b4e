"""The non-linearity signature against test accuracy, over every epoch of the three demo models.

    python specs/papers/nonlinearity-signature/accuracy.py [RESULTS_DIR]

Runs ``training.yaml`` (or reads the ``results.json`` of a run of it in RESULTS_DIR) and prints, per
checkpoint, the test accuracy the demo zoo recorded and the largest and mean affinity score of the
signature, then Spearman's correlation of the largest score with accuracy, over all checkpoints and
within each model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import layerscope

SPEC = Path(__file__).with_name("training.yaml")


def signature_and_accuracy(results: layerscope.Results) -> dict[tuple[str, int], dict[str, float]]:
    """Per checkpoint (network, epoch): its test accuracy and the largest and mean affinity score."""
    scores: dict[tuple[str, int], list[float]] = {}
    for record in results.records:
        if record["metric"] == "affinity_score":
            scores.setdefault((record["network"], record["step"]), []).append(record["value"])
    return {
        (model["network"], model["step"]): {
            "accuracy": model["test_accuracy"],
            "max": max(scores[model["network"], model["step"]]),
            "mean": float(np.mean(scores[model["network"], model["step"]])),
        }
        for model in results.models
    }


def correlations(table: dict[tuple[str, int], dict[str, float]]) -> dict[str, float]:
    """Spearman's ρ of the largest affinity score with accuracy: over all checkpoints (``all``) and within
    each network across its epochs."""
    groups = {"all": list(table)} | {net: [k for k in table if k[0] == net] for net in sorted({k[0] for k in table})}
    return {
        name: float(spearmanr([table[k]["max"] for k in keys], [table[k]["accuracy"] for k in keys])[0])
        for name, keys in groups.items()
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    results = layerscope.Results.load(argv[0]) if argv else layerscope.run(SPEC, progress=False)
    table = signature_and_accuracy(results)
    print("network  epoch  accuracy  max score  mean score")
    for (network, epoch), row in sorted(table.items()):
        print(f"{network:8} {epoch:5d}  {row['accuracy']:8.3f}  {row['max']:9.3f}  {row['mean']:10.3f}")
    rho = correlations(table)
    print("Spearman (largest score, accuracy): " + ", ".join(f"{name} {value:+.2f}" for name, value in rho.items()))
    return rho


if __name__ == "__main__":
    main()
