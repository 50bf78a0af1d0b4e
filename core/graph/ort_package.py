"""Which pip package installed the onnxruntime that runs: ``onnxruntime-gpu`` or ``onnxruntime``.

layerscope depends on ``onnxruntime-gpu`` on Linux x86-64 (CUDA built in; it runs on CPU-only machines
too) and on ``onnxruntime`` elsewhere. On a CPU-only Linux machine the smaller CPU build, ``onnxruntime``,
can replace it (Getting started, "CPU-only machines"). Both packages install the same ``onnxruntime``
folder, so with both installed the one installed last has overwritten the other's files and
uninstalling either breaks the other. The package is read from the installed distributions' file lists
(their ``RECORD``): the one that lists the ``onnxruntime/__init__.py`` Python imports.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

#: The pip packages that install the ``onnxruntime`` import package: the CPU build and the CUDA build.
ORT_PACKAGES = ("onnxruntime", "onnxruntime-gpu")

#: The file of the import package that identifies an installation of it.
INIT_FILE = "onnxruntime/__init__.py"


def installing_packages(module_file: str | Path, path: list[str] | None = None) -> list[str]:
    """The packages of :data:`ORT_PACKAGES` installed on *path* (default ``sys.path``) whose file list holds
    *module_file*, the ``onnxruntime/__init__.py`` that Python imports; empty for an onnxruntime that pip
    did not install (a source build, conda's package)."""
    target = Path(module_file).resolve()
    found = []
    for package in ORT_PACKAGES:
        for distribution in metadata.distributions(name=package, path=sys.path if path is None else path):
            files = distribution.files or []
            if any(str(f) == INIT_FILE and Path(str(distribution.locate_file(f))).resolve() == target for f in files):
                found.append(package)
                break
    return found


def installed_onnxruntime() -> str:
    """``onnxruntime 1.31.1 (the onnxruntime-gpu package)``: the version and package of the onnxruntime Python
    would import, found without importing it (``layerscope --version``)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return "onnxruntime: not installed"
    packages = installing_packages(spec.origin)
    if not packages:
        return f"onnxruntime at {Path(spec.origin).parent} (not installed by pip)"
    version = metadata.version(packages[-1])
    return f"onnxruntime {version} (the {' and '.join(packages)} package{'s' if len(packages) > 1 else ''})"


def ort_package() -> tuple[str | None, list[str]]:
    """The package that installed the imported onnxruntime as a run's provenance records it
    (``runtime.onnxruntime_package``), and the warnings it calls for (:func:`package_provenance`)."""
    import onnxruntime

    return package_provenance(installing_packages(onnxruntime.__file__))


def package_provenance(packages: list[str]) -> tuple[str | None, list[str]]:
    """*packages* (those that installed onnxruntime) as provenance: the one, ``None`` for none (not installed by
    pip), ``onnxruntime + onnxruntime-gpu`` with a warning for both (they overwrite each other's files)."""
    if len(packages) < 2:
        return (packages[0] if packages else None), []
    return " + ".join(packages), [
        f"both {' and '.join(packages)} are installed: they share the onnxruntime folder, so the one installed "
        "last has overwritten the other's files; keep one: pip uninstall -y onnxruntime onnxruntime-gpu, then "
        "pip install onnxruntime-gpu (or onnxruntime, the CPU build)"
    ]
