"""The results contract: ``results.json`` with tidy records, written atomically by core."""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "json"  # the ``outputs.formats`` entry of results.json, which core always writes
RESULTS_KEYS = ("layerscope", "spec", "runtime", "models", "records", "warnings", "artifacts", "analyses", "failures")


def new_run_id() -> str:
    """A run's identifier: its UTC start time and 6 random hex digits (``20261203T2105-3fa2c1``)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass
class Results:
    """Everything a run produced: provenance, tidy records, warnings and artifacts."""

    layerscope: str
    spec: dict[str, Any]
    runtime: dict[str, Any]
    models: list[dict[str, Any]]
    records: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    analyses: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    #: Where tracking reporters logged the run (``"<format>: <where>"``), once it is written; not in results.json.
    logged_to: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("out_dir")
        data.pop("logged_to")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_pandas(self):
        """The records as a :class:`pandas.DataFrame`, one row per number, with the record fields and:

        - ``run_id``: the run's identifier (``runtime.run_id``);
        - ``checkpoint_index``: the position of the record's model in ``models`` (training order; sort
          by it, not by the label, which sorts epoch_10 before epoch_2);
        - ``step``: the checkpoint's training step or epoch when known (nullable integer);
        - ``class``: text, ``"all"`` for records over every sample and the class name or number
          otherwise, as an ordered categorical with ``"all"`` first and classes in natural order
          (empty when the record has no class).
        """
        try:
            import pandas as pd
        except ImportError as error:
            raise ImportError("Results.to_pandas() needs pandas: pip install pandas") from error
        frame = pd.DataFrame.from_records(self.records)
        frame.insert(0, "run_id", self.runtime.get("run_id"))
        index = {model.get("label"): position for position, model in enumerate(self.models)}
        frame["checkpoint_index"] = pd.array([index.get(m) for m in frame.get("model", [])], dtype="Int64")
        frame["step"] = pd.array(list(frame["step"]) if "step" in frame else [None] * len(frame), dtype="Int64")
        if "class" in frame:
            text = [None if pd.isna(c) else str(c) for c in frame["class"]]
            named = [c for c in class_order(c for c in text if c is not None) if c != "all"]
            frame["class"] = pd.Categorical(text, categories=["all", *named], ordered=True)
        return frame

    def to_arrow(self):
        """The records as a :class:`pyarrow.Table` with the columns of :meth:`to_pandas`, in its order, typed:

        - ``value`` float64; ``step`` and ``checkpoint_index`` int64 (null when unknown);
        - ``class`` text, dictionary-encoded with the categories of :meth:`to_pandas` (``"all"`` first,
          then natural order), so that ``to_pandas()`` of the table gives the ordered categorical back;
        - every other field with the type its values share (int64 where every value is a whole number,
          float64 where some are fractional, string, bool, lists), null where a record lacks the field;
          a field whose values mix types (text and numbers) is text (numbers written as JSON).
        """
        try:
            import pyarrow as pa
        except ImportError as error:
            raise ImportError('Results.to_arrow() needs pyarrow: pip install "layerscope[table]"') from error
        fields = list(dict.fromkeys(key for record in self.records for key in record))
        index = {model.get("label"): position for position, model in enumerate(self.models)}
        columns = {"run_id": pa.array([self.runtime.get("run_id")] * len(self.records), pa.string())}
        for name in fields:
            values = [record.get(name) for record in self.records]
            if name == "class":
                text = [None if c is None else str(c) for c in values]
                order = class_order(c for c in text if c is not None)
                categories = ["all", *(c for c in order if c != "all")]
                codes = pa.array([None if c is None else categories.index(c) for c in text], pa.int32())
                columns[name] = pa.DictionaryArray.from_arrays(codes, pa.array(categories, pa.string()), ordered=True)
            elif name == "value":
                columns[name] = pa.array(values, pa.float64())
            elif name == "step":
                columns[name] = pa.array(values, pa.int64())
            else:
                columns[name] = _typed_array(pa, values)
        columns["checkpoint_index"] = pa.array([index.get(r.get("model")) for r in self.records], pa.int64())
        if "step" not in columns:
            columns["step"] = pa.array([None] * len(self.records), pa.int64())
        return pa.table(columns)

    def select(self, **keys: Any) -> list[dict[str, Any]]:
        """Records whose fields equal every given key, e.g. ``select(metric="entropy", layer="fc1")``."""
        return [r for r in self.records if all(r.get(k) == v for k, v in keys.items())]

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> Results:
        """The results a run wrote to *run_dir* (its ``results.json``), e.g. to compare runs in pandas
        or to rebuild reports; a missing, unreadable or malformed file is a user error naming it
        (:mod:`layerscope.results.schema`). Nothing in the folder is executed: the file is JSON."""
        from .schema import read_results_file

        data = read_results_file(Path(run_dir) / RESULTS_FILE)
        known = {key: data[key] for key in RESULTS_KEYS if key in data}
        return cls(**known, out_dir=Path(run_dir))


def _typed_array(pa, values: list):
    """A pyarrow array of *values* with the type they share (None: null), or text when they mix types."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string())


def _natural(text: str) -> list:
    """Sort key: the numbers in *text* by value (class 2 before class 10)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def class_order(classes) -> list:
    """The distinct values of a records' ``class`` field in reading order: ``"all"`` first, then the classes in the
    natural order of their text (class 2 before class 10)."""
    distinct = set(classes)
    return (["all"] if "all" in distinct else []) + sorted(distinct - {"all"}, key=lambda c: _natural(str(c)))


ROUND_OFF = 1e-9  # how far past a bound a value may be and still count as on it


def records_in_range(
    records: list[dict[str, Any]], value_range, warnings: list[str], context: str
) -> list[dict[str, Any]]:
    """Records whose value lies in its metric's mathematical range (``value_range(record)`` gives
    (low, high), or None when unbounded). A value past a bound by round-off (≤ 1e-9·max(1, |bound|))
    is set to the bound; any other value outside is a numerical failure: dropped, with a warning."""
    kept = []
    for record in records:
        bounds, value = value_range(record), record.get("value")
        if bounds is None or not isinstance(value, float) or not math.isfinite(value):
            kept.append(record)
            continue
        low, high = bounds
        if low - ROUND_OFF * max(1.0, abs(low)) <= value <= high + ROUND_OFF * max(1.0, abs(high)):
            kept.append({**record, "value": min(max(value, low), high)})
        else:
            warnings.append(
                f"{context}: {record.get('metric')} of '{record.get('layer')}' came out as {value:.6g}, "
                f"outside its range [{low:g}, {high:g}]; record dropped (a numerical failure)"
            )
    return kept


def finite_records(records: list[dict[str, Any]], warnings: list[str]) -> list[dict[str, Any]]:
    """Drop records whose value is NaN/Inf, recording a warning for each (never a silent NaN)."""
    kept = []
    for record in records:
        value = record.get("value")
        if isinstance(value, float) and not math.isfinite(value):
            warnings.append(
                f"analysis '{record.get('analysis')}' produced a non-finite {record.get('metric')} "
                f"for tensor '{record.get('tensor')}' (model {record.get('model')}); record dropped"
            )
            continue
        kept.append(record)
    return kept
