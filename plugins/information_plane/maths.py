"""Matrix-based Rényi α-entropy (Sánchez Giraldo, Rao & Príncipe) with Gaussian tensor kernels.

Pure functions of torch tensors, float64 throughout (on the CPU the inner products go through
numpy's BLAS, see :func:`inner_products`):

- Gram matrix of the Gaussian kernel on flattened tensors, K_ij = exp(−‖x_i − x_j‖² / σ²)
  (the reference code's σ², no factor 2), from pairwise squared distances computed as
  ‖x‖² + ‖y‖² − 2xyᵀ (never an N×N×D broadcast, and never the whole tensor in float64);
- A = K / tr K (equal to K_ij / (N √(K_ii K_jj)) for a Gaussian kernel);
- S_α(A) = log2(Σ λ_i^α) / (1 − α), and at α = 1 the von Neumann limit −Σ λ_i log2 λ_i;
- S_α(A, B) = S_α(A∘B / tr(A∘B)) and I_α(A; B) = S_α(A) + S_α(B) − S_α(A, B);
- kernel alignment ⟨K, L⟩_F / (‖K‖_F ‖L‖_F), the criterion for choosing σ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from layerscope.engine.threads import one_blas_thread
from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use: listing plugins does not load it


#: Float64 entries converted at once by :func:`pairwise_sq_distances` (8 MiB): a layer's samples are
#: widened to float64 a block of features at a time, never the whole (float32) tensor at once.
DISTANCE_BLOCK = 2**20


def inner_products(flat: torch.Tensor) -> torch.Tensor:
    """X Xᵀ in float64 for (N, features) rows X, summed over blocks of features (at most
    ``DISTANCE_BLOCK`` float64 entries widened at once). On the CPU each block's product goes through
    numpy, whose ``dot`` of a matrix with its own transpose calls BLAS ``syrk``: half the
    multiplications of a general product (measured 2.4x faster than torch's ``addmm_`` on one thread
    for 32 rows of 200,704 features), and an exactly symmetric result; on one BLAS thread, as torch's
    maths runs during a run (:func:`layerscope.engine.threads.one_blas_thread`)."""
    n, features = flat.shape
    width = max(1, DISTANCE_BLOCK // max(n, 1))
    blocks = (flat[:, start : start + width].to(torch.float64) for start in range(0, features, width))
    if flat.device.type != "cpu":
        inner = torch.zeros(n, n, dtype=torch.float64, device=flat.device)
        for block in blocks:
            inner.addmm_(block, block.T)
        return inner
    total = np.zeros((n, n))
    with one_blas_thread():
        for block in blocks:
            rows = block.numpy()
            total += np.dot(rows, rows.T)
    return torch.from_numpy(total)


def pairwise_sq_distances(x: torch.Tensor) -> torch.Tensor:
    """(N, N) squared Euclidean distances between flattened samples, float64, clamped at 0:
    ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j from the :func:`inner_products` of the samples."""
    inner = inner_products(x.reshape(x.shape[0], -1))
    norms = inner.diagonal().clone()
    d2 = norms[:, None] + norms[None, :] - 2.0 * inner
    d2.clamp_(min=0.0)
    d2.fill_diagonal_(0.0)
    return d2


def mean_pairwise_distance(d2: torch.Tensor) -> float:
    """Mean of ‖x_i − x_j‖ over pairs i ≠ j."""
    n = d2.shape[0]
    return float(d2.sqrt().sum() / (n * (n - 1))) if n > 1 else 0.0


def gaussian_gram(d2: torch.Tensor, sigma: float) -> torch.Tensor:
    """K = exp(−d² / σ²)."""
    return torch.exp(-d2 / (sigma * sigma))


def label_gram(labels: torch.Tensor, sigma_y: float) -> torch.Tensor:
    """Gaussian Gram matrix of one-hot labels: 1 within a class, exp(−2/σ_y²) across classes."""
    same = labels.reshape(-1, 1) == labels.reshape(1, -1)
    across = torch.exp(torch.tensor(-2.0 / (sigma_y * sigma_y), dtype=torch.float64))
    return torch.where(same, torch.ones((), dtype=torch.float64, device=labels.device), across.to(labels.device))


def normalise(gram: torch.Tensor) -> torch.Tensor:
    """A = K / tr K (unit trace)."""
    return gram / torch.trace(gram)


def renyi_entropy(a: torch.Tensor, alpha: float) -> float:
    """S_α(A) in bits from the eigenvalues of A (negative round-off clipped, 0·log 0 = 0)."""
    eigenvalues = torch.linalg.eigvalsh(a.to(torch.float64)).clamp(min=0.0)
    eigenvalues = eigenvalues / eigenvalues.sum()
    if alpha == 1.0:
        positive = eigenvalues[eigenvalues > 0]
        return float(-(positive * torch.log2(positive)).sum())
    return float(torch.log2((eigenvalues**alpha).sum()) / (1.0 - alpha))


def joint_entropy(a: torch.Tensor, b: torch.Tensor, alpha: float) -> float:
    """S_α(A, B) = S_α(A∘B / tr(A∘B))."""
    return renyi_entropy(normalise(a * b), alpha)


def mutual_information(a: torch.Tensor, b: torch.Tensor, alpha: float) -> float:
    """I_α(A; B) = S_α(A) + S_α(B) − S_α(A, B)."""
    return renyi_entropy(a, alpha) + renyi_entropy(b, alpha) - joint_entropy(a, b, alpha)


def kernel_alignment(k: torch.Tensor, k_labels: torch.Tensor) -> float:
    """⟨K, L⟩_F / (‖K‖_F ‖L‖_F), L the label kernel *k_labels*."""
    return float((k * k_labels).sum() / (torch.linalg.norm(k) * torch.linalg.norm(k_labels)))


#: The authors' width grid, linspace(0.3, 10·d̄): its floor is an absolute width, its top a factor of d̄.
AUTHORS_GRID = (0.3, 10.0)


@dataclass(frozen=True)
class WidthGrid:
    """Kernel widths searched by alignment, σ_i = offset_i + factor_i·d̄ for a batch's mean pairwise distance d̄.

    ``relative``: σ_i = f_i·d̄, f on linspace(low, high, count); ``absolute`` (the authors' code):
    σ = linspace(0.3, 10·d̄, count), i.e. σ_i = 0.3·(1 − t_i) + 10·t_i·d̄ with t on linspace(0, 1, count).
    Linear in d̄, so summing alignment curves over batches index by index and taking the widths at the mean
    d̄ is the same in both."""

    offsets: torch.Tensor
    factors: torch.Tensor

    def widths(self, mean_distance: float) -> torch.Tensor:
        """The grid's widths for a mean pairwise distance d̄."""
        return self.offsets + self.factors * mean_distance


def width_grid(kind: str, grid_range: tuple[float, float], count: int) -> WidthGrid:
    """The ``relative`` grid f·d̄ (f on linspace(*grid_range, count)) or the authors' ``absolute`` one."""
    if kind == "absolute":
        t = torch.linspace(0.0, 1.0, count, dtype=torch.float64)
        return WidthGrid(AUTHORS_GRID[0] * (1.0 - t), AUTHORS_GRID[1] * t)
    factors = torch.linspace(grid_range[0], grid_range[1], count, dtype=torch.float64)
    return WidthGrid(torch.zeros_like(factors), factors)


ALIGNMENT_BLOCK = 2**22  # Gram entries evaluated at once (32 MiB of float64) by alignment_curve


def alignment_curve(d2: torch.Tensor, label_kernel: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Kernel alignment of K_σ = exp(−d²/σ²) with *label_kernel* L for every σ in *sigmas*, vectorised.

    Both kernels are symmetric with a unit diagonal, so with k, l the entries above the diagonal
    (the N(N−1)/2 distinct pairs): ⟨K_σ, L⟩_F = N + 2 Σ k·l and ‖K_σ‖_F² = N + 2 Σ k²; the grid
    is evaluated in blocks of widths whose entries fit ``ALIGNMENT_BLOCK``.
    """
    n = d2.shape[0]
    upper = torch.triu_indices(n, n, offset=1, device=d2.device)
    pairs = d2[upper[0], upper[1]].to(torch.float64)
    labels = label_kernel[upper[0], upper[1]].to(torch.float64)
    label_norm = torch.sqrt(n + 2.0 * (labels * labels).sum())
    negative_scales = -1.0 / sigmas.to(torch.float64, copy=True).to(d2.device) ** 2
    curve = torch.empty(len(negative_scales), dtype=torch.float64, device=d2.device)
    step = max(1, ALIGNMENT_BLOCK // max(len(pairs), 1))
    grams = torch.empty(min(step, len(negative_scales)), len(pairs), dtype=torch.float64, device=d2.device)
    for start in range(0, len(negative_scales), step):
        block = grams[: len(negative_scales[start : start + step])]  # (widths, pairs), written in place
        torch.mul(negative_scales[start : start + step, None], pairs[None, :], out=block).exp_()
        inner = n + 2.0 * (block @ labels)
        norms = torch.sqrt(n + 2.0 * torch.linalg.vector_norm(block, dim=1) ** 2)
        curve[start : start + step] = inner / (norms * label_norm)
    return curve
