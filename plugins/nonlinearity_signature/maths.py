"""The affinity score of Bouniot et al. (CVPR 2025; arXiv 2310.11439), as pure functions.

For samples X of an activation's input and Y = φ(X) of its output (n × d):

1. Gaussian fits N(m_x, Σ_x), N(m_y, Σ_y): sample means, unbiased covariances + 1e-6·I
   (or Ledoit–Wolf shrinkage);
2. the closed-form Monge map T(x) = m_y + A(x − m_x) with
   A = Σ_y^{1/2} (Σ_y^{1/2} Σ_x Σ_y^{1/2})^{−1/2} Σ_y^{1/2} (symmetric PSD; the reference
   code's form, which needs only Σ_y well conditioned); A = 0 when tr Σ_y ≤ 2e-6·d;
3. W2² between the empirical measures {T(x_i)} and {y_i}, uniform weights, exact;
4. ρ_aff = 1 − sqrt(W2² / (2 tr Σ_y)).

Scale. ρ_aff is invariant to scaling an activation's input and output together, but the
reference code's constants (the 1e-6 jitter, the 2e-6 "nearly constant" threshold, the
eigenvalue floor) are absolute, chosen for unit-scale activations, and the exact OT solver
has absolute tolerances too. So both samples are first divided by √s_x, s_x = tr Σ̂_x / d_x
the input's mean variance: the constants then act at the scale they were chosen for, and an
activation scaled by 1e-30 or 1e30 gets the score of the unscaled one. For inputs of unit
variance nothing changes. A constant input is left as it is (the map is then 0 and, the
output being constant too, ρ_aff = 1: a point mass onto a point mass is affine).

Matrix square roots come from float64 symmetric eigendecompositions; non-positive
eigenvalues are replaced by small distinct constants linspace(1e-7, 1e-6, k) as in the
reference ``torch_sqrtm``. Side metrics as logged by the reference: linear CKA, R² of a
least-squares fit, sparsity.

Fewer samples than features (:func:`sample_subspace`). With n samples of d features, every centred
sample of X and Y lies in a subspace S of dimension k ≤ 2(n − 1), and both covariances have the form
a·CᵀC + c·I (c: the jitter, plus Ledoit–Wolf's shrinkage target). On S's complement both are multiples
of the identity, so A is block diagonal, and the mapped samples, the OT cost between them and the
outputs, and tr Σ_Y are computed exactly from the k × k blocks in S: O(d·n² + n³) instead of the d × d
eigendecompositions' O(d³) (one 3072-wide GELU of GPT-2 at 64 samples: 46–70 CPU-s before). The
result equals the dense computation up to round-off.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use: listing plugins does not load it

JITTER = 1e-6
DEGENERATE_TRACE = 2e-6  # per dimension


def _eigen_power(matrix: np.ndarray, power: float) -> np.ndarray:
    """matrix^power for a symmetric PSD matrix (float64 eigh; non-positive eigenvalues → tiny constants)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    bad = eigenvalues <= 0
    if bad.any():
        eigenvalues = eigenvalues.copy()
        eigenvalues[bad] = np.linspace(1e-7, 1e-6, int(bad.sum()))
    return (vectors * eigenvalues**power) @ vectors.T


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Σ^{1/2} of a symmetric PSD matrix."""
    return _eigen_power(matrix, 0.5)


def inv_sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Σ^{−1/2} of a symmetric PSD matrix."""
    return _eigen_power(matrix, -0.5)


def unit_scale(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) / √s_x, s_x = tr Σ̂_x / d_x the input's mean unbiased variance (unchanged when s_x = 0)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = float(np.var(x, axis=0, ddof=1).mean()) if len(x) > 1 else 0.0
    return (x / np.sqrt(scale), y / np.sqrt(scale)) if scale > 0 else (x, y)


def ledoit_wolf_shrinkage(samples: np.ndarray) -> float:
    """Ledoit–Wolf's shrinkage intensity of *samples* (n × d), sklearn's ``ledoit_wolf_shrinkage`` step by
    step, but from the n × n Gram matrix G of the centred samples instead of d × d blocks: with
    μ = tr G/(n·d), δ = ‖G‖_F²/n², β = (Σ_k G_kk²/n − δ)/(d·n) and δ' = (δ − 2μ·tr G/n + d·μ²)/d, the
    intensity is min(β, δ')/δ' (0 when that is 0)."""
    centred = samples - samples.mean(axis=0)
    n, d = centred.shape
    gram = centred @ centred.T
    squared_norms = np.diag(gram)
    trace = float(squared_norms.sum()) / n  # tr E
    mu = trace / d
    beta_ = float((squared_norms**2).sum())  # Σ_k ‖x_k‖⁴ = Σ_ij (X²ᵀX²)_ij
    delta_ = float((gram**2).sum()) / n**2  # ‖XᵀX‖_F² / n²
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else beta / delta


