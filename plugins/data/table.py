"""The ``table`` data source: rows of a CSV or Parquet file as samples (``pip install "layerscope[table]"``,
which adds pyarrow).

``features`` names the feature columns, by name or glob (``pixel_*``; globs expand in the file's
column order), default every column but the label; ``inputs: {input_ids: ["tok_*"], …}`` gives a
model with several inputs one group of columns each instead. ``label`` names the label column
(strings are class names; a CSV column whose values all spell numbers is numbers, as a Parquet column
of numbers is: whole ones are integer classes, others are refused). Column names must differ; a
UTF-8 byte-order mark before a CSV's header is not part of the first name.

The file is streamed once, in chunks of rows (pyarrow's CSV reader, its blocks sized to hold many of
the file's longest row, so that rows of any length up to 1 GiB are read; Parquet row groups), into
plain float32 arrays in layerscope's cache folder (``tables/``, keyed by the file's path, size and
modification time and by these keys; a file that changes while it is streamed, as another program
writes it, is refused, never a mix of its old and new rows); runs and workers then read any rows, in
any order, from those arrays by memory map. Memory stays flat whatever the file's size; the cache holds 4 bytes per
feature value. Feature values must be finite numbers: an empty cell, text, NaN or an infinite value is
an error naming the column, the row (rows count from 1 after the header) and what the cell holds.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from layerscope import DataSource, hookimpl
from layerscope.data.labels import labels_from_text
from layerscope.util.errors import UserError
from layerscope.util.files import cache_dir, mark_used, regular_file

CHUNK_ROWS = 65_536  # Parquet rows per chunk, at most
CHUNK_BYTES = 64 << 20  # Parquet rows per chunk, at most this many bytes of 8-byte values
CSV_BLOCK_BYTES = 1 << 20  # CSV bytes per chunk, at least
CSV_BLOCK_ROWS = 64  # CSV rows per chunk, at least (of the longest row; a chunk costs per column)
CSV_BLOCK_MAX = 256 << 20  # CSV bytes per chunk, at most, unless two rows need more
SCAN_BYTES = 16 << 20  # read at once while looking for the longest CSV row
FORMAT_VERSION = 2  # of the cached arrays (2: CSV labels that spell numbers are numbers)


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
    each once; a pattern that matches nothing is a user error naming *key*. Linear in the number of
    columns for a given number of globs (a name is looked up, a glob scans the columns once)."""
    names = set(columns)
    chosen: dict[str, None] = {}  # insertion-ordered, each column once
    for pattern in patterns:
        matched = [pattern] if pattern in names else fnmatch.filter(columns, pattern)
        if not matched:
            raise UserError(f"{key}: no column matches '{pattern}' (the columns: {listing(columns)})")
        chosen.update(dict.fromkeys(matched))
    return list(chosen)


