"""The results contract: ``results.json`` with tidy records, written atomically by core."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
RESULTS_FORMAT = "json"  # the ``outputs.formats`` entry of results.json, which core always writes


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write *data* to *path* through a temporary file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("out_dir")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_pandas(self):
        """The records as a :class:`pandas.DataFrame` (one row per number)."""
        try:
            import pandas as pd
        except ImportError as error:
            raise ImportError("Results.to_pandas() needs pandas: pip install pandas") from error
        return pd.DataFrame.from_records(self.records)

    def select(self, **keys: Any) -> list[dict[str, Any]]:
        """Records whose fields equal every given key, e.g. ``select(metric="entropy", layer="fc1")``."""
        return [r for r in self.records if all(r.get(k) == v for k, v in keys.items())]

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "Results":
        from .errors import UserError

        path = Path(run_dir) / RESULTS_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: no results.json in this run directory") from None
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: cannot read results: {error}") from None
        known = {k: data[k] for k in ("layerscope", "spec", "runtime", "models", "records", "warnings", "artifacts", "analyses",
                                         "failures") if k in data}
        return cls(**known, out_dir=Path(run_dir))


ROUND_OFF = 1e-9  # how far past a bound a value may be and still count as on it


def records_in_range(records: list[dict[str, Any]], value_range, warnings: list[str], context: str
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
            warnings.append(f"{context}: {record.get('metric')} of '{record.get('layer')}' came out as {value:.6g}, "
                            f"outside its range [{low:g}, {high:g}]; record dropped (a numerical failure)")
    return kept


def finite_records(records: list[dict[str, Any]], warnings: list[str]) -> list[dict[str, Any]]:
    """Drop records whose value is NaN/Inf, recording a warning for each (never a silent NaN)."""
    kept = []
    for record in records:
        value = record.get("value")
        if isinstance(value, float) and not math.isfinite(value):
            warnings.append(f"analysis '{record.get('analysis')}' produced a non-finite {record.get('metric')} "
                            f"for tensor '{record.get('tensor')}' (model {record.get('model')}); record dropped")
            continue
        kept.append(record)
    return kept