def covariance(samples: np.ndarray, method: str = "empirical") -> np.ndarray:
    """Unbiased sample covariance + 1e-6·I, or sklearn's Ledoit–Wolf shrinkage estimate + 1e-6·I."""
    if method == "ledoit_wolf":
        from sklearn.covariance import LedoitWolf

        cov = LedoitWolf().fit(samples).covariance_
    else:
        cov = np.atleast_2d(np.cov(samples, rowvar=False, ddof=1))
    return cov + JITTER * np.eye(cov.shape[0])


def degenerate_output(cov_y: np.ndarray) -> bool:
    """True when the output is (nearly) constant: tr Σ_y ≤ 2e-6·d (the reference code's test)."""
    return bool(np.trace(cov_y) <= DEGENERATE_TRACE * cov_y.shape[0])


def is_nearly_constant(x: np.ndarray, y: np.ndarray, covariance_method: str = "empirical") -> bool:
    """True when the output of this pair is (nearly) constant at unit input scale, so the map is set to 0."""
    return degenerate_output(covariance(unit_scale(x, y)[1], covariance_method))


def monge_map(cov_x: np.ndarray, cov_y: np.ndarray) -> np.ndarray:
    """A = Σ_y^{1/2} (Σ_y^{1/2} Σ_x Σ_y^{1/2})^{−1/2} Σ_y^{1/2}; zero for a (near-)constant output."""
    if degenerate_output(cov_y):
        return np.zeros_like(cov_y)
    root_y = sqrtm_psd(cov_y)
    return root_y @ inv_sqrtm_psd(root_y @ cov_x @ root_y) @ root_y


def import_pot():
    """POT, without the TensorFlow, JAX and CuPy backends it would otherwise import when installed
    (TensorFlow alone costs seconds and prints its start-up log): these samples are numpy arrays."""
    for framework in ("TENSORFLOW", "JAX", "CUPY"):
        os.environ.setdefault(f"POT_BACKEND_DISABLE_{framework}", "1")
    import ot

    return ot


def exact_w2_squared(source: np.ndarray, target: np.ndarray, solver: str = "emd") -> float:
    """Exact W2² between two equal-size empirical measures with uniform weights.

    ``emd``: POT's network simplex (``ot.emd2``); ``assignment``: scipy's linear sum
    assignment, exact here because the optimal plan between equal uniform measures is a
    permutation.

    Both point sets are first moved by minus the target's mean (W2 is unchanged by a common
    translation): the squared distances are computed as ‖a‖² + ‖b‖² − 2a·b, which cancels
    catastrophically when the points lie far from the origin compared with their spread. The
    squeeze-excite Hardsigmoid outputs of MobileNetV3-small, at unit input scale, have means of
    7.5e7 and a spread of 0.62: uncentred, the costs were off by up to 1.9e3 (mean cost 1.1e2) and the
    score was −0.296 instead of 0.473.
    """
    ot = import_pot()
    centre = target.mean(axis=0)
    cost = ot.dist(source - centre, target - centre)  # squared Euclidean
    if solver == "assignment":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(cost)
        return float(cost[rows, cols].mean())
    weights = np.full(len(source), 1.0 / len(source))
    return float(ot.emd2(weights, weights, cost, numItermax=10_000_000))


def affinity_score(
    x: np.ndarray, y: np.ndarray, covariance_method: str = "empirical", solver: str = "emd"
) -> tuple[float, bool]:
    """(ρ_aff, degenerate) for input samples *x* and output samples *y* (n × d each), computed at unit
    input scale (see the module docstring), in the samples' subspace when they are fewer than the features."""
    x, y = unit_scale(x, y)
    if 2 * len(x) < x.shape[1]:
        return _affinity_in_subspace(x, y, covariance_method, solver)
    cov_x, cov_y = covariance(x, covariance_method), covariance(y, covariance_method)
    a = monge_map(cov_x, cov_y)
    mapped = y.mean(axis=0) + (x - x.mean(axis=0)) @ a  # A is symmetric
    w2 = exact_w2_squared(mapped, y, solver)
    return 1.0 - float(np.sqrt(w2 / (2.0 * np.trace(cov_y)))), not a.any()