def listing(columns: list[str], most: int = 20) -> str:
    """*columns* for an error message: the first *most* names, then how many more."""
    shown = ", ".join(columns[:most])
    return shown + (f", … ({len(columns)} columns)" if len(columns) > most else "")


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
        self._check_distinct()
        if params.label is not None and params.label not in self.columns:
            raise UserError(f"data.label: {path} has no column '{params.label}' (the columns: {listing(self.columns)})")
        if self.format == "parquet" and params.label is not None:
            _check_label_type(self.schema.field(params.label).type, params.label, path)
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

                self.schema = pq.read_schema(self.path)
                return list(self.schema.names)
            with open(self.path, newline="", encoding="utf-8-sig") as handle:  # a byte-order mark is no name
                header = next(csv.reader(handle, delimiter=self.delimiter), None)
        except Exception as error:  # OSError, UnicodeDecodeError, csv.Error, pyarrow's ArrowInvalid
            raise UserError(f"data.path: {self.path} is not a readable {self.format} file ({error})") from None
        if not header:
            raise UserError(f"data.path: {self.path} is empty (a CSV needs a header row)")
        return header

    def _check_distinct(self) -> None:
        """Every column has a name of its own: of two columns of one name, one would be read for both."""
        first: dict[str, int] = {}
        for index, name in enumerate(self.columns):
            if name in first:
                raise UserError(
                    f"data.path: {self.path} has two columns named '{name}' (columns {first[name] + 1} and "
                    f"{index + 1}); give each column a name of its own"
                )
            first[name] = index

    def cells(self, name: str, first: int = 1) -> Iterator[tuple[int, str]]:
        """(row, text) of column *name* of a CSV file from row *first* on, rows counted from 1 after the
        header (blank lines skipped, as pyarrow skips them): the file read again, by Python's csv module,
        to tell what a bad cell holds. Nothing for Parquet, nor past what cannot be read."""
        if self.format != "csv":
            return
        column = self.columns.index(name)
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as handle:
                rows = (values for values in csv.reader(handle, delimiter=self.delimiter) if values)
                for row, values in enumerate(rows):  # 0: the header
                    if row >= first and column < len(values):
                        yield row, values[column]
        except (OSError, UnicodeDecodeError, csv.Error):  # csv.Error: a cell over csv's field size limit
            return

    def chunks(self):
        """The file's rows in chunks, as pyarrow record batches of the needed columns (features as float32)."""
        import pyarrow as pa

        needed = [c for group in self.groups.values() for c in group] + [self.params.label] * (
            self.params.label is not None
        )
        if self.format == "parquet":
            import pyarrow.parquet as pq

            rows = max(1, min(CHUNK_ROWS, CHUNK_BYTES // (8 * len(needed))))  # wide files: fewer rows
            yield from pq.ParquetFile(self.path).iter_batches(batch_size=rows, columns=needed)
            return
        import pyarrow.csv as pacsv

        types = {c: pa.float32() for c in needed if c != self.params.label}
        if self.params.label is not None:
            types[self.params.label] = pa.string()
        yield from pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(block_size=self.block_size()),
            parse_options=pacsv.ParseOptions(delimiter=self.delimiter),
            convert_options=pacsv.ConvertOptions(include_columns=needed, column_types=types, strings_can_be_null=True),
        )

    def block_size(self) -> int:
        """Bytes per CSV chunk: CSV_BLOCK_BYTES, or CSV_BLOCK_ROWS of the file's longest row (up to
        CSV_BLOCK_MAX), and always two of them, so that any row fits a chunk (pyarrow refuses a row
        straddling two) and a wide file is not read a row per chunk; a row over 1 GiB is refused."""
        line, row = longest_line(self.path)
        if 2 * line >= 1 << 31:  # pyarrow's block size is a 32-bit integer
            raise UserError(
                f"data.path: row {row} of {self.path} is {line:,} bytes long; a CSV row can be 1 GiB at most"
            )
        return max(CSV_BLOCK_BYTES, min(CSV_BLOCK_ROWS * line, CSV_BLOCK_MAX), 2 * line)


def longest_line(path: Path) -> tuple[int, int]:
    """The length in bytes of the longest line of *path* (its line ending included) and its number (0: the
    header), reading it once, SCAN_BYTES at a time."""
    longest, where, current, lines = 0, 0, 0, 0  # current: bytes of the line not yet ended
    with open(path, "rb") as handle:
        while chunk := handle.read(SCAN_BYTES):
            ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
            if not len(ends):
                current += len(chunk)
                continue
            lengths = np.diff(ends, prepend=-1)
            lengths[0] += current
            top = int(np.argmax(lengths))
            if lengths[top] > longest:
                longest, where = int(lengths[top]), lines + top
            lines += len(ends)
            current = len(chunk) - int(ends[-1]) - 1
    return (current, lines) if current > longest else (longest, where)


def _check_label_type(kind, name: str, path: Path) -> None:
    """A Parquet label column holds one class per row: integers, floats, booleans or strings."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    checks = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_string)
    if not any(check(kind) for check in (*checks, pa.types.is_large_string)):
        raise UserError(
            f"data.label: column '{name}' of {path} holds {kind}, not one class per row; name a column of "
            "integers or strings"
        )


def _bad_cell(table: Table, batch, name: str, index: int, first_row: int, key: str = "data") -> UserError:
    """A user error naming *key*, the column and the row (counted from 1 after the header) of the value at
    *index* of column *name* of a chunk whose first row is *first_row* (0-based), saying what the cell
    holds: nothing (empty, a missing-value marker such as NA, a Parquet null), NaN, or an infinite number
    (or one past float32's range)."""
    row = first_row + index + 1
    value = batch.column(batch.schema.get_field_index(name))[index].as_py()
    cell = next(table.cells(name, row), None)  # CSV: the cell as written (pyarrow reads nan, NA as missing)
    text = cell[1] if cell is not None and cell[0] == row else None
    number: float | None = None
    if text is not None:
        if not text.strip():
            return UserError(f"{key}: column '{name}' is empty in row {row}")
        try:
            number = float(text)
        except ValueError:
            number = None
    elif value is not None:  # Parquet: a float, or a decimal past float32's range
        number = float(value)
    if number is None:
        what = f"holds '{text}' (read as a missing value)" if text is not None else "has no value (null)"
    elif math.isnan(number):
        what = "holds NaN"
    elif math.isinf(number):
        what = f"holds an infinite value ({text.strip() if text is not None else number})"
    else:
        what = f"holds {text.strip() if text is not None else number}, beyond the range of float32"
    return UserError(f"{key}: column '{name}' {what} in row {row}")


def _check_filled(table: Table, batch, name: str, first_row: int, key: str = "data") -> None:
    """A user error (:func:`_bad_cell`) for the first missing value of column *name* of a chunk whose first
    row is *first_row* (0-based)."""
    column = batch.column(batch.schema.get_field_index(name))
    if column.null_count:
        index = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise _bad_cell(table, batch, name, index, first_row, key)


def _feature_block(batch, columns: list[str], first_row: int, table: Table) -> np.ndarray:
    """The *columns* of a record batch as a float32 (rows × columns) array, converted by pyarrow at once (a
    chunk costs no Python work per value, and per column only for a missing value); a missing, non-finite
    or non-numeric value is a user error naming the column and the row."""
    import pyarrow as pa

    if not columns:
        return np.zeros((batch.num_rows, 0), np.float32)
    block = batch.select(columns)
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal)
    bad = {kind for kind in set(block.schema.types) if not any(check(kind) for check in numeric)}
    if bad:
        name = next(field.name for field in block.schema if field.type in bad)
        raise UserError(
            f"data: column '{name}' is not numeric ({block.schema.field(name).type}); leave it out of the features "
            "(or name it as the label)"
        )
    if set(block.schema.types) != {pa.float32()}:
        block = block.cast(pa.schema([pa.field(name, pa.float32()) for name in columns]), safe=False)
    try:
        values = np.asarray(block.to_tensor(row_major=True))
    except pa.ArrowTypeError:  # a missing value: name the first
        for name in columns:
            _check_filled(table, batch, name, first_row)
        raise
    if not np.isfinite(values).all():  # NaN, ±Inf, or a number past float32's range: name the first
        index, column = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
        raise _bad_cell(table, batch, columns[column], index, first_row)
    return values


def _unreadable(table: Table, error: Exception, first_row: int) -> UserError:
    """The user error of pyarrow's *error* while reading the chunk of *table* whose first row is *first_row*
    (0-based): a cell of text in a feature column named by its column, row and text (pyarrow names the
    column and the text, the file read again the row), else pyarrow's message with the column's name."""
    text = str(error)
    invalid = re.fullmatch(
        r"In CSV column #(\d+): (?:Row #\d+: )?CSV conversion error to \w+: invalid value '(.*)'", text
    )
    if invalid is not None and int(invalid[1]) < len(table.columns):
        name = table.columns[int(invalid[1])]
        row = next((row for row, cell in table.cells(name, first_row + 1) if cell == invalid[2]), None)
        if row is not None:
            return UserError(f"data: column '{name}' holds '{invalid[2]}' in row {row}, not a number")
    message = re.sub(r"CSV column #(\d+)", lambda m: f"column '{table.columns[int(m.group(1))]}'", text)
    return UserError(f"data.path: {table.path} could not be read as {table.format}: {message}")


def convert(table: Table, target: Path) -> None:
    """Stream *table* into *target*: ``<input>.f32`` files (rows × columns), ``labels.npy`` and ``meta.json``."""
    target.mkdir(parents=True)
    files = {name: open(target / f"{index}.f32", "wb") for index, name in enumerate(table.groups)}
    labels, rows = [], 0
    try:
        for batch in table.chunks():
            for name, handle in files.items():
                handle.write(_feature_block(batch, table.groups[name], rows, table).tobytes())
            if (label := table.params.label) is not None:
                _check_filled(table, batch, label, rows, "data.label")
                labels.append(batch.column(batch.schema.get_field_index(label)).to_numpy(zero_copy_only=False))
            rows += batch.num_rows
    except UserError:
        raise
    except Exception as error:  # pyarrow's parse errors (ArrowInvalid: a value that is not a number, …)
        raise _unreadable(table, error, rows) from None
    finally:
        for handle in files.values():
            handle.close()
    if rows == 0:
        raise UserError(f"data.path: {table.path} has no rows")
    if labels:
        values = np.concatenate(labels)
        if values.dtype.kind in "OUS":
            values = labels_from_text(values.astype(str))
        np.save(target / "labels.npy", values, allow_pickle=False)
    meta = {
        "rows": rows,
        "inputs": [[name, columns] for name, columns in table.groups.items()],
        "source": str(table.path),
    }
    (target / "meta.json").write_text(json.dumps(meta))


def _version(stat: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from another: its inode, size and modification and change times
    (a rewrite in place changes the times, a replacement the inode)."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


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
        if (folder / "meta.json").is_file():
            mark_used(folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
            try:
                convert(table, scratch / "arrays")
                if _version(table.path.stat()) != _version(stat):  # written meanwhile: rows old and new
                    raise UserError(f"data.path: {table.path} changed while it was read; run again once it is written")
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
