"""Records as pivot tables for the HTML report: a row per layer (and model, channel, node or feature), a
column per metric — or, for a metric recorded per class, a column per class."""

from __future__ import annotations

from dataclasses import dataclass

from layerscope.results.contract import class_order

#: Record fields that index values within a layer: each gets a row of its own.
INDEX_KEYS = ("channel", "node", "feature")


@dataclass
class Pivot:
    """One table: ``rows`` are dicts over ``columns`` (the row keys first, then the value columns)."""

    title: str
    columns: list[str]
    rows: list[dict]


def _header(metric: str, records: list[dict]) -> str:
    unit = next((r.get("unit") for r in records if r["metric"] == metric and r.get("unit")), "")
    return f"{metric} [{unit}]" if unit else metric


def _pivot(title: str, records: list[dict], row_keys: list[str], column_of, columns: list) -> Pivot:
    """Rows keyed by *row_keys* (first-appearance order), the value of each record in column ``column_of(record)``."""
    keys = [k for k in row_keys if any(k in r for r in records)]
    rows: dict[tuple, dict] = {}
    for record in records:
        identity = tuple(record.get(k, "") for k in keys)
        rows.setdefault(identity, dict(zip(keys, identity)))[str(column_of(record))] = record["value"]
    return Pivot(title, keys + [str(c) for c in columns], list(rows.values()))


def pivot_records(records: list[dict]) -> list[Pivot]:
    """The pivot tables of one analysis's records: the metrics without classes together (a column each), then one
    table per metric recorded for several classes (a column per class). Rows: layer, then model when there are
    several, then any of :data:`INDEX_KEYS` the records carry."""
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    several_models = len({r["model"] for r in records}) > 1
    row_keys = ["layer"] + (["model"] if several_models else []) + list(INDEX_KEYS)
    by_metric = {m: [r for r in records if r["metric"] == m] for m in metrics}
    per_class = [m for m in metrics if len({r.get("class") for r in by_metric[m]}) > 1]
    plain = [m for m in metrics if m not in per_class]
    tables = []
    if plain:
        chosen = [r for r in records if r["metric"] in plain]
        headers = {m: _header(m, chosen) for m in plain}
        tables.append(_pivot("by layer", chosen, row_keys, lambda r: headers[r["metric"]], list(headers.values())))
    for metric in per_class:
        classes = class_order(r.get("class", "all") for r in by_metric[metric])
        tables.append(
            _pivot(
                f"{_header(metric, by_metric[metric])} by class",
                by_metric[metric],
                row_keys,
                lambda r: r.get("class", "all"),
                classes,
            )
        )
    return tables
