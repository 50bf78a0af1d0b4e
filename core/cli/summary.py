"""The terminal summary printed at the end of ``layerscope run``."""

from __future__ import annotations

from pathlib import Path

from layerscope.results.contract import Results
from layerscope.util.units import format_bytes


def print_summary(results: Results, out_dir: Path | None, max_rows: int = 40, quiet: bool = False) -> None:
    """A table of the main metric per analysis, model and layer, the run's warnings, then where the files
    are; *quiet* (``run --quiet``): the warnings and where the files are alone."""
    from rich.console import Console

    console = Console()
    if not quiet:
        _print_table(console, results, max_rows)
    for warning in results.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if out_dir is not None:
        console.print(f"{len(results.records)} records → {out_dir / 'results.json'}")
        if "report.html" in results.artifacts:
            console.print(f"report → {out_dir / 'report.html'}")
    for logged in results.logged_to:
        console.print(f"logged → {logged}", highlight=False)


def _print_table(console, results: Results, max_rows: int) -> None:
    """The main metric (the first metric each analysis records) per analysis, model and layer, over all
    classes; then how the tensors were fetched when the memory budget split them into groups."""
    from rich.table import Table

    table = Table(
        title=f"layerscope · {results.spec.get('name', '')} · {results.runtime['samples']} samples · "
        f"{results.runtime['provider']} · {results.runtime['seconds']:.1f} s"
    )
    for column in ("analysis", "model", "layer", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    main_metric: dict[str, str] = {}
    rows = 0
    for record in results.records:
        key = record["analysis"]
        main_metric.setdefault(key, record["metric"])
        if record["metric"] != main_metric[key] or record.get("class", "all") != "all":
            continue
        if rows < max_rows:
            table.add_row(
                key,
                str(record["model"]),
                record["layer"],
                record["metric"],
                f"{record['value']:.4g} {record.get('unit', '')}".strip(),
            )
        rows += 1
    console.print(table)
    if rows > max_rows:
        console.print(f"… {rows - max_rows} more rows")
    groups = max((g for model in results.models for g in model.get("fetch_groups", [])), default=1)
    if groups > 1:
        peak = max(model.get("peak_fetched_bytes", 0) for model in results.models)
        console.print(
            f"runtime.memory_budget: tensors fetched in up to {groups} groups (forward passes per batch), "
            f"at most {format_bytes(peak)} held at once"
        )
