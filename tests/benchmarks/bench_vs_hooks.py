"""layerscope against hand-written PyTorch forward hooks and plain onnxruntime (issue: speed).

For ResNet-18, ResNet-50 and MobileNetV3-small (``architectures.py``, random weights) on synthetic
224×224 images with 10 classes, and BERT-base and GPT-2 small (``transformers`` configurations,
random weights) on sequences of 128 random token ids, three ways of getting the same numbers:

- ``layerscope``: ``layerscope.run`` on the exported ``.onnx`` (export not timed), the
  analysis's default selector (every activation output), whole run including session set-up;
- ``hooks``: the PyTorch model in eager mode with a forward hook on every activation module
  (``ReLU``, ``Hardswish``, ``Hardsigmoid``; the transformers' GELU modules) computing the same
  statistic (a competent hand-written version: counts per class through one one-hot matrix
  product per activation call; each token a sample in the token models, as layerscope counts
  them), torch on one thread as layerscope runs torch (``--hook-threads``);
- ``onnxruntime``: plain inference of the same graph, nothing fetched but the output, session
  creation included.

``--estimator`` picks the statistic: ``activation_entropy`` (binary, per class and pooled; the
default), ``nonlinearity_signature`` (the affinity score of every activation, side metrics off;
the torch version keeps each activation's spatially averaged input and output through pre- and
post-forward hooks, then per activation: covariances + 1e-6·I, matrix square roots by ``eigh``,
the Monge map and POT's exact ``emd2``, as the paper's code does) or ``information_plane``
(I(X;T) and I(T;Y) per batch of 32 with fixed widths σ = 50, σ_x = 400, σ_y = 0.1, α = 1.01,
softmax on the output; the torch version computes Gram matrices exp(−‖a − b‖²/σ²) from ``cdist`` per hook call,
normalises them and takes ``eigvalsh``, then averages over batches). For the last two the
output also gives the largest difference between layerscope's values and the torch version's,
matched in forward order. Each measurement runs in a fresh process, ``--rounds`` rounds
interleaved, medians reported as samples/s and ratios. The token models' layerscope runs select
``{activation: output}`` (the GELUs the hooks see) rather than an estimator's default.

``--samples A,B`` measures every system at two sample counts and fits a straight line through
them: the fixed cost (seconds at zero samples: imports excluded, session creation, export-free
model loading, planning) and the cost per sample, reported apart, with the ratios of the
per-sample costs and of the totals at B.
``--threads 1`` sets OMP_NUM_THREADS=1 (and onnxruntime's and torch's threads) in the
measured processes; ``--load 2`` runs two CPU-bound processes beside them.

Run: ``python tests/benchmarks/bench_vs_hooks.py [--estimator NAME] [--threads 1] [--load 2]
[--models resnet18,bert_base,...] [--samples 32,128] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLES = {"resnet18": 128, "resnet50": 64, "mobilenet_v3_small": 256, "bert_base": 64, "gpt2": 64}
BATCH, CLASSES, SEQUENCE = 32, 10, 128
ACTIVATIONS = ("ReLU", "Hardswish", "Hardsigmoid", "GELUActivation", "NewGELUActivation")
ANALYSES = {
    "activation_entropy": {"estimator": "activation_entropy"},
    "nonlinearity_signature": {"estimator": "nonlinearity_signature", "params": {"side_metrics": False}},
    "information_plane": {
        "estimator": "information_plane",
        "params": {"sigma": 50.0, "sigma_x": 400.0, "batch_size": BATCH},
    },
}


def is_tokens(name: str) -> bool:
    sys.path.insert(0, str(HERE))
    from architectures import TOKEN_MODELS

    return name in TOKEN_MODELS


def prepare(name: str, folder: Path, counts: list[int]) -> tuple[Path, dict[int, Path]]:
    """The exported ONNX graph for *name* and, for each sample count, an npz of the first that many
    synthetic samples (images ``x`` or token ids ``ids`` with their mask ``mask``) and labels ``y``."""
    import numpy as np
    import onnx

    sys.path.insert(0, str(HERE))
    from architectures import build

    from layerscope.adapters.torch_export import export_to_onnx

    rng = np.random.default_rng(0)
    most = max(counts)
    if is_tokens(name):
        arrays = {"ids": rng.integers(1, 1000, (most, SEQUENCE)), "mask": np.ones((most, SEQUENCE), np.int64)}
        example = {"input_ids": arrays["ids"][:2], "attention_mask": arrays["mask"][:2]}
    else:
        arrays = {"x": rng.standard_normal((most, 3, 224, 224), dtype=np.float32)}
        example = arrays["x"][:2]
    arrays["y"] = rng.integers(0, CLASSES, most)
    model = folder / f"{name}.onnx"
    data = {count: folder / f"{name}-{count}.npz" for count in counts}
    for count, path in data.items():
        np.savez(path, **{key: value[:count] for key, value in arrays.items()})
    onnx.save(export_to_onnx(build(name), example), str(model))
    return model, data


def measure_layerscope(estimator: str, model: Path, data: Path) -> tuple[float, dict[str, float]]:
    """Seconds of the whole run, and the headline values by layer (signature: ρ_aff per activation;
    information plane: I(X;T) and I(T;Y) per layer, the model output's under ``output``)."""
    import numpy as np

    import layerscope
    import layerscope.engine.execute
    from layerscope.plugins.nonlinearity_signature.maths import import_pot

    import_pot()  # and POT

    tokens = "ids" in np.load(data).files
    spec = {
        "model": {"source": str(model)},
        "data": {"source": "npz", "path": str(data), "batch_size": BATCH, "shuffle": False},
        "analyses": [{"id": "a", **ANALYSES[estimator], **({"on": {"activation": "output"}} if tokens else {})}],
    }
    if tokens:
        spec["data"]["inputs"] = {"input_ids": "ids", "attention_mask": "mask"}
    started = time.perf_counter()
    records = layerscope.run(spec, write=False, progress=False).records
    seconds = time.perf_counter() - started
    if estimator == "nonlinearity_signature":
        return seconds, {r["layer"]: r["value"] for r in records if r["metric"] == "affinity_score"}
    if estimator == "information_plane":
        output = [r["layer"] for r in records if r["metric"] == "I_XT"][-1]  # the model output comes last
        return seconds, {
            f"{'output' if r['layer'] == output else r['layer']}:{r['metric']}": r["value"]
            for r in records
            if r["metric"] in ("I_XT", "I_TY")
        }
    return seconds, {}


def call_labels(model) -> tuple[dict, list[str]]:
    """Forward hooks' way of naming activation calls as layerscope does: the module path, ``#k`` for
    its k-th call in one forward pass."""
    names = {module: name for name, module in model.named_modules() if type(module).__name__ in ACTIVATIONS}
    return names, []


def label_call(names: dict, module, seen: list[str]) -> str:
    name = names[module]
    calls = seen.count(name)
    seen.append(name)
    return name if calls == 0 else f"{name}#{calls + 1}"


def measure_onnxruntime(model: Path, data: Path) -> float:
    import numpy as np
    import onnxruntime as ort

    archive = np.load(data)
    started = time.perf_counter()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    arrays = [archive["ids"], archive["mask"]] if "ids" in archive.files else [archive["x"]]
    for start in range(0, len(arrays[0]), BATCH):
        session.run(None, {name: array[start : start + BATCH] for name, array in zip(names, arrays)})
    return time.perf_counter() - started


def measure_hooks(estimator: str, name: str, data: Path) -> tuple[float, dict[str, float]]:
    return {
        "activation_entropy": hooks_entropy,
        "nonlinearity_signature": hooks_signature,
        "information_plane": hooks_information_plane,
    }[estimator](name, data)


def model_and_data(name: str, data: Path):
    """The eager PyTorch model *name* (same random weights as the exported graph), the samples of *data*
    as a tensor (images) or a dict of tensors (token ids and mask), and the labels."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from architectures import build

    torch.set_num_threads(HOOK_THREADS)
    archive = np.load(data)
    if "ids" in archive.files:
        x = {"input_ids": torch.from_numpy(archive["ids"]), "attention_mask": torch.from_numpy(archive["mask"])}
    else:
        x = torch.from_numpy(archive["x"])
    return build(name), x, torch.from_numpy(archive["y"])


def rows(x, start: int):
    """The batch of samples *x* (a tensor or a dict of tensors) from *start*."""
    if isinstance(x, dict):
        return {key: value[start : start + BATCH] for key, value in x.items()}
    return x[start : start + BATCH]


def call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


def per_token(t, mask):
    """Samples × features of an activation: each real token a sample in a token model (*mask* given),
    each image a sample otherwise."""
    if mask is None or t.ndim != 3:
        return t.flatten(1)
    return t[mask.bool()]


def hooks_entropy(name: str, data: Path) -> tuple[float, dict[str, float]]:
    import torch

    model, x, y = model_and_data(name, data)
    counts: dict[int, torch.Tensor] = {}
    state: dict = {"call": 0, "labels": None, "mask": None}
    samples = torch.zeros(CLASSES, dtype=torch.float64)

    def hook(module, inputs, output):
        on = per_token(output > 0, state["mask"]).to(torch.float32)
        per_class = state["labels"].T @ on  # (classes, neurons) on-counts
        key = state["call"]
        counts[key] = counts[key] + per_class if key in counts else per_class
        state["call"] += 1

    for module in model.modules():
        if type(module).__name__ in ACTIVATIONS:
            module.register_forward_hook(hook)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(y), BATCH):
            batch, labels = rows(x, start), y[start : start + BATCH]
            state["mask"] = batch["attention_mask"] if isinstance(batch, dict) else None
            if state["mask"] is not None:  # a label per real token
                labels = labels[:, None].expand_as(state["mask"])[state["mask"].bool()]
            state["call"], state["labels"] = 0, torch.nn.functional.one_hot(labels, CLASSES).float()
            samples += state["labels"].sum(0).double()
            call(model, batch)
    for on in counts.values():  # the entropies themselves: per class and pooled
        for p in (on.double() / samples[:, None], on.double().sum(0) / samples.sum()):
            p = p.clamp(0, 1)
            (torch.special.entr(p) + torch.special.entr(1 - p)).mean(-1)
    return time.perf_counter() - started, {}


def _sqrtm(matrix):
    import torch

    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def affinity(x, y) -> float:
    """ρ_aff as the paper's code computes it: Gaussian fits with 1e-6 jitter, the Monge map
    Σ_y^½ (Σ_y^½ Σ_x Σ_y^½)^-½ Σ_y^½, exact OT between the mapped inputs and the outputs; both
    samples first divided by the input's root mean variance, as layerscope does (the jitter then
    acts at unit scale: spatially averaged activations of random images have variances near 1e-4), and
    the squared distances taken about the outputs' mean, as layerscope does."""
    import numpy as np
    import torch

    from layerscope.plugins.nonlinearity_signature.maths import import_pot

    ot = import_pot()  # POT without its TensorFlow/JAX backends, imported before timing as layerscope's is
    scale = float(x.var(dim=0).mean().sqrt())
    x, y = (x / scale, y / scale) if scale > 0 else (x, y)

    eye = torch.eye(x.shape[1], dtype=torch.float64)
    cov_x, cov_y = torch.cov(x.T) + 1e-6 * eye, torch.cov(y.T) + 1e-6 * eye
    root_y = _sqrtm(cov_y)
    middle = _sqrtm(root_y @ cov_x @ root_y)
    a = root_y @ torch.linalg.inv(middle) @ root_y
    mapped = y.mean(0) + (x - x.mean(0)) @ a
    centre = y.mean(0)  # W2 is translation invariant; uncentred, ‖a‖² + ‖b‖² − 2a·b cancels far from 0
    cost = torch.cdist(mapped - centre, y - centre) ** 2
    weights = np.full(len(x), 1 / len(x))
    w2 = ot.emd2(weights, weights, cost.numpy(), numItermax=10_000_000)
    return 1 - float(np.sqrt(w2 / (2 * torch.trace(cov_y))))


