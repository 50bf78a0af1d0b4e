"""``Results.to_arrow()`` and the ``parquet`` format: the records of ``to_pandas()`` as typed columns."""

from __future__ import annotations

import math

import pytest
import torch

import layerscope
from layerscope.plugins.data.digits import load_digits_split
from layerscope.util.errors import SpecError

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")


def same_values(column, series) -> bool:
    """Arrow *column* and pandas *series* hold the same values, row by row (null equal to None and NaN)."""

    def plain(value):
        return None if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)) else value

    return [plain(v) for v in column.to_pylist()] == [plain(v) for v in series.astype(object).tolist()]


def test_parquet_of_a_monitor_reads_back_as_to_pandas(tmp_path):
    """Two steps of a monitored CNN (records with step, class, per-class samples) written as records.parquet."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    x, y = load_digits_split("train")
    batch = (torch.from_numpy(x[:120]), torch.from_numpy(y[:120]))
    monitor = layerscope.Monitor(
        {
            "model": {},
            "analyses": [{"id": "entropy", "estimator": "activation_entropy"}],
            "outputs": {"formats": ["json", "parquet"]},
        }
    )
    monitor.observe(model, step=0, batch=batch)
    monitor.observe(model, step=7, batch=batch)
    results = monitor.write(tmp_path / "out")
    assert "records.parquet" in results.artifacts

    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "records.parquet")
    frame = results.to_pandas()
    assert table.column_names == list(frame.columns)
    assert table.num_rows == len(frame) == len(results.records) > 20
    for name in table.column_names:
        assert same_values(table.column(name), frame[name]), name
    schema = table.schema
    assert schema.field("value").type == pa.float64()
    assert schema.field("step").type == pa.int64() and table.column("step").to_pylist().count(7) == table.num_rows / 2
    assert schema.field("checkpoint_index").type == pa.int64() and schema.field("samples").type == pa.int64()
    assert schema.field("run_id").type == pa.string() and len(set(table.column("run_id").to_pylist())) == 1
    assert pa.types.is_dictionary(schema.field("class").type) and schema.field("class").type.ordered
    # read back into pandas, the class column is to_pandas()'s ordered categorical
    assert list(table.to_pandas()["class"].cat.categories) == list(frame["class"].cat.categories)
    assert list(frame["class"].cat.categories) == ["all", *map(str, range(10))]
    assert results.to_arrow().equals(table)


def test_to_arrow_types_each_field_by_the_values_it_holds():
    records = [
        {"analysis": "a", "model": "m1", "metric": "x", "value": 1, "class": 10, "channel": 3, "head": "q"},
        {"analysis": "a", "model": "m2", "metric": "x", "value": 0.5, "class": "all", "tag": [1, 2], "head": 2},
        {"analysis": "a", "model": "m2", "metric": "x", "value": 2.0, "class": 2, "ratio": 1, "flag": True},
        {"analysis": "a", "model": "other", "metric": "y", "value": -1.0, "ratio": 0.25, "flag": False},
    ]
    results = layerscope.Results("0", {}, {"run_id": "r1"}, [{"label": "m1", "step": 3}, {"label": "m2"}], records)
    table = results.to_arrow()
    frame = results.to_pandas()
    assert table.column_names == list(frame.columns)
    assert table.column_names == [
        "run_id",
        *("analysis", "model", "metric", "value", "class", "channel", "head", "tag", "ratio", "flag"),
        "checkpoint_index",
        "step",
    ]
    types = {field.name: field.type for field in table.schema}
    assert types["value"] == pa.float64() and table.column("value").to_pylist() == [1.0, 0.5, 2.0, -1.0]
    assert types["channel"] == pa.int64() and table.column("channel").to_pylist() == [3, None, None, None]
    assert types["ratio"] == pa.float64() and types["flag"] == pa.bool_()
    assert types["tag"] == pa.list_(pa.int64())
    assert types["head"] == pa.string() and table.column("head").to_pylist() == ["q", "2", None, None]  # mixed: text
    assert table.column("checkpoint_index").to_pylist() == [0, 1, 1, None]
    assert types["step"] == pa.int64() and table.column("step").to_pylist() == [None] * 4  # no record has one
    assert table.column("class").to_pylist() == ["10", "all", "2", None]
    assert table.column("class").type.value_type == pa.string()
    assert table.column("class").chunk(0).dictionary.to_pylist() == ["all", "2", "10"]  # natural order
    for name in table.column_names:
        if name not in ("head", "tag"):  # pandas keeps mixed values and lists as Python objects
            assert same_values(table.column(name), frame[name]), name


def test_a_format_whose_package_is_missing_is_a_spec_error(tmp_path, tiny_onnx):
    """A reporter's ``requires`` is checked with the spec: the error names the format's place in it."""

    class NeedsAbsentPackage(layerscope.Reporter):
        name = "absent"
        requires = {"layerscope_absent_package": 'pip install "layerscope[absent]"'}

    class Plugin:
        @layerscope.hookimpl
        def register_reporters(self, register):
            register(NeedsAbsentPackage)

    spec = {
        "model": {"source": str(tiny_onnx)},
        "data": {"source": "synthetic", "shape": [64], "samples": 8},
        "analyses": [{"id": "entropy", "estimator": "activation_entropy"}],
        "outputs": {"dir": str(tmp_path / "out"), "formats": ["json", "absent"]},
    }
    with pytest.raises(SpecError) as raised:
        layerscope.validate(spec, plugins=(Plugin(),))
    assert str(raised.value) == (
        "<spec>: outputs.formats.1: the absent format needs the layerscope_absent_package package: "
        'pip install "layerscope[absent]"'
    )
