"""The command line starts without the heavy frameworks: help, version, plugins and
``validate --no-model`` import neither torch nor onnx, onnxruntime or scipy."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import numpy as np

import layerscope
from layerscope.graph.ort_package import ORT_PACKAGES

HEAVY = ("torch", "onnxruntime", "scipy", "onnx")

# Runs the command line in this interpreter, then prints which heavy modules were imported.
PROBE = """
import sys
from layerscope.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("IMPORTED", [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
sys.exit(code)
"""


def probe(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True)
    line = next(line for line in done.stderr.splitlines() if line.startswith("IMPORTED"))
    return done, eval(line.removeprefix("IMPORTED "))


def test_importing_the_command_line_leaves_torch_out():
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, layerscope.cli.main, layerscope; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{HEAVY!r} + ('sklearn', 'matplotlib')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "[]"


def test_help_version_and_plugins_import_no_framework():
    for args in (["--help"], ["--version"], ["plugins"], ["plugins", "information_plane"], ["cache", "list"]):
        done, imported = probe(*args)
        assert done.returncode == 0 and imported == [], (args, imported, done.stderr[-500:])
    done, _ = probe("--version")
    version, runtime = done.stdout.strip().splitlines()
    assert version == f"layerscope {layerscope.__version__}"
    package = next((p for p in ORT_PACKAGES if runtime.endswith(f"(the {p} package)")), None)
    assert package is not None, runtime  # onnxruntime's version, and the package that installed it
    assert runtime == f"onnxruntime {metadata.version(package)} (the {package} package)"
    done, _ = probe("plugins")
    assert {"activation_entropy", "linear_cka"} <= {p["name"] for p in json.loads(done.stdout)}


def test_validate_without_the_model_imports_no_framework(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(30, 64)).astype(np.float32), y=np.arange(30) % 3)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {source: demo:digits-mlp}\ndata: {source: npz, path: data.npz}\n"
        "analyses: [{id: ip, estimator: information_plane}, {id: md, estimator: mean_dimension}]\n"
    )
    done, imported = probe("validate", str(spec), "--no-model")
    assert done.returncode == 0 and "ok: labels" in done.stdout and imported == [], (imported, done.stderr)


def test_a_module_imported_on_first_use_behaves_as_the_module():
    from layerscope.util.lazy import lazy_module

    deferred = lazy_module("json")  # already imported: the module itself
    assert deferred is json
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from layerscope.util.lazy import lazy_module; "
            "colorsys = lazy_module('colorsys'); assert 'colorsys' not in sys.modules; "
            "print(colorsys.rgb_to_hsv(1, 0, 0), 'colorsys' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "(0.0, 1.0, 1) True"
