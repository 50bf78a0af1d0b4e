"""Estimator ``activation_entropy``: entropy of neuron activation patterns per layer and class.

Method: Wang, Chen, Wang & Wang, "Layer-Wise Entropy Analysis and Visualization of
Neurons Activation" (ChinaCom 2019; arXiv 1905.08618, withdrawn). **Reconstructed**
from the paper's abstract; neither full text nor code was available.

For class c and layer l with n neurons, neuron j is *on* for a sample when its value
exceeds ``threshold`` (0 for ReLU), and p_j is the fraction of class-c samples for
which it is on. Variants:

- ``binary`` (default): H = (1/n) Σ_j H_b(p_j) bits, H_b(p) = −p log2 p − (1−p) log2(1−p);
  ``entropy_sum`` = Σ_j H_b(p_j) is recorded too.
- ``histogram``: Shannon entropy (bits) of the histogram of all activation values of the
  layer for class c, ``bins`` equal bins over ``range`` (default: the layer's [min, max]
  over all samples, found in a first pass; values outside a given range are clamped; NaN
  and Inf values are left out, and the engine warns about such tensors).
- ``pattern``: Shannon entropy (bits) of the empirical distribution of whole binary
  on/off vectors; it saturates at log2 N_c.

Records carry ``class`` (the label, or ``"all"`` for every sample pooled).

Attention maps (the probabilities of an attention softmax, :func:`layerscope.graph.activations.find_attention`;
our addition, the method predates them). On/off patterns of attention probabilities say nothing about a model:
every softmax probability is above 0, so the binary entropy is a constant of the mask (0 bits in every BERT
layer; in GPT-2 the causal mask alone decides which are 0: 0.998 bits in every layer). So by default
(``attention: distribution``) an attention map's record is the Shannon entropy of each real query's attention
distribution over the real keys, H_q = −Σ_k p_qk log2 p_qk (p renormalised over the real keys, 0·log 0 = 0),
in bits, per head (``head_entropy``, with ``head``) and averaged over heads (``entropy``), each the mean over the
real queries of the class's sequences; ``samples`` counts those queries and ``keys`` is the most real keys a
query had (H ≤ log2 keys). Uniform attention over k real keys gives log2 k; attention on one key, 0.
``attention: as_neurons`` treats attention maps as any other layer, with ``variant``.

Tokens (our choice; the method predates them): in a model with a token mask, every real
token of a tensor with token axes is a sample of the layer's neurons (of an attention map with
``attention: as_neurons``: every real query-key pair, a sample of the heads), labelled with its sequence's
label, and padded tokens are left out (:func:`layerscope.graph.tokens.tokens_as_samples`); sample counts then
count tokens.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from layerscope import Estimator, EstimatorTags, LoadedModel, TensorBatch, hookimpl
from layerscope.graph.activations import find_attention
from layerscope.graph.tokens import tokens_as_samples
from layerscope.util.lazy import lazy_module

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use: listing plugins does not load it

ALL = "all"
LN2 = math.log(2.0)


# --- the maths, as pure functions ------------------------------------------------------


def binary_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """H_b(p) = −p log2 p − (1−p) log2(1−p), elementwise, with 0·log 0 = 0."""
    p = p.to(torch.float64)
    return (torch.special.entr(p) + torch.special.entr(1.0 - p)) / LN2


def mean_binary_entropy_bits(on_counts: torch.Tensor, samples: int) -> tuple[float, float]:
    """(mean, sum) over neurons of H_b(on_count_j / samples). A count is an integer in 0..samples, so the
    sum is Σ_v m_v·H_b(v / samples) over the number m_v of neurons with count v (``torch.bincount``): the
    same values, one logarithm per possible count and no float copy of the counts."""
    if on_counts.dtype.is_floating_point or samples >= on_counts.numel():
        entropies = binary_entropy_bits(on_counts.to(torch.float64) / samples)
        return float(entropies.mean()), float(entropies.sum())
    table = binary_entropy_bits(torch.arange(samples + 1, dtype=torch.float64) / samples)
    neurons = torch.bincount(on_counts.flatten().cpu(), minlength=samples + 1).to(torch.float64)
    total = float(neurons @ table)
    return total / on_counts.numel(), total


def counts_entropy_bits(counts) -> float:
    """Shannon entropy in bits of the distribution given by non-negative *counts* (scipy.stats.entropy)."""
    import scipy.stats  # 1.3 s to import: only the histogram and pattern variants need it

    counts = np.asarray(counts, dtype=np.float64)
    return float(scipy.stats.entropy(counts, base=2)) if counts.sum() > 0 else 0.0


def neuron_matrix(values: torch.Tensor, neurons: str) -> torch.Tensor:
    """(samples, neurons): every element is a neuron, or (``channels``) axis 1 averaged over the rest."""
    if neurons == "channels" and values.ndim > 2:
        return values.flatten(2).mean(dim=2)
    return values.reshape(values.shape[0], -1)


def strictly_above(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """values > threshold, as real numbers, without a float64 copy of *values*: float32 values are
    compared with the largest float32 not above the threshold (the same test, exactly); float16
    and bfloat16 go through float32, other dtypes compare as they are."""
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.to(torch.float32)
    if values.dtype != torch.float32:
        return values > threshold
    bound = torch.tensor(threshold, dtype=torch.float32)
    if float(bound) > threshold:
        bound = torch.nextafter(bound, torch.tensor(-math.inf, dtype=torch.float32))
    return values > bound.to(values.device)


WIDE = 2**14  # neurons from which add_on_counts adds rows one by one


def add_on_counts(held: torch.Tensor, on: torch.Tensor, rows: list[int] | None = None) -> None:
    """Add the per-neuron count of *rows* (None: all) of a (samples, neurons) on/off matrix into *held*, in
    place; exact while the total fits *held*'s integer dtype. torch's reduction over the rows slows down
    sharply on wide matrices (measured on one thread: 54 ms for 32 × 802,816, against 4.5 ms adding the rows
    one by one), so from 2^14 neurons each row's booleans are added straight into *held*, with no wider
    copy (ResNet-50, 6 rows of 802,816 neurons: 1.7 ms with the comparison, against 5.5 ms through an
    int32 count per class)."""
    if on.shape[1] < WIDE:
        chosen = on if rows is None else on[rows]
        held += chosen.sum(dim=0, dtype=torch.int32).to(held.dtype)
        return
    for row in range(on.shape[0]) if rows is None else rows:
        held += on[row]


def class_rows(labels: torch.Tensor | None, size: int) -> list[tuple[object, list[int] | None]]:
    """(class, its row indices) for every label present, in the labels' order; ``[("all", None)]`` (every
    row) without labels."""
    if labels is None:
        return [(ALL, None)]
    rows: dict[object, list[int]] = {}
    for index, label in enumerate(labels.reshape(size).tolist()):
        rows.setdefault(int(label), []).append(index)
    return list(rows.items())


def class_keys(labels: torch.Tensor | None, size: int) -> list[tuple[object, torch.Tensor]]:
    """(class key, row mask) pairs for every label present, plus ``"all"``."""
    keys: list[tuple[object, torch.Tensor]] = [(ALL, torch.ones(size, dtype=torch.bool))]
    if labels is not None:
        labels = labels.reshape(size).cpu()
        keys += [(int(c), labels == c) for c in torch.unique(labels).tolist()]
    return keys


def count_dtype(most: int) -> torch.dtype:
    """The narrowest integer dtype that holds counts up to *most*: uint8, int16, int32 or int64. The binary
    variant keeps one count per neuron and class (ResNet-50 at 224 × 224: 9 million neurons), a quarter of
    int32's memory while a class has at most 255 samples."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if most <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def add_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two shards' per-neuron on-counts merged: their exact sum, in the narrowest dtype that holds it."""
    total = a.to(torch.int64) + b.to(torch.int64)
    return total.to(count_dtype(int(total.max()) if total.numel() else 0))


def pooled_counts(by_class: dict) -> torch.Tensor:
    """The per-neuron on-counts of all samples: kept as they are without labels, else the classes' total
    (added in place into one int64 tensor)."""
    if ALL in by_class:
        return by_class[ALL]
    counts = [c for key, c in by_class.items() if key != ALL]
    total = counts[0].to(torch.int64)
    for count in counts[1:]:
        total += count
    return total


def attention_entropy_bits(
    probabilities: torch.Tensor, real_queries: torch.Tensor | None = None, real_keys: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, sample of each row): for every real query of an attention map (sample × heads… × query × key; a
    3-D map has one head), the Shannon entropy in bits of its attention distribution over the real keys, per
    head: H = −Σ_k p_k log2 p_k with p renormalised over the real keys (0·log 0 = 0; a query with no mass on
    them gives 0). *real_queries*, *real_keys*: (sample × query), (sample × key) masks, all real when None.
    Rows whose entropies are not finite (NaN or Inf probabilities) are left out."""
    n, queries, keys = probabilities.shape[0], probabilities.shape[-2], probabilities.shape[-1]
    p = probabilities.to(torch.float64).reshape(n, -1, queries, keys)
    if real_keys is not None:
        p = torch.where(real_keys.to(p.device, torch.bool)[:, None, None, :], p, 0.0)
    finite = torch.isfinite(p).all(dim=-1).all(dim=1)  # (sample, query): every head's row is finite
    total = p.sum(dim=-1, keepdim=True)
    p = torch.where(total > 0, p / torch.where(total > 0, total, 1.0), 0.0)
    entropies = (torch.special.entr(p).sum(dim=-1) / LN2).transpose(1, 2)  # (sample, query, head)
    real = finite if real_queries is None else finite & real_queries.to(p.device, torch.bool)
    return entropies[real], torch.nonzero(real)[:, 0]


