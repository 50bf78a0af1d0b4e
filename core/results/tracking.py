"""Records as an experiment tracker sees them: named series of numbers over a step axis.

- A record's **series name** is ``<analysis>/<metric>/[<network>/]<layer>`` followed by ``/<key>_<value>`` for
  each of :data:`SERIES_KEYS` it has (``entropy/entropy/relu1/class_3``, ``agg/fit_kl/pool/class_all/channel_2``).
  Records of one checkpoint that still share a name are told apart by the other keys whose values differ
  between them, in key order.
- Records with the keys of :data:`BIN_KEYS` are the bins of a **histogram** (as ``aggregation_distribution``
  records its ``histogram`` metric): the bins of one series name form one histogram, whose bin *i* spans
  ``bin_center ± bin_width / 2`` and weighs ``value · bin_width`` when the unit is ``density`` (the bin's
  probability mass), else ``value``.
- The **step** of a checkpoint (:func:`checkpoint_steps`) is its training step when known, else its place
  among the checkpoints of its network (0 for a model without checkpoints).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .contract import Results

#: Record keys that tell the numbers of one analysis, metric and layer apart, in the order names show them.
SERIES_KEYS = ("class", "channel", "node", "feature", "group")
#: The keys of a histogram bin: its index, centre and width.
BIN_KEYS = ("bin", "bin_center", "bin_width")
#: Keys that describe a record rather than tell it apart from the other records of its checkpoint.
_NOT_IDENTIFYING = {"analysis", "metric", "layer", "network", "value", "unit", "estimator", "model", "step", "tensor"}


@dataclass
class Histogram:
    """One histogram: its series name, the ``len(weights) + 1`` bin edges in increasing order, each bin's weight."""

    name: str
    edges: list[float]
    weights: list[float]

    @property
    def centers(self) -> list[float]:
        return [(low + high) / 2 for low, high in zip(self.edges, self.edges[1:])]


def series_name(record: dict[str, Any]) -> str:
    """The record's series name (module docstring), without the keys that only tell apart colliding records."""
    parts = [str(record["analysis"]), str(record["metric"])]
    if record.get("network") is not None:
        parts.append(str(record["network"]))
    parts.append(str(record["layer"]))
    parts += [f"{key}_{record[key]}" for key in SERIES_KEYS if record.get(key) is not None]
    return "/".join(parts)


def is_histogram_bin(record: dict[str, Any]) -> bool:
    return all(key in record for key in BIN_KEYS)


def _identity(record: dict[str, Any], ignored: tuple[str, ...]) -> str:
    """The record's keys beyond its series name (those not in *ignored*), as text."""
    skipped = _NOT_IDENTIFYING | set(SERIES_KEYS) | set(ignored)
    return json.dumps({k: v for k, v in record.items() if k not in skipped}, sort_keys=True, default=str)


def _named_groups(records: list[dict[str, Any]], ignored: tuple[str, ...] = ()) -> dict[str, list[dict[str, Any]]]:
    """*records* grouped by series name and the rest of their keys but *ignored*; where several groups share a
    series name, each name is extended by ``/<key>_<value>`` for the keys whose values differ between them."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[(series_name(record), _identity(record, ignored))].append(record)
    sharing: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (name, _), members in groups.items():
        sharing[name].append(members[0])
    named = {}
    for (name, _), members in groups.items():
        if len(sharing[name]) > 1:
            others = sharing[name]
            keys = sorted({k for r in others for k in r} - _NOT_IDENTIFYING - set(SERIES_KEYS) - set(ignored))
            differing = [k for k in keys if len({json.dumps(r.get(k), default=str) for r in others}) > 1]
            name = "/".join([name, *(f"{k}_{members[0].get(k)}" for k in differing)])
        named[name] = members
    return named


def scalars_and_histograms(records: list[dict[str, Any]]) -> tuple[dict[str, float], list[Histogram]]:
    """The records of one checkpoint as ``{series name: value}`` and the histograms their bins form; a
    ValueError for records that differ in nothing but their value."""
    scalars = {}
    for name, members in _named_groups([r for r in records if not is_histogram_bin(r)]).items():
        if len(members) > 1:
            raise ValueError(f"records of the series '{name}' differ in nothing but their value: {members[:2]}")
        scalars[name] = float(members[0]["value"])
    histograms = []
    for name, members in _named_groups([r for r in records if is_histogram_bin(r)], BIN_KEYS).items():
        members = sorted(members, key=lambda r: float(r["bin_center"]))
        edges = [float(r["bin_center"]) - float(r["bin_width"]) / 2 for r in members]
        edges.append(float(members[-1]["bin_center"]) + float(members[-1]["bin_width"]) / 2)
        weights = [float(r["value"]) * (float(r["bin_width"]) if r.get("unit") == "density" else 1.0) for r in members]
        histograms.append(Histogram(name, edges, weights))
    return scalars, histograms


def checkpoint_steps(results: Results) -> list[tuple[int, list[dict[str, Any]]]]:
    """``(step, records)`` for every checkpoint of *results* with records, by step (module docstring); the
    checkpoints of several networks that share a step are logged together (their names differ by network)."""
    steps: dict[Any, int] = {}
    seen: dict[Any, int] = defaultdict(int)
    for model in results.models:
        step = model.get("step")
        steps[model.get("label")] = int(step) if step is not None else seen[model.get("network")]
        seen[model.get("network")] += 1
    grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in results.records:
        grouped[steps.get(record.get("model"), 0)].append(record)
    return sorted(grouped.items())


def flat_parameters(value: Any, prefix: str = "") -> dict[str, str]:
    """*value* (a resolved spec) as ``{dotted key: text}``: mappings by key, lists of mappings with an ``id``
    (the analyses) by id, other lists as JSON, None left out; e.g. ``analyses.entropy.params.variant``."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list) and value and all(isinstance(v, dict) and "id" in v for v in value):
        items = [(v["id"], {k: w for k, w in v.items() if k != "id"}) for v in value]
    else:
        if value is None:
            return {}
        return {prefix: value if isinstance(value, str) else json.dumps(value, default=str)}
    flat: dict[str, str] = {}
    for key, item in items:
        flat.update(flat_parameters(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat
