"""Whole processes, as a user meets them: ``layerscope run SPEC`` against the script they would write instead.

Two scenarios, each a fresh process per measurement (imports, model loading and writing the results
included), ``--rounds`` rounds interleaved, medians:

- ``resnet18``: ResNet-18 (``architectures.py``, random weights) given as an ``.onnx`` file, activation
  entropy of every ReLU on 128 images 3×64×64 with 10 classes, results written as JSON. Beside it: a
  script with hand-written PyTorch forward hooks computing the same per-class and pooled entropies from
  the model's ``state_dict`` (torch with its default threads, its best case), plain onnxruntime
  inference of the ``.onnx`` file, and ``python -c "import torch"`` for the floor. Target: ``layerscope
  run`` at least as fast as the hooks script on an idle machine.
- ``gpt2``: GPT-2 small (``transformers``' default configuration, random weights, eager attention) as
  an ``.onnx`` file, the default activation entropy and non-linearity signature analyses (every GELU
  and, for the signature, every attention map) on 64 sequences of 128 tokens, against plain onnxruntime
  inference of the same data. Target: within 3× onnxruntime's time.

Run: ``python tests/benchmarks/bench_process.py [--scenarios resnet18,gpt2] [--rounds 5] [--load 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSES = 10

HOOKS_SCRIPT = """
import json, sys
import numpy as np
import torch
sys.path.insert(0, {here!r})
from architectures import resnet18

model = resnet18()
model.load_state_dict(torch.load({weights!r}))
model.eval()
archive = np.load({data!r})
x, y = torch.from_numpy(archive["x"]), torch.from_numpy(archive["y"])
counts, state = {{}}, {{}}

def hook(module, inputs, output):
    on = (output > 0).flatten(1).float()
    key = state["call"]
    counts[key] = counts.get(key, 0) + state["labels"].T @ on
    state["call"] += 1

for module in model.modules():
    if isinstance(module, torch.nn.ReLU):
        module.register_forward_hook(hook)
with torch.no_grad():
    for start in range(0, len(x), 32):
        state["call"], state["labels"] = 0, torch.nn.functional.one_hot(y[start:start + 32], {classes}).float()
        model(x[start:start + 32])
samples = torch.bincount(y, minlength={classes}).double()
results = []
for key, on in counts.items():
    for label, p in [*enumerate(on.double() / samples[:, None]), ("all", on.double().sum(0) / samples.sum())]:
        p = p.clamp(0, 1)
        bits = (torch.special.entr(p) + torch.special.entr(1 - p)).mean() / np.log(2)
        results.append({{"call": key, "class": label, "entropy": float(bits)}})
json.dump(results, open({out!r}, "w"))
"""

ORT_SCRIPT = """
import numpy as np, onnxruntime as ort
archive = np.load({data!r})
session = ort.InferenceSession({model!r}, providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
arrays = [archive["ids"], archive["mask"]] if "ids" in archive.files else [archive["x"]]
for start in range(0, len(arrays[0]), 32):
    session.run(None, {{n: a[start:start + 32] for n, a in zip(names, arrays)}})
"""


def prepare_resnet18(folder: Path) -> dict[str, list[str]]:
    """The files of the ResNet-18 scenario; returns the command of each system."""
    import numpy as np
    import onnx
    import torch

    sys.path.insert(0, str(HERE))
    from architectures import build

    from layerscope.adapters.torch_export import export_to_onnx

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((128, 3, 64, 64), dtype=np.float32), rng.integers(0, CLASSES, 128)
    np.savez(folder / "images.npz", x=x, y=y)
    model = build("resnet18")
    torch.save(model.state_dict(), folder / "resnet18.pt")
    onnx.save(export_to_onnx(model, x[:2]), str(folder / "resnet18.onnx"))
    (folder / "resnet18.yaml").write_text(
        "model: {source: resnet18.onnx}\n"
        "data: {source: npz, path: images.npz, batch_size: 32, shuffle: false}\n"
        "analyses: [{id: entropy, estimator: activation_entropy}]\n"
        "outputs: {dir: out-resnet18, formats: [json]}\n"
    )
    hooks = HOOKS_SCRIPT.format(
        here=str(HERE),
        weights=str(folder / "resnet18.pt"),
        data=str(folder / "images.npz"),
        out=str(folder / "hooks.json"),
        classes=CLASSES,
    )
    ort_script = ORT_SCRIPT.format(data=str(folder / "images.npz"), model=str(folder / "resnet18.onnx"))
    return {
        "layerscope run": [sys.executable, "-m", "layerscope", "run", "--quiet", str(folder / "resnet18.yaml")],
        "hooks script": [sys.executable, "-c", hooks],
        "onnxruntime": [sys.executable, "-c", ort_script],
        "import torch": [sys.executable, "-c", "import torch"],
    }


def prepare_gpt2(folder: Path) -> dict[str, list[str]]:
    """The files of the GPT-2 scenario; returns the command of each system."""
    import numpy as np
    import onnx

    sys.path.insert(0, str(HERE))
    from architectures import build

    from layerscope.adapters.torch_export import export_to_onnx

    rng = np.random.default_rng(0)
    ids, mask = rng.integers(1, 1000, (64, 128)), np.ones((64, 128), np.int64)
    np.savez(folder / "tokens.npz", ids=ids, mask=mask, y=rng.integers(0, CLASSES, 64))
    example = {"input_ids": ids[:2], "attention_mask": mask[:2]}
    onnx.save(export_to_onnx(build("gpt2"), example), str(folder / "gpt2.onnx"))
    (folder / "gpt2.yaml").write_text(
        "model: {source: gpt2.onnx}\n"
        "data: {source: npz, path: tokens.npz, inputs: {input_ids: ids, attention_mask: mask}, batch_size: 32}\n"
        "analyses:\n  - {id: entropy, estimator: activation_entropy}\n"
        "  - {id: signature, estimator: nonlinearity_signature}\n"
        "outputs: {dir: out-gpt2, formats: [json]}\n"
    )
    ort_script = ORT_SCRIPT.format(data=str(folder / "tokens.npz"), model=str(folder / "gpt2.onnx"))
    return {
        "layerscope run": [sys.executable, "-m", "layerscope", "run", "--quiet", str(folder / "gpt2.yaml")],
        "onnxruntime": [sys.executable, "-c", ort_script],
    }


def seconds(command: list[str], folder: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=folder, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", default="resnet18,gpt2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load", type=int, default=0, help="CPU-bound processes running beside the measurements")
    args = parser.parse_args()
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    prepare = {"resnet18": prepare_resnet18, "gpt2": prepare_gpt2}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"whole processes; competing CPU-bound processes: {args.load}; medians of {args.rounds} rounds")
            for scenario in args.scenarios.split(","):
                folder = Path(tmp) / scenario
                folder.mkdir()
                commands = prepare[scenario](folder)
                times: dict[str, list[float]] = {name: [] for name in commands}
                for _ in range(args.rounds):
                    for name, command in commands.items():
                        times[name].append(seconds(command, folder))
                median = {name: statistics.median(t) for name, t in times.items()}
                ours = median["layerscope run"]
                print(
                    f"{scenario}: "
                    + ", ".join(f"{name} {value:.2f} s" for name, value in median.items())
                    + "; layerscope run ÷ "
                    + ", ".join(
                        f"{name} {value / ours:.2f}x" for name, value in median.items() if name != "layerscope run"
                    )
                    + " (speed relative to each: above 1 is faster)",
                    flush=True,
                )
    finally:
        for process in load:
            process.kill()


if __name__ == "__main__":
    main()
