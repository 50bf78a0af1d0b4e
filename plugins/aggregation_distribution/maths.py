"""Analytic distributions of global aggregation layers — a **reconstruction**.

Ong, Husain & Bober, "Understanding the Distributions of Aggregation Layers in Deep Neural
Networks" (arXiv 2107.04458; IEEE TNNLS 2024): neither the full text nor code was
available; these are the modelling choices of methods §1, kept as parameters.

- Pre-aggregation activation a = max(0, z), z ~ N(μ, s²) per channel (a rectified Gaussian):
  E[a] = μΦ(μ/s) + sφ(μ/s), E[a²] = (μ² + s²)Φ(μ/s) + μsφ(μ/s).
- Mean over M positions: E[g] = E[a], Var g = Var a / M_eff (M_eff = M for independent
  positions); a sum scales both by M (the variance by M²); a max of M_eff iid rectified
  Gaussians has CDF Φ((x − μ)/s)^M_eff on x ≥ 0, integrated numerically.
- g is moment-matched by a Gamma: shape k = E[g]²/Var g, scale θ = Var g / E[g].
- Output node y = wᵀg + b ~ N(wᵀE[g] + b, Σ_c w_c² Var g_c) (independent channels).
- KL(N1‖N2) = ln(s2/s1) + (s1² + (μ1 − μ2)²)/(2 s2²) − ½, and between Gammas
  KL = (k1 − k2)ψ(k1) − lnΓ(k1) + lnΓ(k2) + k2(ln θ2 − ln θ1) + k1(θ1 − θ2)/θ2.

scipy is imported inside the functions that use it: ``scipy.stats`` takes over a second to
import, and every run loads this plugin whether it analyses aggregations or not.
"""

from __future__ import annotations

import numpy as np


def rectified_gaussian_moments(mu, s):
    """(E[a], Var a) of a = max(0, z), z ~ N(μ, s²) (elementwise over arrays)."""
    from scipy import stats

    mu, s = np.asarray(mu, dtype=np.float64), np.asarray(s, dtype=np.float64)
    t = mu / s
    cdf, pdf = stats.norm.cdf(t), stats.norm.pdf(t)
    first = mu * cdf + s * pdf
    second = (mu**2 + s**2) * cdf + mu * s * pdf
    return first, np.maximum(second - first**2, 0.0)


def _ratio(t: float) -> float:
    """E[a²]/E[a]² of a rectified standard Gaussian shifted by t (decreasing from ∞ to 1)."""
    from scipy import stats

    first = t * stats.norm.cdf(t) + stats.norm.pdf(t)
    second = (t**2 + 1) * stats.norm.cdf(t) + t * stats.norm.pdf(t)
    return second / first**2


def invert_rectified_moments(mean: float, second: float) -> tuple[float, float]:
    """(μ, s) of the rectified Gaussian with E[a] = *mean* and E[a²] = *second* (moment inversion)."""
    from scipy import optimize, stats

    ratio = second / mean**2
    if ratio <= 1.0 + 1e-12:
        return mean, 1e-12 * mean  # (nearly) constant positive output
    with np.errstate(divide="ignore", over="ignore"):
        t = optimize.brentq(lambda u: _ratio(u) - ratio, -30.0, 1e6, xtol=1e-12)
    s = mean / (t * stats.norm.cdf(t) + stats.norm.pdf(t))
    return t * s, s


def max_moments(mu: float, s: float, positions: float) -> tuple[float, float]:
    """(E, Var) of the max of *positions* iid rectified Gaussians: CDF Φ((x−μ)/s)^M on x ≥ 0."""
    from scipy import stats

    upper = max(mu, 0.0) + 12.0 * s
    x = np.linspace(0.0, upper, 4001)
    survival = 1.0 - stats.norm.cdf((x - mu) / s) ** positions
    first = np.trapezoid(survival, x)
    second = np.trapezoid(2.0 * x * survival, x)
    return first, max(second - first**2, 0.0)


def aggregated_moments(mean_a, var_a, positions: int, effective_m, kind: str, mu=None, s=None):
    """(E[g], Var g) of the aggregation of M positions (see module docstring)."""
    if kind == "max":
        pairs = [max_moments(m, sd, effective_m) for m, sd in zip(np.atleast_1d(mu), np.atleast_1d(s))]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    mean_a, var_a = np.asarray(mean_a), np.asarray(var_a)
    if kind == "sum":
        return positions * mean_a, positions**2 * var_a / effective_m
    return mean_a, var_a / effective_m


def gamma_parameters(mean, var):
    """Moment-matched Gamma: (shape k = E²/Var, scale θ = Var/E)."""
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    return mean**2 / var, var / mean


def linear_output_moments(weight: np.ndarray, bias: np.ndarray, mean_g, var_g):
    """(E[y], Var y) of y = W g + b for independent channels."""
    return weight @ mean_g + bias, (weight**2) @ var_g


def gaussian_kl(mean1, var1, mean2, var2):
    """KL(N(μ1, s1²) ‖ N(μ2, s2²)) in nats."""
    return 0.5 * np.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / (2.0 * var2) - 0.5


def histogram_kl(p_counts, q_counts, smoothing: float = 0.5) -> float:
    """KL(p ‖ q) in nats between two histograms on one binning (scipy.stats.entropy), with
    *smoothing* added to every bin of both (Jeffreys' ½ for counts), so empty bins stay finite."""
    from scipy import stats

    p = np.asarray(p_counts, dtype=np.float64) + smoothing
    q = np.asarray(q_counts, dtype=np.float64) + smoothing
    return float(stats.entropy(p / p.sum(), q / q.sum()))