# --- the estimator ----------------------------------------------------------------------


class ActivationEntropyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Literal["binary", "histogram", "pattern"] = Field(
        "binary",
        description="binary: mean binary entropy of each neuron's on/off state; histogram: entropy of "
        "the layer's value histogram; pattern: entropy of whole on/off vectors",
    )
    threshold: float = Field(0.0, description="a neuron is on when its value exceeds this")
    neurons: Literal["elements", "channels"] = Field(
        "elements", description="elements: every tensor element is a neuron; channels: axis 1, averaged over the rest"
    )
    bins: StrictInt = Field(100, ge=1, le=100_000, description="histogram bins")
    range: tuple[float, float] | None = Field(None, description="histogram range; default: the layer's [min, max]")
    attention: Literal["distribution", "as_neurons"] = Field(
        "distribution",
        description="attention maps: distribution: Shannon entropy of each real query's attention over the real "
        "keys, per head and averaged; as_neurons: the variant, as for any other layer",
    )

    @model_validator(mode="after")
    def _range_ordered(self):
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError("range must be [low, high] with low < high")
        return self


class ActivationEntropy(Estimator):
    """Per layer and class: entropy of neuron on/off patterns (reconstructed; see module docstring)."""

    name = "activation_entropy"
    Params = ActivationEntropyParams
    params: ActivationEntropyParams
    # declared state (setup); class keys are "all" or a class code
    samples: dict[str, dict[object, int]]
    on_counts: dict[str, dict[object, torch.Tensor]]
    patterns: dict[str, dict[object, dict[bytes, int]]]
    low: dict[str, float]
    high: dict[str, float]
    histograms: dict[str, dict[object, torch.Tensor]]
    attention_sums: dict[str, dict[object, torch.Tensor]]
    attention_keys: dict[str, int]
    default_selector = {"activation": "output"}  # activation ops and decomposed forms (SiLU, GELU …)
    tags = EstimatorTags(
        reconstructed="Wang et al. 2019 (arXiv 1905.08618, withdrawn): reconstructed from the abstract; "
        "entropy definition, threshold and binning are our choices",
        tokens="with a token mask: every real token is a sample, labelled with its sequence's label, padding left "
        "out (attention maps: the entropy of each real query's attention over the real keys; with attention: "
        "as_neurons every real query-key pair is a sample); without one: token axes are neurons like any other",
    )

    @classmethod
    def passes_for(cls, params) -> int:
        return 2 if params.variant == "histogram" and params.range is None else 1

    def setup(self) -> None:
        self.add_state("samples", {}, "sum")  # tensor -> class -> sample count
        self.add_state("on_counts", {}, add_counts)  # tensor -> class (all: without labels) -> (neurons,) on counts
        self.add_state("patterns", {}, "sum")  # tensor -> class -> packed on/off vector -> count
        self.add_state("low", {}, "min")  # tensor -> minimum value (histogram range pass)
        self.add_state("high", {}, "max")
        self.add_state("histograms", {}, "sum")  # tensor -> class -> (bins,) counts
        self.add_state("attention_sums", {}, "sum")  # attention map -> class -> (heads,) Σ entropy over queries
        self.add_state("attention_keys", {}, "max")  # attention map -> most real keys of a query
        self.attention_maps: set[str] = set()

    def bind_graph(self, tensors, model: LoadedModel | None = None) -> None:
        if self.params.attention == "distribution":
            self.attention_maps = {a.output for a in find_attention(tensors)} & set(self.tensors)

    def _samples(self, name: str, values: torch.Tensor, batch: TensorBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(samples × neurons matrix, their labels) of tensor *name*: the batch's samples, or with a token
        mask its real tokens."""
        axes = self.token_axes.get(name, ())
        if batch.token_mask is not None and axes:
            rows, sample = tokens_as_samples(values, batch.token_mask.to(values.device), axes)
            return rows, None if batch.labels is None else batch.labels[sample.cpu()]
        info = self.tensors.get(name)
        return neuron_matrix(info.channels_first(values) if info else values, self.params.neurons), batch.labels

    def _attention(self, name: str, values: torch.Tensor, batch: TensorBatch) -> None:
        """Per class, the sums over real queries of each head's attention entropy (module docstring)."""
        masks: list[torch.Tensor | None] = [None, None]  # real queries, real keys
        if batch.token_mask is not None:
            axes = self.token_axes.get(name, ())
            masks = [batch.token_mask if values.ndim + offset in axes else None for offset in (-2, -1)]
        rows, sample = attention_entropy_bits(values, *masks)
        keys = values.shape[-1] if masks[1] is None else int(masks[1].sum(dim=1).max())
        self.accumulate("attention_keys", keys, name)
        labels = None if batch.labels is None else batch.labels.reshape(-1).cpu()[sample.cpu()]
        for key, mask in class_keys(labels, rows.shape[0]):
            chosen = rows[mask.to(rows.device)]
            if chosen.shape[0]:
                self.accumulate("samples", chosen.shape[0], name, key)
                self.accumulate("attention_sums", chosen.sum(dim=0).cpu(), name, key)

    def update(self, batch: TensorBatch) -> None:
        p = self.params
        for name, values in batch.tensors.items():
            if name in self.attention_maps:
                self._attention(name, values, batch)
                continue
            matrix, labels = self._samples(name, values, batch)
            if p.variant == "binary":
                self._count_on(name, matrix, labels)
                continue
            matrix = matrix.to(torch.float64)
            if p.variant == "histogram" and self.pass_index < self.passes - 1:
                finite = matrix[torch.isfinite(matrix)]  # NaN/Inf values are left out (the engine warns)
                if finite.numel():
                    self.accumulate("low", float(finite.min()), name)
                    self.accumulate("high", float(finite.max()), name)
                continue
            for key, mask in class_keys(labels, matrix.shape[0]):
                rows = matrix[mask.to(matrix.device)]
                if rows.shape[0] == 0:
                    continue
                self.accumulate("samples", rows.shape[0], name, key)
                self._count(name, key, rows)

    def _count_on(self, name: str, matrix: torch.Tensor, labels: torch.Tensor | None) -> None:
        """The binary variant: on-counts of every class of the batch from one thresholding pass, added on the
        host into counts kept in the narrowest dtype that holds the class's sample count (:func:`count_dtype`)."""
        counts = self.on_counts.setdefault(name, {})
        on = strictly_above(matrix, self.params.threshold).cpu()
        if labels is not None:
            self.accumulate("samples", on.shape[0], name, ALL)
        for key, rows in class_rows(labels, on.shape[0]):
            self.accumulate("samples", on.shape[0] if rows is None else len(rows), name, key)
            dtype = count_dtype(self.samples[name][key])
            held = counts.get(key)
            if held is None:
                held = counts[key] = torch.zeros(on.shape[1], dtype=dtype)
            elif torch.iinfo(held.dtype).max < torch.iinfo(dtype).max:
                held = counts[key] = held.to(dtype)
            add_on_counts(held, on, rows)  # in place, into this estimator's own state

    def _count(self, name: str, key, rows: torch.Tensor) -> None:
        """The pattern and histogram variants: count the patterns or values of one class's rows."""
        p = self.params
        if p.variant == "pattern":
            packed = np.packbits((rows > p.threshold).cpu().numpy(), axis=1)
            for row in packed:
                self.accumulate("patterns", 1, name, key, row.tobytes())
        else:
            if p.range is None and name not in self.low:
                return  # no finite value anywhere in this layer
            low, high = p.range if p.range is not None else (self.low[name], self.high[name])
            if high <= low:
                high = low + 1.0  # a constant layer: every value falls in one bin
            finite = rows[torch.isfinite(rows)]
            hist = torch.histc(finite.clamp(low, high), bins=p.bins, min=low, max=high).to(torch.float64).cpu()
            self.accumulate("histograms", hist, name, key)

    def value_range(self, record: dict) -> tuple[float, float]:
        """Binary entropy per neuron: [0, 1] bit; a histogram's: [0, log2 bins]; a pattern distribution's:
        [0, log2 samples]; an attention distribution's: [0, log2 keys]; sums and counts: non-negative."""
        if record["variant"] == "attention":
            return 0.0, math.log2(record["keys"]) if record["metric"].endswith("entropy") else math.inf
        if record["metric"] != "entropy":
            return 0.0, math.inf
        variant = record["variant"]
        return 0.0, (
            1.0
            if variant == "binary"
            else math.log2(self.params.bins)
            if variant == "histogram"
            else math.log2(record["samples"])
        )

    def finalize(self) -> list[dict]:
        p = self.params
        records = []
        for name in self.tensors:
            for key, count in sorted(self.samples.get(name, {}).items(), key=lambda kv: (kv[0] != ALL, str(kv[0]))):
                extra = {"class": key, "variant": p.variant, "samples": count}
                if name in self.attention_maps:
                    extra.update(variant="attention", keys=self.attention_keys[name])
                    heads = self.attention_sums[name][key].to(torch.float64) / count
                    records.append(self.record(name, "entropy", float(heads.mean()), "bits", **extra))
                    records += [
                        self.record(name, "head_entropy", float(h), "bits", head=i, **extra)
                        for i, h in enumerate(heads.tolist())
                    ]
                elif p.variant == "binary":
                    counts = self.on_counts[name]
                    mean, total = mean_binary_entropy_bits(pooled_counts(counts) if key == ALL else counts[key], count)
                    records.append(self.record(name, "entropy", mean, "bits", **extra))
                    records.append(self.record(name, "entropy_sum", total, "bits", **extra))
                elif p.variant == "pattern":
                    distribution = list(self.patterns[name][key].values())
                    records.append(self.record(name, "entropy", counts_entropy_bits(distribution), "bits", **extra))
                    records.append(self.record(name, "distinct_patterns", len(distribution), "", **extra))
                elif key in self.histograms.get(name, {}):
                    records.append(
                        self.record(name, "entropy", counts_entropy_bits(self.histograms[name][key]), "bits", **extra)
                    )
        return records

    @classmethod
    def plot(cls, records: list[dict]):
        from .plot import plot_activation_entropy

        return plot_activation_entropy(records)


@hookimpl
def register_estimators(register):
    register(ActivationEntropy)
