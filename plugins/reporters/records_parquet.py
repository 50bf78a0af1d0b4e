"""Reporter ``parquet``: ``records.parquet``, the records as :meth:`layerscope.Results.to_arrow` types them
(one row per record; ``value`` float64, ``step`` int64, ``class`` text), for pandas, polars, DuckDB or Spark."""

from __future__ import annotations

from pathlib import Path

from layerscope import Reporter, Results, atomic_write, hookimpl


class ParquetReporter(Reporter):
    name = "parquet"
    requires = {"pyarrow": 'pip install "layerscope[table]"'}

    def write(self, results: Results, out_dir: Path) -> list[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(results.to_arrow(), sink)
        atomic_write(out_dir / "records.parquet", sink.getvalue().to_pybytes())
        return ["records.parquet"]


@hookimpl
def register_reporters(register):
    register(ParquetReporter)
