"""Shared fixtures: an isolated model cache and small real models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    """Demo models are trained once per test session into a private cache."""
    if "LAYERSCOPE_CACHE" not in os.environ:
        os.environ["LAYERSCOPE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture
def repo() -> Path:
    return REPO


def tiny_mlp_proto(inputs: int = 64, hidden: int = 16, outputs: int = 10, seed: int = 0):
    """A real ONNX graph x → Gemm → Relu → Gemm → Tanh → Gemm (layerscope.testing.models.tiny_mlp)."""
    from layerscope.testing.models import tiny_mlp

    return tiny_mlp(inputs, hidden, outputs, seed)


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    """Path of a tiny real ONNX MLP (64 inputs, 10 outputs)."""
    import onnx

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_mlp_proto(), str(path))
    return path


def run_in_subprocess(spec: Path, out: Path, **options) -> subprocess.CompletedProcess:
    """``layerscope run SPEC --out OUT`` in a fresh interpreter, as a user runs it (exit code, stderr);
    *options* go to :func:`subprocess.run` (``input``, ``env``, ``timeout``)."""
    command = [sys.executable, "-m", "layerscope", "run", str(spec), "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, **options)


def one_user_error(done: subprocess.CompletedProcess, out: Path) -> str:
    """The stderr of a run that ended with one user error (exit 2, one message, no traceback) and wrote no
    results.json in *out*."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("error:") == 1, done.stderr
    assert not (out / "results.json").exists()
    return done.stderr


def write_spec(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def digit_image_folder(tmp_path: Path, count: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """The first *count* test digits as grey PNGs in class folders (pixels 0..16 stored as 0..240), with
    the pixels as float32 scaled by 1/240 and the class names, in the order the source reads them (sorted paths)."""
    from PIL import Image

    from layerscope.plugins.data.digits import load_digits_split

    x, y = load_digits_split("test")
    pixels = np.round(x[:count].reshape(-1, 8, 8) * 240).astype(np.uint8)
    folder = tmp_path / "digits"
    for index in range(count):
        (folder / str(y[index])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[index]).save(folder / str(y[index]) / f"{index:04d}.png")
    order = sorted(range(count), key=lambda i: (str(y[i]), f"{i:04d}"))
    return folder, pixels[order, None].astype(np.float32) * np.float32(1 / 240), y[order].astype(str)


def blas_threads() -> dict[str, int]:
    """The threads of each BLAS library loaded in this process, by file (threadpoolctl). The libraries are
    looked up afresh: clear :func:`layerscope.engine.threads._blas_libraries` first so that the code under
    test limits every one loaded by now."""
    from threadpoolctl import threadpool_info

    return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}
