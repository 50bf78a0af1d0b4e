"""The ``images`` data source: memory that stays flat in the number of images, and decoding
throughput beside the model's own inference (issue: real data).

(a) Peak resident set (``VmHWM``) of a fresh process running activation entropy on the small CNN of
    ``specs/images`` over N and 10·N PNG images (64×64 RGB, resize 40, center_crop 32); the target
    is growth below 10 %.
(b) Samples per second of decoding + preprocessing alone (``ImagesSource.read`` over every image,
    1 thread and the default threads) beside plain onnxruntime inference of the model on the same
    batches, for the demo CNN (8×8 grey PNGs) and ResNet-18 (``architectures.py``, random weights;
    JPEG photos of 320×240 resized to 256 and centre-cropped to 224, ImageNet normalisation).

Run: ``python tests/benchmarks/bench_images.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BATCH = 32
SMALL = 200


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))


def write_images(folder: Path, count: int, size: tuple[int, int], suffix: str, grey: bool = False) -> Path:
    """*count* random-texture images of *size* (w, h) in two class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        shape = (size[1], size[0]) if grey else (size[1], size[0], 3)
        smooth = rng.integers(0, 256, shape).astype(np.uint8)
        target = folder / ("ab"[index % 2])
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth).save(target / f"{index:05d}{suffix}", quality=90)
    return folder


def child_memory(folder: str) -> dict:
    """In a fresh process: activation entropy on the small CNN of specs/images over the images in *folder*."""
    sys.path.insert(0, str(REPO / "specs" / "images"))
    from small_cnn import make_net

    import layerscope

    spec = {
        "model": {"source": make_net()},
        "data": {"source": "images", "path": folder, "resize": 40, "center_crop": 32, "batch_size": BATCH},
        "analyses": [{"id": "entropy", "estimator": "activation_entropy"}],
    }
    start = time.perf_counter()
    results = layerscope.run(spec, write=False, progress=False)
    return {"peak": _peak_rss(), "records": len(results.records), "seconds": time.perf_counter() - start}


def measure_memory(root: Path) -> dict:
    figures = {}
    for count in (SMALL, 10 * SMALL):
        folder = write_images(root / f"mem{count}", count, (64, 64), ".png")
        done = subprocess.run(
            [sys.executable, __file__, "--child-memory", str(folder)], capture_output=True, text=True, check=True
        )
        figures[count] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def throughput(folder: Path, params: dict, onnx_path: Path, threads: int | None) -> dict:
    """Samples/s of decoding alone and of onnxruntime inference alone, over the same batches."""
    import onnxruntime as ort

    from layerscope.plugins.data.images import ImagesSource

    extra = {} if threads is None else {"threads": threads}
    source = ImagesSource(ImagesSource.Params(path=str(folder), **params, **extra), Path("."))
    batches = [np.arange(start, min(start + BATCH, len(source))) for start in range(0, len(source), BATCH)]
    start = time.perf_counter()
    decoded = [source.read(indices)[0] for indices in batches]
    decode = time.perf_counter() - start
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name, shape = session.get_inputs()[0].name, session.get_inputs()[0].shape
    start = time.perf_counter()
    for x in decoded:
        session.run(None, {name: x.reshape(len(x), *shape[1:]) if all(isinstance(d, int) for d in shape[1:]) else x})
    infer = time.perf_counter() - start
    return {"decode_per_s": len(source) / decode, "infer_per_s": len(source) / infer}


def _export(module, example, path: Path) -> Path:
    import torch

    torch.onnx.export(
        module.eval(), (example,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    return path


def measure_throughput(root: Path) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from architectures import build

    from layerscope.adapters.demo_zoo import EPOCHS, ensure_trained, epoch_label

    figures = {}
    digits = write_images(root / "digits", 1024, (8, 8), ".png", grey=True)
    resnet_images = write_images(root / "photos", 256, (320, 240), ".jpg")
    resnet = _export(build("resnet18"), torch.rand(2, 3, 224, 224), root / "resnet18.onnx")
    cases = {
        "demo CNN (8×8 grey PNG)": (
            digits,
            {"color": "grey"},
            ensure_trained("digits-cnn") / f"{epoch_label(EPOCHS)}.onnx",
        ),
        "ResNet-18 (320×240 JPEG → 224)": (
            resnet_images,
            {"resize": 256, "center_crop": 224, "normalize": "imagenet"},
            resnet,
        ),
    }
    for label, (folder, params, model) in cases.items():
        for threads in (1, None):
            figures[f"{label}, {'1 thread' if threads == 1 else 'default threads'}"] = throughput(
                folder, params, model, threads
            )
    return figures


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        memory = measure_memory(root)
        small, large = memory[SMALL], memory[10 * SMALL]
        print(
            f"(a) peak RSS, {SMALL} images: {small['peak'] / 2**20:.0f} MiB ({small['seconds']:.1f} s); "
            f"{10 * SMALL} images: {large['peak'] / 2**20:.0f} MiB ({large['seconds']:.1f} s); "
            f"growth {100 * (large['peak'] / small['peak'] - 1):+.1f} % (target < 10 %)"
        )
        print("(b) samples/s: decoding + preprocessing | onnxruntime inference | ratio")
        for label, figure in measure_throughput(root).items():
            print(
                f"    {label}: {figure['decode_per_s']:.0f} | {figure['infer_per_s']:.0f} | "
                f"{figure['decode_per_s'] / figure['infer_per_s']:.2f}"
            )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child-memory":
        print(json.dumps(child_memory(sys.argv[2])))
    else:
        main()