def sample_subspace(xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
    """An orthonormal basis (d × k) of the span of the rows of the centred samples *xc* and *yc*."""
    stacked = np.concatenate([xc, yc]).T  # d × 2n
    basis, singular, _ = np.linalg.svd(stacked, full_matrices=False)
    rank = int((singular > singular[0] * max(stacked.shape) * np.finfo(float).eps).sum()) if singular.size else 0
    return basis[:, :rank]


def _scaled_gram_form(centred: np.ndarray, samples: np.ndarray, method: str) -> tuple[float, float]:
    """(a, c) with the covariance of *samples* = a·XᶜᵀXᶜ + c·I: unbiased + jitter, or Ledoit–Wolf (from the
    biased covariance) + jitter."""
    n, d = centred.shape
    if method == "ledoit_wolf":
        shrinkage = ledoit_wolf_shrinkage(samples)
        mu = float((centred**2).sum()) / n / d
        return (1.0 - shrinkage) / n, shrinkage * mu + JITTER
    return 1.0 / (n - 1), JITTER


def _affinity_in_subspace(x: np.ndarray, y: np.ndarray, method: str, solver: str) -> tuple[float, bool]:
    """:func:`affinity_score` from the k × k blocks of the covariances in the samples' subspace (module
    docstring): the same number as the d × d computation, up to round-off."""
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    basis = sample_subspace(xc, yc)
    xs, ys = xc @ basis, yc @ basis  # the samples' coordinates in S (nothing of them lies outside)
    (ax, cx), (ay, cy) = _scaled_gram_form(xc, x, method), _scaled_gram_form(yc, y, method)
    eye = np.eye(basis.shape[1])
    cov_x, cov_y = ax * (xs.T @ xs) + cx * eye, ay * (ys.T @ ys) + cy * eye
    trace_y = ay * float((yc**2).sum()) + cy * y.shape[1]
    if trace_y <= DEGENERATE_TRACE * y.shape[1]:
        a = np.zeros_like(cov_y)
    else:
        root_y = sqrtm_psd(cov_y)
        a = root_y @ inv_sqrtm_psd(root_y @ cov_x @ root_y) @ root_y
    w2 = exact_w2_squared(xs @ a, ys, solver)  # T(x_i) − y_j = (x_i − m_x)A − (y_j − m_y), inside S
    return 1.0 - float(np.sqrt(w2 / (2.0 * trace_y))), not a.any()


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA: ‖Yᶜᵀ Xᶜ‖_F² / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F) on column-centred samples; with fewer samples than
    features from the n × n Gram matrices, ⟨XᶜXᶜᵀ, YᶜYᶜᵀ⟩_F / (‖XᶜXᶜᵀ‖_F ‖YᶜYᶜᵀ‖_F), the same number."""
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    if len(xc) < xc.shape[1]:
        gram_x, gram_y = xc @ xc.T, yc @ yc.T
        denominator = np.linalg.norm(gram_x) * np.linalg.norm(gram_y)
        return float((gram_x * gram_y).sum() / denominator) if denominator > 0 else 0.0
    denominator = np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    return float(np.linalg.norm(yc.T @ xc) ** 2 / denominator) if denominator > 0 else 0.0


def linear_r2(x: np.ndarray, y: np.ndarray) -> float:
    """R² of the least-squares affine fit from *x* to *y*, averaged uniformly over the outputs: per
    output 1 − SS_res/SS_tot, and for a constant output 1 if it is fitted exactly, else 0 — the
    number sklearn's ``LinearRegression().fit(x, y).score(x, y)`` gives (the reference's side
    metric), from one SVD-based ``lstsq`` (4× faster at n = 2048, d = 512)."""
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    coefficients, *_ = np.linalg.lstsq(xc, yc, rcond=None)
    residual = ((yc - xc @ coefficients) ** 2).sum(axis=0)
    total = (yc**2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(total > 0, 1.0 - residual / total, np.where(residual > 0, 0.0, 1.0))
    return float(scores.mean())


def sparsity_per_sample(values, tolerance: float = 1e-3):
    """Per sample (axis 0), the fraction of its values with |y| ≤ 1e-3 (a torch tensor, float64): the
    sparsity of a set of samples of one tensor is the mean of these fractions."""
    near_zero = (values.abs() <= tolerance).flatten(1)
    return torch.count_nonzero(near_zero, dim=1).to(torch.float64) / max(near_zero.shape[1], 1)