def _forward_batches(model, x, samples: int, before_batch=None):
    import torch

    with torch.no_grad():
        for start in range(0, samples, BATCH):
            if before_batch is not None:
                before_batch(start)
            call(model, rows(x, start))


def hooks_signature(name: str, data: Path) -> tuple[float, dict[str, float]]:
    import torch

    from layerscope.plugins.nonlinearity_signature.maths import import_pot

    model, x, y = model_and_data(name, data)
    import_pot()  # imported before timing, like torch (POT would otherwise load TensorFlow: seconds)
    kept: dict[str, tuple[list, list]] = {}
    names, seen = call_labels(model)
    state: dict = {"label": None, "mask": None}

    def reduce(t):
        """Spatial mean of a feature map, mean over each sequence's real tokens, or the vector itself."""
        if t.ndim == 4:
            return t.mean(dim=(2, 3)).double()
        if t.ndim == 3:
            mask = state["mask"][..., None].to(t.dtype)
            return ((t * mask).sum(1) / mask.sum(1)).double()
        return t.flatten(1).double()

    def before(module, inputs):  # ResNet's ReLU works in place: keep the input before it runs
        state["label"] = label_call(names, module, seen)
        kept.setdefault(state["label"], ([], []))[0].append(reduce(inputs[0]))

    def after(module, inputs, output):
        kept[state["label"]][1].append(reduce(output))

    for module in names:
        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def before_batch(start: int) -> None:
        seen.clear()
        state["mask"] = x["attention_mask"][start : start + BATCH] if isinstance(x, dict) else None

    started = time.perf_counter()
    _forward_batches(model, x, len(y), before_batch)
    scores = {label: affinity(torch.cat(a), torch.cat(b)) for label, (a, b) in kept.items()}
    return time.perf_counter() - started, scores


