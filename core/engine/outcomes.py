"""What a finished checkpoint contributes to ``results.json``: its records, warnings, model details
and failures (:class:`CheckpointOutcome`), built from its merged
:class:`~layerscope.engine.lifecycle.CheckpointState`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from layerscope.results.contract import records_in_range

if TYPE_CHECKING:
    from layerscope.model.adapter import Checkpoint

    from .lifecycle import CheckpointState
    from .plan import RunPlan


@dataclass
class CheckpointOutcome:
    """One checkpoint's share of the results (plain data: it is what ``--resume`` saves)."""

    records: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    model: dict = field(default_factory=dict)  # the entry of results.json's ``models``
    failures: list[dict] = field(default_factory=list)
    #: Seconds spent in each analysis's estimator code on this checkpoint, by analysis id.
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def finish_checkpoint(plan: RunPlan, state: CheckpointState, checkpoint: Checkpoint) -> CheckpointOutcome:
    """Finalize every estimator of *state* (of *checkpoint*): tidy records tagged with analysis,
    estimator, model (the checkpoint's label), the model's label in a multi-model spec (``network``)
    and the checkpoint's training ``step`` when known (class codes named as the data names them,
    values outside a metric's range dropped), the warnings of the estimators and of the model's
    tensors, a line per failed analysis, and the model details with the tensors each analysis read."""
    isolation, estimators, label = state.isolation, state.estimators, state.label
    records: list[dict] = []
    warnings: list[str] = []
    tags = {
        key: value for key, value in (("network", checkpoint.network), ("step", checkpoint.step)) if value is not None
    }
    by_id = {p.section.id: p for p in plan.analyses}
    for analysis_id, estimator in estimators:
        finished = isolation.call(analysis_id, estimator, "finalize", estimator.finalize) or []
        finished = records_in_range(finished, estimator.value_range, warnings, f"{analysis_id} ({label})")
        records += [
            {
                "analysis": analysis_id,
                "estimator": by_id[analysis_id].section.estimator,
                "model": label,
                **tags,
                **record,
                **_named_class(plan, record),
            }
            for record in finished
        ]
        if analysis_id not in isolation.failures:
            warnings += [f"{analysis_id} ({label}): {w}" for w in estimator.collect_warnings()]
    warnings += list(dict.fromkeys(isolation.warnings))
    for failure in isolation.failures.values():
        warnings.append(
            f"{failure['analysis']} ({label}): estimator '{failure['estimator']}' of plugin "
            f"'{failure['plugin']}' failed in {failure['phase']}: {failure['error']}; "
            "its results are missing, the other analyses completed"
        )
    analysed = {name: info for _, est in estimators for name, info in est.tensors.items()}
    model = {
        **state.model_info,
        **tags,
        "provider": state.provider,
        "fetch_groups": [fetch["groups"] for fetch in state.fetches],
        "passes": state.passes,
        "peak_fetched_bytes": max((fetch["peak_fetched_bytes"] for fetch in state.fetches), default=0),
        "tensors": [
            {k: v for k, v in info.to_dict().items() if k in ("name", "layer", "op_type", "shape", "layout")}
            | {"analyses": [aid for aid, est in estimators if name in est.tensors]}
            for name, info in sorted(analysed.items(), key=lambda item: item[1].order)
        ],
    }
    return CheckpointOutcome(
        records,
        warnings,
        model,
        list(isolation.failures.values()),
        {aid: round(seconds, 6) for aid, seconds in isolation.seconds.items()},
    )


def _named_class(plan: RunPlan, record: dict) -> dict:
    """A record's ``class`` as the data names it (estimators see class codes; see layerscope.data.labels)."""
    return {"class": plan.classes.decode(record["class"])} if "class" in record and plan.classes else {}
