"""information_plane against a naive implementation written from the formula (issue: information plane).

The naive version does what the paper's code does: pairwise distances by broadcasting
an N×N×D difference tensor, recomputed for every σ of the alignment grid. Ours computes
the N×N squared distances once (‖x‖² + ‖y‖² − 2xyᵀ in float64) and evaluates the whole
grid on them. Both choose σ by kernel alignment with the labels and then estimate
I(X;T), I(T;Y) and H(T) for one batch of N = 100 samples of a 64×32×32 layer.

The naive grid is timed on 2 and on ``NAIVE_GRID`` widths and scaled to the full grid
from the difference (its cost per width is constant: one broadcast and one Gram matrix);
ours runs the full grid.
Peak memory is measured in fresh processes (resident-set high-water mark, reset after
set-up). Finally one full run of ``specs/information-plane.yaml`` is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

N, SHAPE, GRID, NAIVE_GRID = 100, (64, 32, 32), 300, 10
REPO = Path(__file__).resolve().parents[2]


def _data():
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((N, 64), dtype=np.float32))
    t = torch.from_numpy(np.maximum(rng.standard_normal((N, *SHAPE), dtype=np.float32), 0))
    y = torch.from_numpy(rng.integers(0, 10, N))
    return x, t, y


def naive(x, t, y, grid_points: int, alpha: float = 1.01):
    """The paper-code way: broadcast N×N×D differences, recomputed for every σ."""
    import torch

    def dist_mat(a):
        a = a.reshape(a.shape[0], -1)
        return (a.unsqueeze(1) - a.unsqueeze(0)).pow(2).sum(-1).double()

    def entropy(k):
        a = k / torch.trace(k)
        eigenvalues = torch.linalg.eigvalsh(a).abs()
        return float(torch.log2((eigenvalues**alpha).sum()) / (1 - alpha))

    k_y = torch.exp(-dist_mat(torch.nn.functional.one_hot(y).float()) / 0.1**2)
    mean_distance = float(dist_mat(t).sqrt().sum() / (N * (N - 1)))
    best, best_alignment = None, -1.0
    for sigma in torch.linspace(0.03, 10.0, GRID)[:grid_points] * mean_distance:
        k_t = torch.exp(-dist_mat(t) / sigma**2)
        alignment = float((k_t * k_y).sum() / (torch.linalg.norm(k_t) * torch.linalg.norm(k_y)))
        if alignment > best_alignment:
            best, best_alignment = float(sigma), alignment
    k_x = torch.exp(-dist_mat(x) / 1.0**2)
    k_t = torch.exp(-dist_mat(t) / best**2)
    h_t = entropy(k_t)
    return entropy(k_x) + h_t - entropy(k_x * k_t), h_t + entropy(k_y) - entropy(k_t * k_y)


def ours(x, t, y):
    """The estimator: width pass then estimate pass, on one batch."""
    from layerscope.plugins.information_plane.estimator import InformationPlane
    from layerscope.testing import feed, make_batches, tensor_infos

    batches = make_batches({"t": t.numpy()}, y.numpy(), batch_size=N, inputs=x.numpy())
    estimator = InformationPlane(InformationPlane.Params(sigma_x=1.0, sigma_grid=GRID), tensor_infos(batches))
    return feed(estimator, batches).finalize()


def _reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))


def worker(mode: str) -> dict:
    import torch

    x, t, y = _data()
    float(torch.ones(4).sum())
    base = _reset_peak_rss()
    start = time.perf_counter()
    if mode == "naive":
        naive(x, t, y, 2)
        two = time.perf_counter() - start
        peak = _status("VmHWM") - base
        start = time.perf_counter()
        naive(x, t, y, NAIVE_GRID)
        many = time.perf_counter() - start
        per_width = (many - two) / (NAIVE_GRID - 2)
        return {"seconds": many, "per_width": per_width, "full_grid": two + per_width * (GRID - 2), "peak": peak}
    ours(x, t, y)
    return {"seconds": time.perf_counter() - start, "peak": _status("VmHWM") - base}


def measure(mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import layerscope
    from layerscope.util.units import format_bytes

    d = 1
    for size in SHAPE:
        d *= size
    naive_run, ours_run = measure("naive"), measure("ours")
    per_width, naive_full = naive_run["per_width"], naive_run["full_grid"]
    print(f"N = {N}, layer {'×'.join(map(str, SHAPE))} = {d} features, grid {GRID} widths")
    print(
        f"naive (broadcast N×N×D, distances per width): {naive_run['seconds']:.2f} s for {NAIVE_GRID} widths, "
        f"{per_width:.3f} s per width → {naive_full:.1f} s for the full grid (scaled); "
        f"peak {format_bytes(naive_run['peak'])}"
    )
    print(
        f"ours (distances once, float64 Gram algebra): {ours_run['seconds']:.2f} s for the full grid; "
        f"peak {format_bytes(ours_run['peak'])}"
    )
    print(
        f"speed-up {naive_full / ours_run['seconds']:.0f}× on the full grid "
        f"({naive_run['seconds'] / ours_run['seconds']:.1f}× even against {NAIVE_GRID} naive widths; target ≥ 5×); "
        f"memory: N²·8 = {format_bytes(N * N * 8)}, N·D·4 = {format_bytes(N * d * 4)}, "
        f"N²·D·4 = {format_bytes(N * N * d * 4)}"
    )
    start = time.perf_counter()
    results = layerscope.run(REPO / "specs/information-plane.yaml", write=False, progress=False)
    print(
        f"specs/information-plane.yaml: {len(results.models)} checkpoints × {results.runtime['samples']} samples, "
        f"{len(results.records)} records in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2])))
    else:
        main()