def renyi(gram, alpha: float = 1.01) -> float:
    import torch

    a = gram / torch.trace(gram)
    values = torch.linalg.eigvalsh(a).clamp_min(0)
    return float(torch.log2((values**alpha).sum()) / (1 - alpha))


def hooks_information_plane(name: str, data: Path) -> tuple[float, dict[str, float]]:
    """I(X;T), I(T;Y) per activation call and for the output, averaged over batches of 32."""
    import numpy as np
    import torch

    model, x, y = model_and_data(name, data)
    sums: dict[str, np.ndarray] = {}
    names, seen = call_labels(model)
    state: dict = {}

    def gram(t, sigma):
        flat = t.flatten(1).double()
        return torch.exp(-(torch.cdist(flat, flat) ** 2) / sigma**2)  # the paper's K = exp(-‖a − b‖² / σ²)

    def measure(t, key):
        k_t = gram(t, 50.0)
        pair = [
            renyi(state["k_x"]) + renyi(k_t) - renyi(state["k_x"] * k_t),
            renyi(k_t) + renyi(state["k_y"]) - renyi(k_t * state["k_y"]),
        ]
        sums[key] = sums.get(key, 0) + np.array(pair)

    def hook(module, inputs, output):
        measure(output, label_call(names, module, seen))

    for module in names:
        module.register_forward_hook(hook)
    started = time.perf_counter()
    batches = 0
    with torch.no_grad():
        for start in range(0, len(x), BATCH):
            batch, labels = x[start : start + BATCH], y[start : start + BATCH]
            one_hot = torch.nn.functional.one_hot(labels, CLASSES).double()
            seen.clear()
            state.update(k_x=gram(batch, 400.0), k_y=torch.exp(-(torch.cdist(one_hot, one_hot) ** 2) / 0.01))
            measure(torch.softmax(model(batch), dim=1), "output")
            batches += 1
    seconds = time.perf_counter() - started
    return seconds, {
        f"{key}:{metric}": float(value)
        for key, pair in sums.items()
        for metric, value in zip(("I_XT", "I_TY"), pair / batches)
    }


