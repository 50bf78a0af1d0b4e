"""The ``table`` data source: CSV and Parquet rows streamed in chunks into the arrays a run reads;
records equal npz's on the same values; bad tables are user errors naming the column and row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import layerscope
from layerscope.plugins.data import table as table_module
from layerscope.plugins.data.digits import load_digits_split
from layerscope.plugins.data.table import TableSource
from layerscope.util.errors import UserError

NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


def _digits_table(count: int = 200) -> dict[str, np.ndarray]:
    x, y = load_digits_split("test")
    columns = {f"pixel_{i:02d}": x[:count, i] for i in range(64)}
    return {"id": np.arange(count), **columns, "species": NAMES[y[:count]]}


def _write(folder: Path, columns: dict[str, np.ndarray], kind: str) -> Path:
    if kind == "parquet":
        path = folder / "d.parquet"
        pq.write_table(pa.table(columns), path, row_group_size=37)
        return path
    path = folder / ("d.tsv" if kind == "tsv" else "d.csv")
    separator = "\t" if kind == "tsv" else ","
    rows = zip(
        *[[repr(float(v)) if isinstance(v, np.floating) else str(v) for v in values] for values in columns.values()]
    )
    path.write_text(separator.join(columns) + "\n" + "".join(separator.join(row) + "\n" for row in rows))
    return path


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Chunks of a few rows, so that every test streams many chunks."""
    monkeypatch.setattr(table_module, "CHUNK_ROWS", 16)
    monkeypatch.setattr(table_module, "CSV_BLOCK_BYTES", 4096)
    monkeypatch.setattr(table_module, "CSV_BLOCK_ROWS", 2)


@pytest.mark.parametrize("kind", ["csv", "tsv", "parquet"])
def test_rows_read_back_equal_the_values_in_any_order(tmp_path, kind):
    columns = _digits_table()
    path = _write(tmp_path, columns, kind)
    source = TableSource(TableSource.Params(path=path.name, features=["pixel_*"], label="species"), tmp_path)
    expected = np.column_stack([columns[f"pixel_{i:02d}"] for i in range(64)]).astype(np.float32)
    indices = np.random.default_rng(0).permutation(200)[:77]
    x, y = source.read(indices)
    assert len(source) == 200 and x.dtype == np.float32
    np.testing.assert_array_equal(x, expected[indices])
    assert y.tolist() == columns["species"][indices].tolist()


def test_named_inputs_and_integer_labels(tmp_path):
    columns = {"a1": np.arange(10.0), "a2": np.arange(10.0) * 2, "b": -np.arange(10.0), "cls": np.arange(10) % 3}
    path = _write(tmp_path, columns, "csv")
    source = TableSource(
        TableSource.Params(path=path.name, inputs={"left": ["a*"], "right": ["b"]}, label="cls"), tmp_path
    )
    x, y = source.read(np.array([4, 1]))
    assert x["left"].tolist() == [[4.0, 8.0], [1.0, 2.0]] and x["right"].tolist() == [[-4.0], [-1.0]]
    assert y.dtype == np.int64 and y.tolist() == [1, 1]


def test_table_records_equal_npz_records(tmp_path):
    columns = _digits_table()
    path = _write(tmp_path, columns, "csv")
    x = np.column_stack([columns[f"pixel_{i:02d}"] for i in range(64)]).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=columns["species"])
    analyses = [
        {"id": "entropy", "estimator": "activation_entropy"},
        {"id": "signature", "estimator": "nonlinearity_signature"},
    ]
    common = {"batch_size": 30, "limit": 150, "shuffle": True}
    records = [
        layerscope.run(
            {"model": {"source": "demo:digits-mlp"}, "data": {**common, **data}, "analyses": analyses},
            write=False,
            progress=False,
        ).records
        for data in (
            {"source": "npz", "path": str(tmp_path / "d.npz")},
            {"source": "table", "path": str(path), "features": ["pixel_*"], "label": "species"},
        )
    ]
    assert len(records[0]) == len(records[1]) > 20
    assert records[0] == records[1]


