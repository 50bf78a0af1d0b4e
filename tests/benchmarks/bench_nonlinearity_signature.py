"""nonlinearity_signature on the demo CNN with 2048 samples (issue: non-linearity signature).

Reports the time of a whole run, the time of the signature itself (from the first batch
to the last record), the share spent inside the exact OT solver (target: everything
outside the solver ≤ 20 % of the total), the two exact solvers side by side (POT's
``ot.emd2`` and scipy's assignment), and a straightforward implementation (scipy
``sqrtm`` + ``inv`` + the same solver per activation) on the same samples. Last, a stream
ten times longer than ``samples``: the run as it is (the signature saturated after its samples,
the rest of the stream neither read nor run) against the same run fed every batch. And what the
check of the other ``jitter`` setting costs: each activation's score alone, with the check as the
estimator runs it (the other setting's OT problem solved only where the movement bound exceeds
1e-3), and with that problem always solved; on the demo CNN's activations and on a 512-wide ReLU.
"""

from __future__ import annotations

import time

import numpy as np

SAMPLES = 2048


def spec(solver: str) -> dict:
    return {
        "model": {"source": "demo:digits-cnn"},
        "data": {"source": "synthetic", "samples": SAMPLES, "shape": [1, 8, 8], "batch_size": 256},
        "analyses": [
            {"id": "sig", "estimator": "nonlinearity_signature", "params": {"samples": SAMPLES, "solver": solver}}
        ],
    }


def straightforward(x: np.ndarray, y: np.ndarray) -> float:
    """ρ_aff the direct way: scipy sqrtm/inv on the covariances, then the exact solver."""
    import ot
    import scipy.linalg

    cov_x = np.cov(x, rowvar=False) + 1e-6 * np.eye(x.shape[1])
    cov_y = np.cov(y, rowvar=False) + 1e-6 * np.eye(y.shape[1])
    root_y = scipy.linalg.sqrtm(cov_y).real
    a = root_y @ scipy.linalg.inv(scipy.linalg.sqrtm(root_y @ cov_x @ root_y).real) @ root_y
    mapped = y.mean(0) + (x - x.mean(0)) @ a
    weights = np.full(len(x), 1 / len(x))
    w2 = ot.emd2(weights, weights, ot.dist(mapped, y), numItermax=10_000_000)
    return 1 - np.sqrt(w2 / (2 * np.trace(cov_y)))


def timed_run(solver: str) -> dict:
    """Run the spec, timing the solver proper (``ot.emd2`` / ``linear_sum_assignment``; the cost
    matrix counts as outside) and the estimator's update/finalize."""
    import ot
    import scipy.optimize

    import layerscope
    import layerscope.plugins.nonlinearity_signature.estimator as module

    clock = {"solver": 0.0, "finalize": 0.0, "update": 0.0}
    module_of = {"emd": (ot, "emd2"), "assignment": (scipy.optimize, "linear_sum_assignment")}
    solver_module, solver_name = module_of[solver]
    original_solver = getattr(solver_module, solver_name)
    original_finalize = module.NonlinearitySignature.finalize
    original_update = module.NonlinearitySignature.update

    def solver_timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_solver(*args, **kwargs)
        finally:
            clock["solver"] += time.perf_counter() - start

    def wrap(name, function):
        def timed(self, *args):
            start = time.perf_counter()
            try:
                return function(self, *args)
            finally:
                clock[name] += time.perf_counter() - start

        return timed

    setattr(solver_module, solver_name, solver_timed)
    module.NonlinearitySignature.finalize = wrap("finalize", original_finalize)
    module.NonlinearitySignature.update = wrap("update", original_update)
    try:
        start = time.perf_counter()
        results = layerscope.run(spec(solver), write=False, progress=False)
        clock["run"] = time.perf_counter() - start
    finally:
        setattr(solver_module, solver_name, original_solver)
        module.NonlinearitySignature.finalize = original_finalize
        module.NonlinearitySignature.update = original_update
    clock["scores"] = {r["layer"]: r["value"] for r in results.select(metric="affinity_score")}
    return clock


