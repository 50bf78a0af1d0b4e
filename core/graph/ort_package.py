"""Which pip package installed the onnxruntime that runs: ``onnxruntime-gpu`` or ``onnxruntime``.

layerscope depends on ``onnxruntime-gpu`` on Linux x86-64 (CUDA built in; it runs on CPU-only machines
too) and on ``onnxruntime`` elsewhere. On a CPU-only Linux machine the smaller CPU build, ``onnxruntime``,
can replace it (Getting started, "CPU-only machines"). Both packages install the same ``onnxruntime``
folder, so with both installed the one installed last has overwritten the other's files and
uninstalling either breaks the other. The package is read from the installed distributions' file lists
(their ``RECORD``): the one that lists the ``onnxruntime/__init__.py`` Python imports.
"""

from __future__ import annotations

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


def ort_package() -> tuple[str | None, list[str]]:
    """The package that installed the imported onnxruntime (``None`` when pip did not), as a run's provenance
    records it (``runtime.onnxruntime_package``), and a warning when both packages installed it."""
    import onnxruntime

    packages = installing_packages(onnxruntime.__file__)
    if len(packages) < 2:
        return (packages[0] if packages else None), []
    return " + ".join(packages), [
        f"both {' and '.join(packages)} are installed: they share the onnxruntime folder, so the one installed "
        "last has overwritten the other's files; keep one: pip uninstall -y onnxruntime onnxruntime-gpu, then "
        "pip install onnxruntime-gpu (or onnxruntime, the CPU build)"
    ]
