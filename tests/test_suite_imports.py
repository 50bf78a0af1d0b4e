"""The fast loop, ``pytest -m "not slow"``, collects the suite without the heavy optional frameworks.

Collection imports every test module, slow or not (markers deselect tests only once their module is
imported), so a module-level ``import tensorflow`` or ``pytest.importorskip("transformers")`` costs every
run seconds of CPU and hundreds of MB. Those imports belong in the tests or fixtures that use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# top-level names of the optional frameworks that take seconds or hundreds of MB to import
HEAVY = (
    "tensorflow",
    "keras",
    "tf2onnx",
    "transformers",
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "ray",
    "datasets",
    "mlflow",
    "wandb",
)

# A pytest plugin that prints, once collection is over, each heavy module imported and the first
# collector (a test module, usually) after whose collection it was seen.
PROBE = """
import json
import sys

HEAVY = {heavy!r}
FIRST_SEEN = {{}}


def _look(where):
    for name in list(sys.modules):
        top = name.partition(".")[0]
        if top in HEAVY and top not in FIRST_SEEN:
            FIRST_SEEN[top] = where


def pytest_collectreport(report):
    _look(report.nodeid or "(start-up)")


def pytest_collection_finish(session):
    _look("(end of collection)")
    print("HEAVY-IMPORTED", json.dumps(FIRST_SEEN, sort_keys=True))
"""


def test_collecting_the_fast_loop_imports_no_heavy_framework(tmp_path):
    (tmp_path / "heavy_import_probe.py").write_text(PROBE.format(heavy=HEAVY))
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-m",
            "not slow",
            "-p",
            "heavy_import_probe",
            "-p",
            "no:cacheprovider",
            str(TESTS),
        ],
        cwd=TESTS.parent,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("HEAVY-IMPORTED ")]
    imported = json.loads(line.removeprefix("HEAVY-IMPORTED "))
    assert imported == {}, f"collection imported {imported} (module: first collector after which it was seen)"
