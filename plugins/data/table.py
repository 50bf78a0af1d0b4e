"""The ``table`` data source: rows of a CSV or Parquet file as samples (``pip install "layerscope[table]"``,
which adds pyarrow).

``features`` names the feature columns, by name or glob (``pixel_*``; globs expand in the file's
column order), default every column but the label; ``inputs: {input_ids: ["tok_*"], …}`` gives a
model with several inputs one group of columns each instead. ``label`` names the label column
(strings are class names; a CSV column whose values are all whole numbers gives integer classes).

The file is streamed once, in chunks of rows (pyarrow's CSV reader and Parquet row groups), into
plain float32 arrays in layerscope's cache folder (``tables/``, keyed by the file's path, size and
modification time and by these keys); runs and workers then read any rows, in any order, from those
arrays by memory map. Memory stays flat whatever the file's size; the cache holds 4 bytes per
feature value. Feature values must be numbers: an empty cell or text is an error naming the column
and the row (rows count from 1 after the header).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from layerscope import DataSource, hookimpl
from layerscope.data.labels import integers_from_text
from layerscope.util.errors import UserError
from layerscope.util.files import cache_dir, regular_file

CHUNK_ROWS = 65_536  # Parquet rows per chunk
CSV_BLOCK_BYTES = 1 << 20  # CSV bytes per chunk
FORMAT_VERSION = 1  # of the cached arrays


class TableParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="a .csv, .tsv or .parquet file, relative to the spec")
    format: Literal["auto", "csv", "parquet"] = Field("auto", description="auto: from the file's suffix")
    features: list[str] | None = Field(None, description="feature columns, names or globs (default: all but the label)")
    inputs: dict[str, list[str]] | None = Field(
        None, description="model input name -> its columns (names or globs), for models with several inputs"
    )
    label: str | None = Field(None, description="the label column (none: no labels)")
    delimiter: str = Field(",", min_length=1, max_length=1, description="CSV: the field separator (.tsv: tab)")

    @model_validator(mode="after")
    def _one_way_to_name_columns(self) -> TableParams:
        if self.features is not None and self.inputs is not None:
            raise ValueError("give either features (one input) or inputs (columns per model input), not both")
        if self.inputs is not None and not self.inputs:
            raise ValueError("inputs: name at least one model input")
        return self


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError('data.source: the table source needs pyarrow: pip install "layerscope[table]"') from None


def match_columns(patterns: list[str], columns: list[str], key: str) -> list[str]:
    """The *columns* that *patterns* name (exact names in the given order, globs in the file's order),
    each once; a pattern that matches nothing is a user error naming *key*."""
    chosen: list[str] = []
    for pattern in patterns:
        matched = [pattern] if pattern in columns else fnmatch.filter(columns, pattern)
        if not matched:
            raise UserError(f"{key}: no column matches '{pattern}' (the columns: {', '.join(columns)})")
        chosen.extend(c for c in matched if c not in chosen)
    return chosen


class Table:
    """The column layout of a table file and a streaming reader of its rows."""

    def __init__(self, path: Path, params: TableParams):
        self.path, self.params = path, params
        suffix = path.suffix.lower()
        self.format = (
            params.format if params.format != "auto" else "parquet" if suffix in (".parquet", ".pq") else "csv"
        )
        self.delimiter = "\t" if suffix == ".tsv" and "delimiter" not in params.model_fields_set else params.delimiter
        self.columns = self._header()
        if params.label is not None and params.label not in self.columns:
            raise UserError(
                f"data.label: {path} has no column '{params.label}' (the columns: {', '.join(self.columns)})"
            )
        others = [c for c in self.columns if c != params.label]
        self.groups: dict[str | None, list[str]]  # model input (None: the only one) -> its columns
        if params.inputs is not None:
            self.groups = {name: match_columns(p, others, f"data.inputs.{name}") for name, p in params.inputs.items()}
        else:
            self.groups = {None: match_columns(params.features or ["*"], others, "data.features")}

    def _header(self) -> list[str]:
        try:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                return list(pq.read_schema(self.path).names)
            with open(self.path, newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle, delimiter=self.delimiter), None)
        except Exception as error:  # OSError, UnicodeDecodeError, csv.Error, pyarrow's ArrowInvalid
            raise UserError(f"data.path: {self.path} is not a readable {self.format} file ({error})") from None
        if not header:
            raise UserError(f"data.path: {self.path} is empty (a CSV needs a header row)")
        return header

    def chunks(self):
        """The file's rows in chunks, as pyarrow record batches of the needed columns (features as float32)."""
        import pyarrow as pa

        needed = [c for group in self.groups.values() for c in group] + [self.params.label] * (
            self.params.label is not None
        )
        if self.format == "parquet":
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(self.path).iter_batches(batch_size=CHUNK_ROWS, columns=needed)
            return
        import pyarrow.csv as pacsv

        types = {c: pa.float32() for c in needed if c != self.params.label}
        if self.params.label is not None:
            types[self.params.label] = pa.string()
        yield from pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter),
            convert_options=pacsv.ConvertOptions(include_columns=needed, column_types=types, strings_can_be_null=True),
        )