def test_the_conversion_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    path = _write(tmp_path, {"a": np.arange(5.0), "b": np.ones(5)}, "csv")
    params = TableSource.Params(path=path.name)
    assert TableSource(params, tmp_path).read(np.array([3]))[0].tolist() == [[3.0, 1.0]]
    calls = []
    original = table_module.convert
    monkeypatch.setattr(table_module, "convert", lambda *a: (calls.append(a), original(*a)))
    TableSource(params, tmp_path)
    assert calls == []
    path.write_text("a,b\n7,8\n")
    assert TableSource(params, tmp_path).read(np.array([0]))[0].tolist() == [[7.0, 8.0]] and len(calls) == 1


@pytest.mark.parametrize(
    "content, params, message",
    [
        ("a,b\n1,2\n", {"label": "cls"}, r"data.label: .* has no column 'cls' \(the columns: a, b\)"),
        ("a,b\n1,2\n", {"features": ["x*"]}, r"data.features: no column matches 'x\*' \(the columns: a, b\)"),
        ("a,b,c\n1,2,x\n3,zz,y\n", {"label": "c"}, r"data: column 'b' holds 'zz' in row 2, not a number"),
        ("a,b\n1,2\n3,\n", {}, r"data: column 'b' is empty in row 2"),
        ("a,b,c\n1,2,x\n3,4,\n", {"label": "c"}, r"data.label: column 'c' is empty in row 2"),
        ("a,b\n", {}, r"has no rows"),
        ("", {}, r"is empty \(a CSV needs a header row\)"),
    ],
)
def test_bad_tables_are_user_errors_naming_the_place(tmp_path, content, params, message):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(UserError, match=message):
        TableSource(TableSource.Params(path="d.csv", **params), tmp_path)


