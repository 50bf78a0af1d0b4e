"""``layerscope compare``: the runs of several specs in one set of figures.

:func:`combine` puts the results of several runs into one :class:`Results` as if they were the
models of one multi-model spec: each run's records are tagged ``network: <run label>`` (the
run's spec name, or its folder name when names repeat), its models labelled ``<run label>`` (a run
of one checkpoint) or ``<run label>/<checkpoint>``. The reporters then draw every run in the same
figure, as they draw the models of a ``models:`` spec.
"""

from __future__ import annotations

from pathlib import Path

from layerscope.util.errors import UserError

from .contract import Results


def run_labels(runs: list[Results], folders: list[Path]) -> list[str]:
    """A label per run: its spec's name, or its folder's name (then its path) where names repeat."""
    for candidates in ([r.spec.get("name", "") for r in runs], [f.name for f in folders], [str(f) for f in folders]):
        if all(candidates) and len(set(candidates)) == len(candidates):
            return candidates
    return [f"run{index}" for index in range(len(runs))]


def combine(runs: list[Results], labels: list[str]) -> Results:
    """One :class:`Results` holding every run (module docstring); analyses are matched by id and must
    use the same estimator in every run that has them."""
    analyses: dict[str, dict] = {}
    records, models, warnings = [], [], []
    for run, label in zip(runs, labels):
        for analysis in run.analyses:
            known = analyses.setdefault(analysis["id"], analysis)
            if known["estimator"] != analysis["estimator"]:
                raise UserError(
                    f"compare: analysis '{analysis['id']}' is '{known['estimator']}' in one run and "
                    f"'{analysis['estimator']}' in run {label}; give runs whose analyses agree"
                )
        single = len(run.models) == 1
        models += [_renamed(model, label, single) for model in run.models]
        records += [_renamed(record, label, single) for record in run.records]
        warnings += [f"{label}: {w}" for w in run.warnings]
    compared = [{"label": label, "layerscope": run.layerscope, **run.runtime} for run, label in zip(runs, labels)]
    return Results(
        layerscope=runs[0].layerscope,
        spec={
            "name": "compare: " + ", ".join(labels),
            "runs": labels,
            "specs": {label: run.spec for label, run in zip(labels, runs)},
        },
        runtime={
            **_agreed(compared),
            "compared": compared,
            "seconds": round(sum(run.runtime.get("seconds") or 0 for run in runs), 3),
        },
        models=models,
        records=records,
        warnings=warnings,
        analyses=list(analyses.values()),
        failures=[f for run in runs for f in run.failures],
    )


#: Entries of a compared run's runtime that are its own, never shared: its identity, its time, its version (at the top
#: of the results already), the runs it compares itself.
OWN_KEYS = ("label", "run_id", "seconds", "layerscope", "compared")


def _agreed(runtimes: list[dict]) -> dict:
    """The runtime entries every run has with the same value (the versions, device and seed of runs made alike),
    but for :data:`OWN_KEYS`."""
    first, *others = runtimes
    return {
        key: value
        for key, value in first.items()
        if key not in OWN_KEYS and all(key in other and other[key] == value for other in others)
    }


def _renamed(entry: dict, label: str, single: bool) -> dict:
    """A model entry or record of the run *label* with its network, model and label prefixed by *label*
    (a run of one model is named by *label* alone)."""
    network = entry.get("network")
    return {
        **entry,
        "network": label if network is None else f"{label}/{network}",
        **({"model": label if single else f"{label}/{entry['model']}"} if "model" in entry else {}),
        **({"label": label if single else f"{label}/{entry['label']}"} if "label" in entry else {}),
    }