def _check_filled(column, name: str, first_row: int, key: str = "data") -> None:
    """A user error naming *key*, the column and the row (counted from 1 after the header) of the first
    missing value of *column*, a chunk whose first row is *first_row* (0-based)."""
    if column.null_count:
        row = first_row + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]) + 1
        raise UserError(f"{key}: column '{name}' has no value in row {row}")


def _feature_block(batch, columns: list[str], first_row: int) -> np.ndarray:
    """The *columns* of a record batch as a float32 (rows × columns) array; a missing or non-numeric
    value is a user error naming the column and the row."""
    import pyarrow as pa

    arrays = []
    for name in columns:
        column = batch.column(batch.schema.get_field_index(name))
        if not (
            pa.types.is_integer(column.type)
            or pa.types.is_floating(column.type)
            or pa.types.is_boolean(column.type)
            or pa.types.is_decimal(column.type)
        ):
            raise UserError(
                f"data: column '{name}' is not numeric ({column.type}); leave it out of the features "
                "(or name it as the label)"
            )
        _check_filled(column, name, first_row)
        arrays.append(column.to_numpy(zero_copy_only=False).astype(np.float32))
    return np.column_stack(arrays) if arrays else np.zeros((batch.num_rows, 0), np.float32)


def convert(table: Table, target: Path) -> None:
    """Stream *table* into *target*: ``<input>.f32`` files (rows × columns), ``labels.npy`` and ``meta.json``."""
    target.mkdir(parents=True)
    files = {name: open(target / f"{index}.f32", "wb") for index, name in enumerate(table.groups)}
    labels, rows = [], 0
    try:
        for batch in table.chunks():
            for name, handle in files.items():
                handle.write(_feature_block(batch, table.groups[name], rows).tobytes())
            if table.params.label is not None:
                column = batch.column(batch.schema.get_field_index(table.params.label))
                _check_filled(column, table.params.label, rows, "data.label")
                labels.append(column.to_numpy(zero_copy_only=False))
            rows += batch.num_rows
    except UserError:
        raise
    except Exception as error:  # pyarrow's parse errors (ArrowInvalid: a value that is not a number, …)
        message = re.sub(r"CSV column #(\d+)", lambda m: f"column '{table.columns[int(m.group(1))]}'", str(error))
        raise UserError(f"data.path: {table.path} could not be read as {table.format}: {message}") from None
    finally:
        for handle in files.values():
            handle.close()
    if rows == 0:
        raise UserError(f"data.path: {table.path} has no rows")
    if labels:
        values = np.concatenate(labels)
        if values.dtype.kind in "OUS":
            values = integers_from_text(values.astype(str))
        np.save(target / "labels.npy", values, allow_pickle=False)
    meta = {"rows": rows, "inputs": [[name, columns] for name, columns in table.groups.items()]}
    (target / "meta.json").write_text(json.dumps(meta))


def cached_arrays(table: Table) -> Path:
    """The folder of *table*'s converted arrays in the cache, converting it first (once, under a lock,
    when the file, its size or modification time, or the keys that select its columns changed)."""
    from filelock import FileLock

    stat = table.path.stat()
    key = json.dumps(
        [
            FORMAT_VERSION,
            str(table.path.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            table.format,
            table.delimiter,
            [[n, c] for n, c in table.groups.items()],
            table.params.label,
        ]
    )
    folder = cache_dir() / "tables" / hashlib.sha256(key.encode()).hexdigest()[:32]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "meta.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
            try:
                convert(table, scratch / "arrays")
                os.replace(scratch / "arrays", folder)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return folder


class TableSource(DataSource):
    name = "table"
    Params = TableParams
    params: TableParams

    def __init__(self, params, base_dir, seed=0):
        super().__init__(params, base_dir, seed)
        _pyarrow()
        table = Table(regular_file(base_dir / params.path, "data.path"), params)
        self.path = table.path
        folder = cached_arrays(table)
        self.rows = json.loads((folder / "meta.json").read_text())["rows"]
        self.x = {
            name: np.memmap(folder / f"{index}.f32", np.float32, "r", shape=(self.rows, len(columns)))
            for index, (name, columns) in enumerate(table.groups.items())
        }
        self.y = np.load(folder / "labels.npy", mmap_mode="r", allow_pickle=False) if params.label else None

    def __len__(self) -> int:
        return self.rows

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def read(self, indices):
        x = {name: np.asarray(array[indices]) for name, array in self.x.items()}
        return x if self.params.inputs is not None else x[None], self.read_labels(indices)

    def read_labels(self, indices):
        return np.asarray(self.y[indices]) if self.y is not None else None

    def describe(self) -> str:
        return f"table {self.path}"

    def describe_labels(self) -> str:
        return f"column '{self.params.label}'"


@hookimpl
def register_data_sources(register):
    register(TableSource)
