"""Reporter ``csv``: ``records.csv``, one row per record (core writes ``results.json`` itself)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from layerscope import Reporter, Results, hookimpl
from layerscope.util.files import atomic_write

RECORD_COLUMNS = ("analysis", "estimator", "model", "layer", "tensor", "metric", "value", "unit")


class CsvReporter(Reporter):
    name = "csv"

    def write(self, results: Results, out_dir: Path) -> list[str]:
        extra = sorted({key for record in results.records for key in record} - set(RECORD_COLUMNS))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*RECORD_COLUMNS, *extra], lineterminator="\n")
        writer.writeheader()
        writer.writerows(results.records)
        atomic_write(out_dir / "records.csv", buffer.getvalue())
        return ["records.csv"]


@hookimpl
def register_reporters(register):
    register(CsvReporter)
