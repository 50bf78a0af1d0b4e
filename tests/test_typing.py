"""The package as type checkers see it (py.typed, the real classes behind the lazy names): mypy reports a
plugin author's misspelt Estimator method, parameter, state or override, and passes the example plugin."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")

REPO = Path(__file__).resolve().parents[1]
MISSPELT = REPO / "tests" / "typing" / "misspelt_plugin.py"
EXAMPLE = REPO / "tests" / "example_plugin" / "layerscope_cka.py"
REPORTED = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): error: .*  \[(?P<code>[a-z-]+)\]$")
MARKED = re.compile(r"# error: \[(?P<code>[a-z-]+)\]$")


@pytest.fixture(scope="module")
def mypy_output() -> str:
    """mypy's output on the two plugins, with the package's settings and the package linked under
    build/typecheck-tests/layerscope as .ci/typecheck links it (its cache there too: a second run is quick)."""
    root = REPO / "build" / "typecheck-tests"
    tree = root / "layerscope"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for entry in (REPO / "core").iterdir():
        if entry.name != "__pycache__":
            (tree / entry.name).symlink_to(entry)
    for folder in ("adapters", "plugins"):
        (tree / folder).symlink_to(REPO / folder)
    command = [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml", "--no-warn-unused-configs"]
    done = subprocess.run(
        [*command, "--cache-dir", str(root / ".mypy_cache"), str(MISSPELT), str(EXAMPLE)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "MYPYPATH": str(root)},
    )
    assert re.search(r"\b2 source files\)?$", done.stdout.strip()), done.stdout + done.stderr  # mypy ran through
    return done.stdout


def errors_in(output: str, path: Path) -> set[tuple[int, str]]:
    found = (REPORTED.match(line) for line in output.splitlines())
    return {(int(m["line"]), m["code"]) for m in found if m and Path(REPO, m["file"]) == path}


@pytest.mark.slow
def test_a_misspelt_estimator_is_a_type_error(mypy_output):
    lines = MISSPELT.read_text().splitlines()
    marked = {(number, m["code"]) for number, line in enumerate(lines, 1) if (m := MARKED.search(line))}
    assert len(marked) == 6
    assert errors_in(mypy_output, MISSPELT) == marked, mypy_output
    assert 'has no attribute "acumulate"' in mypy_output and 'has no attribute "pol"; maybe "pool"?' in mypy_output


@pytest.mark.slow
def test_the_example_plugin_type_checks(mypy_output):
    assert errors_in(mypy_output, EXAMPLE) == set(), mypy_output
