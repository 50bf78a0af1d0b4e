"""The pip package that installed onnxruntime (``onnxruntime-gpu`` or the CPU build ``onnxruntime``) is read from
the installed distributions' file lists and recorded with every run."""

from __future__ import annotations

from importlib import metadata

import pytest

import layerscope
from layerscope.graph.ort_package import ORT_PACKAGES, installing_packages, package_provenance


def install(site, package: str, version: str = "1.31.1", files=("onnxruntime/__init__.py",)) -> None:
    """What pip leaves in *site* for *package*: its files and a ``.dist-info`` folder with METADATA and RECORD."""
    for name in files:
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text("")
    info = site / f"{package.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    record = [f"{name},," for name in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")


def test_the_package_is_the_one_whose_files_hold_the_imported_module(tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    install(site, "onnxruntime")
    install(elsewhere, "onnxruntime-gpu")  # installed, but Python imports the other folder's module
    install(site, "onnx", files=("onnx/__init__.py",))
    imported = site / "onnxruntime" / "__init__.py"
    assert installing_packages(imported, path=[str(site), str(elsewhere)]) == ["onnxruntime"]
    assert installing_packages(elsewhere / "onnxruntime" / "__init__.py", path=[str(site), str(elsewhere)]) == [
        "onnxruntime-gpu"
    ]
    assert installing_packages(imported, path=[str(elsewhere)]) == []  # not installed by pip (a source build)


def test_both_packages_in_one_folder_are_both_named(tmp_path):
    install(tmp_path, "onnxruntime-gpu")
    install(tmp_path, "onnxruntime")  # pip overwrites the shared files without a word
    packages = installing_packages(tmp_path / "onnxruntime" / "__init__.py", path=[str(tmp_path)])
    assert packages == list(ORT_PACKAGES)
    recorded, (warning,) = package_provenance(packages)
    assert recorded == "onnxruntime + onnxruntime-gpu"
    assert warning.startswith("both onnxruntime and onnxruntime-gpu are installed: they share the onnxruntime folder")
    assert package_provenance(["onnxruntime"]) == ("onnxruntime", []) and package_provenance([]) == (None, [])


def test_a_run_records_the_package_that_installed_its_onnxruntime(tiny_onnx):
    import onnxruntime

    results = layerscope.run(
        {
            "model": {"source": str(tiny_onnx)},
            "data": {"source": "digits", "limit": 20},
            "analyses": [{"id": "e", "estimator": "activation_entropy"}],
        },
        write=False,
        progress=False,
    )
    package = results.runtime["onnxruntime_package"]
    if package is None:
        pytest.skip("onnxruntime was not installed by pip")
    assert package in ORT_PACKAGES
    assert metadata.version(package) == onnxruntime.__version__ == results.runtime["onnxruntime"]
    cuda_built = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert cuda_built == (package == "onnxruntime-gpu")
    assert not [w for w in results.warnings if "share the onnxruntime folder" in w]