def collected_samples():
    """The reduced (input, output) samples of every activation, as the estimator holds them."""
    import layerscope
    from layerscope.plugins.nonlinearity_signature.estimator import NonlinearitySignature

    captured = []
    original = NonlinearitySignature.finalize

    def capture(self):
        captured.extend(
            (pair.layer, self.kept[pair.output][1].numpy(), self.kept[pair.output][2].numpy()) for pair in self.pairs
        )
        return original(self)

    NonlinearitySignature.finalize = capture
    try:
        layerscope.run(spec("emd"), write=False, progress=False)
    finally:
        NonlinearitySignature.finalize = original
    return captured


def longer_stream() -> tuple[float, float, bool]:
    """Seconds of a run over ten times ``SAMPLES`` samples as it is and fed every batch (saturation
    switched off), and whether their records are equal."""
    import layerscope
    from layerscope.plugins.nonlinearity_signature.estimator import NonlinearitySignature

    longer = spec("emd")
    longer["data"]["samples"] = 10 * SAMPLES
    times, records = [], []
    for saturated in (NonlinearitySignature.saturated, lambda self, start: False):
        original, NonlinearitySignature.saturated = NonlinearitySignature.saturated, saturated
        try:
            start = time.perf_counter()
            records.append(layerscope.run(longer, write=False, progress=False).records)
            times.append(time.perf_counter() - start)
        finally:
            NonlinearitySignature.saturated = original
    return times[0], times[1], records[0] == records[1]


def jitter_check_cost(samples: list, rounds: int = 5) -> None:
    """Median seconds per activation of the score alone, with the other setting checked as the estimator does,
    and with the other setting's score always computed (interleaved rounds)."""
    from layerscope.plugins.nonlinearity_signature.maths import affinity

    rng = np.random.default_rng(0)
    wide = rng.standard_normal((SAMPLES, 512)) @ rng.standard_normal((512, 512)) / 20 - 0.2
    cases = [*samples, ("512-wide ReLU", wide, np.maximum(wide, 0))]
    for name, x, y in cases:
        solved = "solved" if affinity(x, y, within=1e-3).other_score is not None else "skipped"
        timings: dict[str, list[float]] = {"alone": [], "checked": [], "both": []}
        for _ in range(rounds):
            for label, within in (("alone", None), ("checked", 1e-3), ("both", -1.0)):  # < 0: always solved
                start = time.perf_counter()
                affinity(x, y, within=within)
                timings[label].append(time.perf_counter() - start)
        alone, checked, both = (float(np.median(timings[k])) for k in ("alone", "checked", "both"))
        print(
            f"jitter check, {name} (d = {x.shape[1]}): score alone {alone:.3f} s, checked {checked:.3f} s "
            f"({checked / alone:.2f}×; the other OT problem {solved}), both settings solved {both:.3f} s "
            f"({both / alone:.2f}×)"
        )


def main() -> None:
    timed_run("emd")  # warm-up: the demo model and imports
    for solver in ("emd", "assignment"):
        clock = timed_run(solver)
        signature = clock["update"] + clock["finalize"]
        outside = signature - clock["solver"]
        print(
            f"[{solver}] whole run {clock['run']:.2f} s; signature (update + finalize) {signature:.2f} s, "
            f"of which the exact OT solver {clock['solver']:.2f} s → "
            f"outside the solver {outside / signature * 100:.1f}% "
            f"(target ≤ 20%); scores {', '.join(f'{k} {v:.4f}' for k, v in clock['scores'].items())}"
        )
    samples = collected_samples()
    start = time.perf_counter()
    direct = [straightforward(x, y) for _, x, y in samples]
    direct_time = time.perf_counter() - start
    from layerscope.plugins.nonlinearity_signature.maths import affinity_score

    start = time.perf_counter()
    ours = [affinity_score(x, y)[0] for _, x, y in samples]
    ours_time = time.perf_counter() - start
    print(
        f"same samples, {len(samples)} activations (d = {', '.join(str(x.shape[1]) for _, x, _ in samples)}): "
        f"straightforward (scipy sqrtm + inv + ot.emd2) {direct_time:.2f} s vs ours {ours_time:.2f} s "
        f"({direct_time / ours_time:.2f}×); max |Δρ| = {max(abs(a - b) for a, b in zip(direct, ours)):.2e}"
    )
    saturating, every_batch, equal = longer_stream()
    print(
        f"{10 * SAMPLES} samples, the signature keeping {SAMPLES}: {saturating:.2f} s, fed every batch "
        f"{every_batch:.2f} s ({every_batch / saturating:.1f}×), records equal: {equal}"
    )
    jitter_check_cost(samples)


if __name__ == "__main__":
    main()