def test_non_numeric_parquet_features_and_bad_files(tmp_path):
    pq.write_table(pa.table({"a": [1.0, 2.0], "name": ["x", "y"]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=r"column 'name' is not numeric \(string\)"):
        TableSource(TableSource.Params(path="d.parquet"), tmp_path)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"data.path: .*bad.parquet is not a readable parquet file"):
        TableSource(TableSource.Params(path="bad.parquet"), tmp_path)
    with pytest.raises(ValueError, match="either features .* or inputs"):
        TableSource.Params(path="d.csv", features=["a"], inputs={"x": ["a"]})


class _Counted(str):
    """A column name that counts the comparisons made with it (and stops a quadratic algorithm early)."""

    comparisons = 0
    limit = 0

    def __eq__(self, other):
        _Counted.comparisons += 1
        if _Counted.comparisons > _Counted.limit:
            raise AssertionError(f"more than {_Counted.limit} name comparisons: quadratic in the columns")
        return str.__eq__(self, other)

    __hash__ = str.__hash__


@pytest.mark.parametrize("columns", [20_000, 100_000])
def test_column_matching_is_linear_in_the_number_of_columns(monkeypatch, columns):
    """Every column named exactly (in reverse), then a glob over them all: a name comparison or two per
    column and one scan per glob (the matching was quadratic: 20k columns 9.8 s, 100k past 400 s)."""
    import fnmatch

    names = [_Counted(f"c{i}") for i in range(columns)]
    globs = []
    monkeypatch.setattr(
        fnmatch, "filter", lambda names, pattern, real=fnmatch.filter: (globs.append(pattern), real(names, pattern))[1]
    )
    monkeypatch.setattr(_Counted, "comparisons", 0)
    monkeypatch.setattr(_Counted, "limit", 4 * columns)
    chosen = table_module.match_columns([str(n) for n in reversed(names)] + ["c1*"], names, "data.features")
    comparisons, _Counted.limit = _Counted.comparisons, float("inf")
    assert comparisons <= 2 * columns and globs == ["c1*"]
    assert chosen == names[::-1]


def test_rows_longer_than_a_block_are_read_in_chunks_of_many_rows(tmp_path, monkeypatch):
    """Rows of 12 KiB with 4 KiB blocks (pyarrow refused a row straddling two blocks: "increase the block
    size", which a user cannot): the blocks are sized from the longest row, CSV_BLOCK_ROWS rows at least."""
    monkeypatch.setattr(table_module, "CSV_BLOCK_ROWS", 8)
    digits = "0" * 60
    rows = np.arange(40 * 200, dtype=np.float64).reshape(40, 200)
    lines = [",".join(f"{v:.0f}.{digits}" for v in row) for row in rows]
    (tmp_path / "d.csv").write_text(",".join(f"f{i}" for i in range(200)) + "\n" + "\n".join(lines) + "\n")
    assert min(map(len, lines)) > 3 * 4096
    chunks = []
    original = table_module._feature_block
    monkeypatch.setattr(
        table_module, "_feature_block", lambda batch, *a: (chunks.append(batch.num_rows), original(batch, *a))[1]
    )
    source = TableSource(TableSource.Params(path="d.csv"), tmp_path)
    np.testing.assert_array_equal(source.read(np.arange(40))[0], rows.astype(np.float32))
    assert sum(chunks) == 40 and len(chunks) <= 40 // 8 + 1, chunks


@pytest.mark.slow
def test_a_row_over_2_mib_with_the_default_blocks(tmp_path, monkeypatch):
    """Real rows of 2.3 MiB (20,000 values of 115 characters) with the default block sizes: each row
    straddled two boundaries of pyarrow's 1 MiB blocks, which it refused ("increase block size")."""
    monkeypatch.undo()  # the default chunk sizes
    value = "1." + "0" * 113
    row = ",".join([value] * 20_000)
    (tmp_path / "d.csv").write_text(",".join(f"f{i}" for i in range(20_000)) + "\n" + "\n".join([row] * 3) + "\n")
    assert len(row) > 2 << 20 and table_module.CSV_BLOCK_BYTES == 1 << 20
    source = TableSource(TableSource.Params(path="d.csv"), tmp_path)
    assert len(source) == 3 and (source.read(np.arange(3))[0] == 1.0).all()


def test_a_parquet_label_column_of_lists_is_refused_naming_it(tmp_path):
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "y": [[1, 2], [3], [4]]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=r"data.label: column 'y' of .*d.parquet holds list<.*int64>, not one class"):
        TableSource(TableSource.Params(path="d.parquet", label="y"), tmp_path)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_a_file_changed_while_it_is_read_is_refused_never_mixed(tmp_path, monkeypatch, kind):
    """Another program rewrites the file (same size) while the stream is between chunks: the run stops
    naming the file, nothing is cached, and the next run reads the new file whole (not old rows and new)."""
    import time

    path = _write(tmp_path, {"a": np.arange(2000.0), "b": np.zeros(2000)}, kind)  # chunks of 16 rows or 4 KiB
    original = table_module.Table.chunks

    def rewritten_meanwhile(self):
        for index, batch in enumerate(original(self)):
            if index == 1:
                time.sleep(0.05)  # past the file system's timestamp granularity
                _write(tmp_path, {"a": np.arange(2000.0), "b": np.ones(2000)}, kind)
            yield batch

    monkeypatch.setattr(table_module.Table, "chunks", rewritten_meanwhile)
    with pytest.raises(UserError, match=rf"data.path: {path} changed while it was read; run again"):
        TableSource(TableSource.Params(path=path.name), tmp_path)
    monkeypatch.setattr(table_module.Table, "chunks", original)
    assert (
        TableSource(TableSource.Params(path=path.name), tmp_path).read(np.arange(2000))[0][:, 1].tolist()
        == [1.0] * 2000
    )


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark: it is not part of the first column's name (it
    was, and the file could not be read: "Column '\\ufeffa' in include_columns does not exist")."""
    (tmp_path / "d.csv").write_text("\ufeffa,b,cls\n1,2,x\n3,4,y\n", encoding="utf-8")
    source = TableSource(TableSource.Params(path="d.csv", features=["a", "b"], label="cls"), tmp_path)
    x, y = source.read(np.arange(2))
    assert x.tolist() == [[1.0, 2.0], [3.0, 4.0]] and y.tolist() == ["x", "y"]


@pytest.mark.parametrize("kind", ["csv", "parquet"])
@pytest.mark.parametrize("params", [{}, {"features": ["p0"]}])
def test_a_column_name_given_twice_is_refused_naming_it(tmp_path, kind, params):
    """Two columns named p0: the second was dropped without a word (and features: [p0] read the first)."""
    if kind == "csv":
        (tmp_path / "d.csv").write_text("p0,p1,p0,cls\n1,2,3,x\n4,5,6,y\n")
    else:
        arrays = [pa.array([1.0, 4.0]), pa.array([2.0, 5.0]), pa.array([3.0, 6.0]), pa.array(["x", "y"])]
        pq.write_table(pa.Table.from_arrays(arrays, names=["p0", "p1", "p0", "cls"]), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=rf"data.path: .*d.{kind} has two columns named 'p0' \(columns 1 and 3\)"):
        TableSource(TableSource.Params(path=f"d.{kind}", label="cls", **params), tmp_path)


def _run_table(path: Path, **data):
    return layerscope.run(
        {
            "model": {"source": "demo:digits-mlp"},
            "data": {"source": "table", "path": str(path), "features": ["pixel_*"], "batch_size": 50, **data},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}],
        },
        write=False,
        progress=False,
    )


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_float_labels_that_are_not_whole_are_refused_in_csv_as_in_parquet(tmp_path, kind):
    """A CSV label column of 0.5, 1.5, … gave the class names '0.5', '1.5' and a run, where the same column
    in Parquet is refused: labels are classes, other floats (regression targets) are not."""
    columns = _digits_table(100)
    columns["target"] = np.arange(100) % 4 + 0.5
    path = _write(tmp_path, columns, kind)
    with pytest.raises(UserError, match=r"sample \d+ has label \d\.5, not a whole number \(float labels name"):
        _run_table(path, label="target")


def test_csv_labels_of_names_whole_numbers_and_whole_floats_are_classes(tmp_path):
    columns = _digits_table(100)
    columns["digit"] = (np.arange(100) % 4).astype(np.float64)  # written 0.0, 1.0, …: classes 0, 1, …
    columns["count"] = np.arange(100) % 4
    path = _write(tmp_path, columns, "csv")
    for label, expected in (("digit", {0, 1, 2, 3}), ("count", {0, 1, 2, 3}), ("species", set(NAMES))):
        source = TableSource(TableSource.Params(path=path.name, features=["pixel_*"], label=label), tmp_path)
        labels = source.read_labels(np.arange(100))
        assert set(labels.tolist()) <= expected and labels.dtype.kind in ("U" if label == "species" else "if")
        classes = {r["class"] for r in _run_table(path, label=label).records if "class" in r}
        assert classes - {"all"} == expected, classes


@pytest.mark.parametrize(
    "cell, holds",
    [
        ("nan", "holds NaN"),
        ("NaN", "holds NaN"),
        ("inf", r"holds an infinite value \(inf\)"),
        ("-inf", r"holds an infinite value \(-inf\)"),
        ("1e300", r"holds 1e300, beyond the range of float32"),
        ("", "is empty"),
        ("NA", r"holds 'NA' \(read as a missing value\)"),
    ],
)
def test_a_bad_csv_cell_names_its_column_its_row_and_what_it_holds(tmp_path, cell, holds):
    """A nan cell gave "column 'b' has no value in row 3" (it holds the text nan), an inf cell "sample 2
    contains NaN or Inf" (another numbering, another wording): both name the column and the row (from 1
    after the header) and say what the cell holds."""
    (tmp_path / "d.csv").write_text(f"a,b\n1,2\n3,4\n5,{cell}\n7,8\n")
    with pytest.raises(UserError, match=rf"^data: column 'b' {holds} in row 3$"):
        TableSource(TableSource.Params(path="d.csv"), tmp_path)


@pytest.mark.parametrize(
    "value, holds",
    [(np.nan, "holds NaN"), (np.inf, r"holds an infinite value \(inf\)"), (None, r"has no value \(null\)")],
)
def test_a_bad_parquet_cell_names_its_column_its_row_and_what_it_holds(tmp_path, value, holds):
    pq.write_table(pa.table({"a": [1.0, 3.0, 5.0], "b": [2.0, 4.0, value]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=rf"^data: column 'b' {holds} in row 3"):
        TableSource(TableSource.Params(path="d.parquet"), tmp_path)
