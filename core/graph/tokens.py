"""Token axes: where a tensor runs over the tokens of the token mask, and masked reductions.

A model with a token mask (:mod:`layerscope.engine.feeds`) marks each sample's real tokens (True)
against padding. A tensor's **token axes** are its axes after the batch axis whose length is
the sequence length of the mask or of another integer (token id) input — the same symbolic
dimension in the exported graph: axis 1 of hidden states (sample × token × feature), axes 2
and 3 (query, key) of attention probabilities (sample × head × token × token). A sequence
of fixed length matches every axis of that length. Estimators use these reductions so that
padding never counts as data:

- :func:`mean_over_tokens`: each sample's mean over its real tokens along the first token
  axis, positions of padded tokens along the other token axes (the keys of an attention
  map) set to 0, so extra padding adds only constant features;
- :func:`tokens_as_samples`: every combination of real tokens along the token axes (a token;
  a query-key pair of an attention map) is a sample of the remaining features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from layerscope.util.lazy import lazy_module

from .tensors import TensorInfo

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")


def sequence_dims(inputs: Sequence[TensorInfo], mask: str | None) -> set:
    """The sequence lengths (symbolic or fixed) of the token mask *mask* and of the 2-D integer inputs
    beside it (token ids); empty without a mask."""
    if mask is None:
        return set()
    token_inputs = [t for t in inputs if t.name == mask or t.dtype is not None and t.dtype.startswith(("int", "uint"))]
    return {t.shape[1] for t in token_inputs if t.shape is not None and len(t.shape) == 2 and t.shape[1] is not None}


def token_axes(info: TensorInfo, sequences: set) -> tuple[int, ...]:
    """The axes of tensor *info* after the batch axis whose length is one of *sequences*."""
    if info.shape is None:
        return ()
    return tuple(axis for axis, dim in enumerate(info.shape) if axis > 0 and dim in sequences)


def token_axes_by_tensor(tensors: Sequence[TensorInfo], token_mask: str | None) -> dict[str, tuple[int, ...]]:
    """Every tensor of a model that has token axes, with those axes, given the name of its token-mask input
    (None: the model has none, and no tensor has token axes)."""
    sequences = sequence_dims([t for t in tensors if t.role == "input"], token_mask)
    return {t.name: axes for t in tensors if sequences and (axes := token_axes(t, sequences))}


def _along(mask: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """The (sample × token) *mask* shaped to broadcast against a tensor of *ndim* axes at *axis*."""
    shape = [mask.shape[0]] + [1] * (ndim - 1)
    shape[axis] = mask.shape[1]
    return mask.reshape(shape)


def zero_padding(values: torch.Tensor, mask: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """*values* with the positions of padded tokens along *axes* set to 0."""
    for axis in axes:
        values = values.masked_fill(~_along(mask, values.ndim, axis), 0)
    return values


def mean_over_tokens(values: torch.Tensor, mask: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """(sample, features): each sample's mean over its real tokens along ``axes[0]``, padded positions along
    the other token axes zeroed; a sample without real tokens gives zeros."""
    first, *others = axes
    values = zero_padding(values, mask, others)
    weights = _along(mask, values.ndim, first).to(values.dtype)
    total = (values.masked_fill(weights == 0, 0)).sum(dim=first)
    count = weights.sum(dim=first).clamp(min=1)
    return (total / count).reshape(values.shape[0], -1)


def tokens_as_samples(
    values: torch.Tensor, mask: torch.Tensor, axes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, sample of each row): every combination of real tokens along *axes* as a row of the
    remaining features, in sample then token order."""
    moved = values.movedim(tuple(axes), tuple(range(1, 1 + len(axes))))
    real = mask
    for _ in axes[1:]:  # real (query, key, …) combinations
        real = real.unsqueeze(-1) & mask.reshape(mask.shape[0], *[1] * (real.ndim - 1), mask.shape[1])
    rows = moved[real]
    return rows.reshape(len(rows), -1), torch.nonzero(real)[:, 0]
