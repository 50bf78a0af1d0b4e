"""Estimator ``nonlinearity_signature``: the affinity score of every activation function.

Method: Bouniot, Redko, Mallasto, Laclau, Struckmeier, Arndt, Habrard, "From Alexnet to
Transformers: Measuring the Non-linearity of Deep Neural Networks with Affine Optimal
Transport" (CVPR 2025; arXiv 2310.11439), after the authors' code; the
maths is in :mod:`layerscope.plugins.nonlinearity_signature.maths`.

Every selected activation (default: every activation function, single op or decomposed
pattern, and every attention softmax, see :mod:`layerscope.graph.activations`) is paired with its
input. The first ``samples`` samples of the stream (2048, the reference batch; accumulated
across data batches, kept by sample index so shards merge exactly) are reduced as the
reference does — 4-D (N,C,H,W) averaged over H×W, 3-D averaged over ``reduce_axis``
(default the last axis, i.e. tokens become the features, as in the reference code), 2-D as
is — and ρ_aff is computed once per activation. The ordered scores are the network's
non-linearity signature. With ``batches: k`` (the paper reports one batch; its code scores
per batch), the first k·``samples`` samples are kept, split by sample index into k disjoint
batches of ``samples`` (a last incomplete batch is dropped, as the reference's
``drop_last=True`` does), every metric is computed per batch, and the records hold the mean
over batches with its population standard deviation as ``<metric>_std``. Side metrics:
``linear_cka`` and ``r2`` (least-squares fit) on the reduced samples, and ``sparsity``, the fraction of
the unreduced output's values with |y| ≤ 1e-3 (as the reference code computes it, before any pooling);
and what the reference's absolute constants act against: ``input_variance`` s_x and ``min_eigenvalue``, the
smallest eigenvalue of Σ_X and Σ_Y (jitter included), both in the samples' own units.

Constants (``jitter``): ``relative`` (default) applies the reference's 1e-6 jitter, 2e-6 threshold and
eigenvalue floor at unit input scale, so scores do not depend on an activation's scale; ``absolute`` applies
them in the samples' own units, as the reference code does, and reproduces its ``rho_aff``. The other
setting's score is checked too, and one warning names every activation whose score it moves by more than
1e-3 (its OT problem is solved only when :func:`~layerscope.plugins.nonlinearity_signature.maths.movement_bound`
cannot exclude such a move).

Tokens (a choice of ours; the reference hooks no attention and has no padding): the
reference's 4-D rule would average an attention map (sample × head × query × key) to a
constant (each softmax row sums to 1), so an attention softmax's scores and probabilities
are averaged over the query axis, giving head × key features; scores at masked positions
(−∞ or below −1e30, as causal and padding masks add) count as 0. In a model with a token
mask, padding cannot be a feature, so every tensor with token axes is averaged over each
sample's real tokens (the query tokens of an attention map), positions of padded keys
zeroed (:func:`layerscope.graph.tokens.mean_over_tokens`; keys that are padding in every kept sample
are left out, so extra padding changes nothing), and ``sparsity`` counts real tokens only;
``reduce_axis`` then does not apply to those tensors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from layerscope import Estimator, EstimatorTags, LoadedModel, TensorBatch, hookimpl
from layerscope.graph.activations import Activation, find_activations, find_attention
from layerscope.graph.tokens import mean_over_tokens, zero_padding
from layerscope.util.errors import UserError
from layerscope.util.lazy import lazy_module

from .maths import JITTERS, Affinity, affinity, linear_cka, linear_r2, relative_spread, sparsity_per_sample

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use: listing plugins does not load it


class NonlinearitySignatureParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: StrictInt = Field(
        2048,
        ge=3,
        le=50_000,
        description="samples per activation (the first ones of the stream; exact OT holds a samples² cost matrix)",
    )
    reduce_axis: Literal[1, 2, -1] = Field(-1, description="axis averaged away for 3-D tensors")
    covariance: Literal["empirical", "ledoit_wolf"] = Field(
        "empirical",
        description="empirical (+1e-6·I) or ledoit_wolf (sklearn's shrinkage, the reference's corrected variant)",
    )
    jitter: Literal["relative", "absolute"] = Field(
        "relative",
        description="where the reference's constants (1e-6 jitter, 2e-6 threshold, eigenvalue floor) act: "
        "relative: at unit input scale (scale-invariant); absolute: in the samples' own units, as the "
        "reference code applies them",
    )
    solver: Literal["emd", "assignment"] = Field("emd", description="exact OT: POT's ot.emd2 or scipy's assignment")
    side_metrics: StrictBool = Field(
        True,
        description="also the reference's linear_cka, r2 and sparsity, and the input_variance and "
        "min_eigenvalue the constants act against",
    )
    batches: StrictInt = Field(
        1,
        ge=1,
        le=1000,
        description="disjoint batches of `samples` scored separately; records are "
        "their mean, with the population std as <metric>_std",
    )


def reduce_features(values: torch.Tensor, reduce_axis: int) -> torch.Tensor:
    """(N, features): 4-D and higher averaged over the spatial axes, 3-D over *reduce_axis*, 2-D as is."""
    if values.ndim >= 4:
        return values.flatten(2).mean(dim=2)
    if values.ndim == 3:
        return values.mean(dim=reduce_axis)
    return values.reshape(values.shape[0], -1)


#: Inputs whose spread across samples (root mean variance) is below this fraction of their magnitude (root
#: mean square of the mean) vary at float32 round-off only (float32 keeps 6e-8 of a value): named in a warning.
#: MobileNetV3-small's deep Hardswish inputs, spatially averaged over random images, spread by 3e-7 and 7e-8 of
#: their magnitude; their scores from onnxruntime's and torch's float32 activations differed by up to 0.39.
ROUND_OFF_SPREAD = 1e-5
#: A score that the other ``jitter`` setting moves by more than this is named in a warning.
MOVE_TOLERANCE = 1e-3
JITTER_MEANING = {
    "relative": "the constants at unit input scale",
    "absolute": "the reference's constants in the samples' own units",
}

#: Attention scores at or below this are masked positions (attention masks add -inf or the dtype's lowest value).
MASKED_SCORE = -1e30


def sparsity_of_real_tokens(values: torch.Tensor, mask: torch.Tensor, axes) -> torch.Tensor:
    """Per sample, the fraction of its values at real tokens (along every token axis) with |y| ≤ 1e-3."""
    real = zero_padding(torch.ones_like(values, dtype=torch.bool), mask, axes).flatten(1)
    near = (values.abs() <= 1e-3).flatten(1) & real
    return near.sum(dim=1).to(torch.float64) / real.sum(dim=1).clamp(min=1)


class NonlinearitySignature(Estimator):
    """Affinity score ρ_aff of every activation, in forward order."""

    name = "nonlinearity_signature"
    Params = NonlinearitySignatureParams
    params: NonlinearitySignatureParams
    #: declared state (setup): output -> (sample indices, x rows, y rows, fraction of output values near 0)
    kept: dict[str, tuple[torch.Tensor, ...]]
    default_selector = [{"activation": "output"}, {"attention": "probabilities"}]
    tags = EstimatorTags(
        tokens="with a token mask: each sample's mean over its real tokens (attention maps: over real query "
        "tokens, padded keys zeroed); without one: 3-D tensors averaged over reduce_axis, attention maps "
        "over the query axis"
    )
    metric_ranges = {
        "affinity_score": (0.0, 1.0),
        "linear_cka": (0.0, 1.0),
        "r2": (-math.inf, 1.0),
        "sparsity": (0.0, 1.0),
        "affinity_score_std": (0.0, 0.5),
        "linear_cka_std": (0.0, 0.5),
        "r2_std": (0.0, math.inf),
        "sparsity_std": (0.0, 0.5),
        "input_variance": (0.0, math.inf),
        "input_variance_std": (0.0, math.inf),
        "min_eigenvalue_std": (0.0, math.inf),
    }

    def setup(self) -> None:
        self.pairs: list[Activation] = []
        self.layouts: dict = {}
        # output -> (sample indices, x rows, y rows, per-sample fraction of unreduced output values near 0)
        self.add_state("kept", {}, self._keep_first)

    @property
    def capacity(self) -> int:
        """Samples kept per activation: ``samples`` for each of the ``batches``."""
        return self.params.samples * self.params.batches

    def _keep_first(self, a: tuple, b: tuple) -> tuple:
        """Merge two sample sets keeping the ``capacity`` lowest sample indices (order-free)."""
        merged = [torch.cat([p, q]) for p, q in zip(a, b)]
        order = torch.argsort(merged[0])[: self.capacity]
        return tuple(values[order] for values in merged)

    def bind_graph(self, tensors, model: LoadedModel | None = None) -> None:
        activations = {a.output: a for a in [*find_activations(tensors), *find_attention(tensors)]}
        unknown = [name for name in self.tensors if name not in activations]
        if unknown:
            raise UserError(
                f"nonlinearity_signature needs activation outputs or attention probabilities; not one: "
                f"{', '.join(unknown)}"
            )
        self.pairs = sorted((activations[name] for name in self.tensors), key=lambda a: a.order)
        by_name = {t.name: t for t in tensors}
        self.layouts = {
            name: by_name[name] for pair in self.pairs for name in (pair.input, pair.output) if name in by_name
        }

    def fetch_groups(self) -> list[tuple[str, ...]]:
        return [(pair.input, pair.output) for pair in self.pairs]

    def _channels_first(self, name: str, values: torch.Tensor) -> torch.Tensor:
        info = self.layouts.get(name)
        return info.channels_first(values) if info is not None else values

    def _reduced(self, pair: Activation, name: str, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(samples, features) of tensor *name* of *pair* (see the module docstring)."""
        axes = self.token_axes.get(name, ())
        if pair.kind == "attention softmax" and name == pair.input:  # masked scores (-inf, finfo.min) count as 0
            values = values.masked_fill(~(values > MASKED_SCORE), 0)
        if mask is not None and axes:
            return mean_over_tokens(values, mask, axes)
        if pair.kind == "attention softmax" and values.ndim >= 3:
            return values.mean(dim=-2).reshape(len(values), -1)
        return reduce_features(self._channels_first(name, values), self.params.reduce_axis)

    def saturated(self, start: int) -> bool:
        """Only the first ``capacity`` samples of the stream are kept (by sample index, so this holds in
        every shard): batches from that position on change nothing."""
        return start >= self.capacity

    def update(self, batch: TensorBatch) -> None:
        for pair in self.pairs:
            if pair.output not in batch.tensors:
                continue
            stored = self.kept.get(pair.output)
            x, y = (
                self._reduced(pair, name, batch.tensors[name], batch.token_mask).to(torch.float64).cpu()
                for name in (pair.input, pair.output)
            )
            axes = self.token_axes.get(pair.output, ())
            output = batch.tensors[pair.output]
            if not self.params.side_metrics:  # sparsity reads every value of the output: only when recorded
                near_zero = torch.zeros(len(x), dtype=torch.float64)
            elif batch.token_mask is not None and axes:
                near_zero = sparsity_of_real_tokens(output, batch.token_mask, axes).cpu()
            else:
                near_zero = sparsity_per_sample(output).cpu()
            indices = torch.arange(batch.start, batch.start + len(x))
            if stored is None:
                stored = (indices[:0], x[:0], y[:0], near_zero[:0])
            self.kept[pair.output] = self._keep_first(stored, (indices, x, y, near_zero))

    def _batches(self, count: int) -> list[slice]:
        """The kept samples' disjoint batches of ``samples`` (by sample index; an incomplete last one dropped),
        or all of them as one batch when fewer than ``samples`` were available."""
        size = self.params.samples
        return [slice(i * size, (i + 1) * size) for i in range(count // size)] or [slice(0, count)]

    def _features(self, pair: Activation, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The reduced samples without the keys that are padding in every kept sample (no features)."""
        if self.token_axes.get(pair.output):
            used = (x != 0).any(axis=0) | (y != 0).any(axis=0)
            x, y = x[:, used], y[:, used]
        return x, y

    def _metrics(self, x, y, near_zero, result: Affinity) -> dict[str, float]:
        """ρ_aff (and the side metrics) of one batch of reduced samples."""
        metrics = {"affinity_score": result.score}
        if self.params.side_metrics:
            metrics.update(
                linear_cka=linear_cka(x, y),
                r2=linear_r2(x, y),
                sparsity=float(near_zero.mean()),
                input_variance=result.input_variance,
                min_eigenvalue=result.min_eigenvalue,
            )
        return metrics

    def finalize(self) -> list[dict]:
        records, moved, rounded = [], [], []
        p = self.params
        for position, pair in enumerate(self.pairs):
            if pair.output not in self.kept:
                continue
            _, x, y, near_zero = (t.numpy() for t in self.kept[pair.output])
            batches = self._batches(len(x))
            samples = [self._features(pair, x[b], y[b]) for b in batches]
            results = [affinity(bx, by, p.covariance, p.solver, p.jitter, MOVE_TOLERANCE) for bx, by in samples]
            scored = [self._metrics(*xy, near_zero[b], r) for xy, b, r in zip(samples, batches, results)]
            keys = {
                "op_type": pair.kind,
                "position": position,
                "samples": len(x[batches[0]]),
                "batches": len(batches),
                "input_tensor": pair.input,
            }
            for metric in scored[0]:
                values = np.array([s[metric] for s in scored])
                records.append(self.record(pair.output, metric, float(values.mean()), "", **keys))
                if p.batches > 1:
                    records.append(self.record(pair.output, f"{metric}_std", float(values.std()), "", **keys))
            if any(r.degenerate for r in results):
                where = "at unit input scale" if p.jitter == "relative" else "in the samples' own units"
                self.warn(
                    f"{pair.layer}: the output is nearly constant (tr Σ_Y ≤ 2e-6·d {where}); as in the reference "
                    "code the map is set to 0, so the score reflects only the output's spread"
                )
            spread = relative_spread(x[batches[0]])
            if 0 < spread < ROUND_OFF_SPREAD:
                rounded.append(f"{pair.layer} ({spread:.1g})")
            score, other = float(np.mean([r.score for r in results])), self._other_score(samples, results)
            if other is not None and abs(other - score) > MOVE_TOLERANCE:
                moved.append(f"{pair.layer} {score:.4f} → {other:.4f}")
        if rounded:
            self.warn(
                f"inputs that vary across samples at float32 round-off only (spread below {ROUND_OFF_SPREAD:g} of "
                "their magnitude): " + ", ".join(rounded) + "; their scores measure round-off, not the activation"
            )
        if moved:
            self.warn(
                f"affinity scores that move by more than {MOVE_TOLERANCE:g} with jitter: {self._other_jitter} "
                f"instead of {p.jitter} ({JITTER_MEANING[self._other_jitter]}): " + ", ".join(moved)
            )
        return records

    @property
    def _other_jitter(self) -> str:
        return JITTERS[1 - JITTERS.index(self.params.jitter)]

    def _other_score(self, samples: list, results: list[Affinity]) -> float | None:
        """The mean score over batches with the other jitter setting, or None when every batch's score provably
        moves by at most ``MOVE_TOLERANCE`` (:func:`~.maths.movement_bound`); batches whose check skipped the
        other OT problem have it solved here when another batch's did not."""
        if all(r.other_score is None for r in results):
            return None
        p = self.params
        return float(
            np.mean(
                [
                    affinity(x, y, p.covariance, p.solver, self._other_jitter).score
                    if r.other_score is None
                    else r.other_score
                    for (x, y), r in zip(samples, results)
                ]
            )
        )

    def collect_warnings(self) -> list[str]:
        warnings = super().collect_warnings()
        counts = {len(self.kept[pair.output][0]) for pair in self.pairs if pair.output in self.kept}
        if counts and min(counts) < self.params.samples:
            warnings.append(f"only {min(counts)} of the {self.params.samples} requested samples were available")
        elif counts and min(counts) < self.capacity:
            warnings.append(
                f"only {min(counts) // self.params.samples} of the {self.params.batches} requested batches "
                f"of {self.params.samples} samples were available"
            )
        return warnings

    @classmethod
    def plot(cls, records: list[dict]):
        """ρ_aff against the activations in forward order, a line per model, with ± one standard deviation over
        batches as error bars when ``batches`` > 1. Models of networks whose activations are the same share the
        axis, its labels the activations' layers (shortened from the left) and op types. Networks whose
        activations differ (a multi-model spec, ``layerscope compare``) share a normalised depth axis (0: first
        activation, 1: last), with each network's layer names in a band of its own under the plot
        (:func:`~layerscope.plugins.reporters.labels.layer_bands`)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from layerscope.plugins.reporters.labels import label_layers, layer_bands

        scores = [r for r in records if r["metric"] == "affinity_score"]
        models = list(dict.fromkeys(r["model"] for r in scores))
        network_of = {r["model"]: r.get("network") for r in scores}
        names: dict[object, dict[int, dict]] = {}  # network -> position -> a record there
        for record in scores:
            names.setdefault(record.get("network"), {})[record["position"]] = record
        activations = {
            network: [(p, at[p]) for p in sorted(at)] for network, at in names.items()
        }  # each network's activations in forward order
        compared = len({tuple(r["layer"] for _, r in acts) for acts in activations.values()}) > 1
        depth = {  # x of each activation: its rank, or with different networks its rank / (count - 1)
            network: {p: (rank / max(1, len(acts) - 1) if compared else rank) for rank, (p, _) in enumerate(acts)}
            for network, acts in activations.items()
        }
        figure, axes = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
        spread = {(r["model"], r["position"]): r["value"] for r in records if r["metric"] == "affinity_score_std"}
        for model in models:
            mine = sorted((r for r in scores if r["model"] == model), key=lambda r: r["position"])
            where = depth[network_of[model]]
            errors = [spread.get((model, r["position"]), 0.0) for r in mine] if spread else None
            axes.errorbar(
                [where[r["position"]] for r in mine],
                [r["value"] for r in mine],
                yerr=errors,
                marker="o",
                capsize=3 if errors else 0,
                label=str(model),
            )
        if compared:
            axes.set_xlim(-0.03, 1.03)
            layer_bands(
                axes,
                {network: [(depth[network][p], r["layer"]) for p, r in acts] for network, acts in activations.items()},
            )
            axes.set_xlabel("relative depth (0: first activation, 1: last)")
        else:
            acts = next(iter(activations.values()))
            label_layers(axes, range(len(acts)), [f"{r['layer']} ({r['op_type']})" for _, r in acts])
            axes.set_xlabel("activation (forward order)")
        axes.set_ylim(min(0.0, min((r["value"] for r in scores), default=0.0)), 1.02)
        axes.set_ylabel("affinity score ρ_aff" + (" (mean ± std over batches)" if spread else ""))
        axes.set_title("Non-linearity signature")
        if len(models) > 1:
            axes.legend(fontsize="small")
        return figure


@hookimpl
def register_estimators(register):
    register(NonlinearitySignature)