def _child(estimator: str, system: str, name: str, model: str, data: str) -> None:
    seconds, values = {
        "layerscope": lambda: measure_layerscope(estimator, Path(model), Path(data)),
        "onnxruntime": lambda: (measure_onnxruntime(Path(model), Path(data)), {}),
        "hooks": lambda: measure_hooks(estimator, name, Path(data)),
    }[system]()
    print(json.dumps({"seconds": seconds, "values": values}))


def _run(estimator: str, system: str, name: str, model: Path, data: Path, args) -> dict:
    env = dict(os.environ, BENCH_HOOK_THREADS=str(args.hook_threads))
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(
        [sys.executable, __file__, "--child", estimator, system, name, str(model), str(data)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def line(counts: list[int], seconds: list[float]) -> tuple[float, float]:
    """(fixed seconds, seconds per sample) of the straight line through two (count, seconds) points."""
    (n0, t0), (n1, t1) = zip(counts, seconds)
    per_sample = (t1 - t0) / (n1 - n0)
    return t0 - per_sample * n0, per_sample


def agreement(values: dict[str, dict[str, float]]) -> str:
    """How far layerscope's values are from the hooks', matched by layer."""
    if not values["hooks"]:
        return ""
    ours, theirs = values["layerscope"], values["hooks"]
    gaps = sorted(abs(ours[k] - theirs[k]) for k in ours.keys() & theirs.keys())
    if not gaps:
        return "   no common values"
    return (
        f"   {len(gaps)} of {len(theirs)} values in both: |Δ| median {statistics.median(gaps):.1e}, max {gaps[-1]:.1e}"
    )


def measure(name: str, counts: list[int], args, folder: Path) -> None:
    """Every system at every sample count of *name*, ``args.rounds`` interleaved rounds; prints one line (one
    count) or the fixed and per-sample costs (two counts)."""
    model, data = prepare(name, folder, counts)
    systems = ("layerscope", "onnxruntime", "hooks")
    times: dict[tuple[str, int], list[float]] = {(system, n): [] for system in systems for n in counts}
    values: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for n in counts:
            for system in systems:
                measured = _run(args.estimator, system, name, model, data[n], args)
                times[system, n].append(measured["seconds"])
                values[system] = measured["values"]
    median = {key: statistics.median(t) for key, t in times.items()}
    last = counts[-1]
    rate = {system: last / median[system, last] for system in systems}
    if len(counts) == 1:
        print(
            f"{name:20s} {last:7d} {rate['layerscope']:11.1f} {rate['onnxruntime']:12.1f} "
            f"{rate['hooks']:8.1f} {rate['layerscope'] / rate['onnxruntime']:7.2f} "
            f"{rate['layerscope'] / rate['hooks']:8.2f}{agreement(values)}",
            flush=True,
        )
        return
    fits = {system: line(counts, [median[system, n] for n in counts]) for system in systems}
    print(
        f"{name:20s} "
        + " ".join(f"{fits[s][0]:7.2f}s {1000 * fits[s][1]:7.1f}ms" for s in systems)
        + f"   per sample: {fits['onnxruntime'][1] / fits['layerscope'][1]:5.2f}x ort"
        f" {fits['hooks'][1] / fits['layerscope'][1]:5.2f}x hooks;"
        f" at {last}: {rate['layerscope'] / rate['onnxruntime']:5.2f}x ort"
        f" {rate['layerscope'] / rate['hooks']:5.2f}x hooks{agreement(values)}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the measured processes")
    parser.add_argument("--hook-threads", type=int, default=1, help="torch threads of the hooks (layerscope's: 1)")
    parser.add_argument("--load", type=int, default=0, help="CPU-bound processes running beside the measurements")
    parser.add_argument("--models", default="resnet18,resnet50,mobilenet_v3_small")
    parser.add_argument("--estimator", default="activation_entropy", choices=list(ANALYSES))
    parser.add_argument("--samples", default=None, help="one count, or two for the fixed and per-sample costs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            print(
                f"{args.estimator}; threads: {args.threads or 'default'}, hooks' torch threads: {args.hook_threads}, "
                f"competing CPU-bound processes: {args.load}, {os.cpu_count()} cores; medians of {args.rounds} "
                "interleaved rounds"
            )
            counts = [int(n) for n in args.samples.split(",")] if args.samples else None
            if counts and len(counts) == 2:
                print(f"{'model':20s} " + " ".join(f"{s:>18s}" for s in ("layerscope", "onnxruntime", "hooks")))
                print(f"{'':20s} " + " ".join(f"{'fixed':>8s} {'per sample':>9s}" for _ in range(3)))
            else:
                print(
                    f"{'model':20s} {'samples':>7s} {'layerscope':>11s} {'onnxruntime':>12s} {'hooks':>8s}"
                    f" {'÷ ort':>7s} {'÷ hooks':>8s}   (samples/s)"
                )
            for name in args.models.split(","):
                if args.estimator == "information_plane" and is_tokens(name):
                    print(f"{name:20s} skipped: the torch information plane here takes images")
                    continue
                measure(name, counts or [SAMPLES[name]], args, Path(tmp))
    finally:
        for process in load:
            process.kill()


HOOK_THREADS = int(os.environ.get("BENCH_HOOK_THREADS", "1"))

if __name__ == "__main__":
    main()
