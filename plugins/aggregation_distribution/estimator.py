"""Estimator ``aggregation_distribution``: analytic distributions of global aggregation layers and the
predicted KL-divergence of output nodes — a **reconstruction** of Ong, Husain & Bober (arXiv 2107.04458;
maths and modelling choices in :mod:`layerscope.plugins.aggregation_distribution.maths`).

For every global aggregation (found by :mod:`layerscope.plugins.aggregation_distribution.aggregations`:
the pooling node, the activation feeding it and the linear layer after it, whose weights come from the
graph) and every class:

1. fit the pre-aggregation activation per channel as a rectified Gaussian — from the
   activation's input (``fit: input``: μ, s of z) or by moment inversion from its output
   (``fit: output``);
2. predict the aggregated value's mean and variance (``effective_m``: ``auto`` estimates one
   M_eff per layer from the data as the median over channels of Var a / Var g for a mean,
   ``independent`` uses M, or a number) and its moment-matched Gamma;
3. predict every output node as a Gaussian, per class; KL between class k and the rest
   (one-vs-rest) in closed form (``kl_predicted``) and from histograms on a shared binning
   (``kl_empirical``).

Streaming: a first pass finds the value ranges of the aggregated channels and output
nodes; the second collects mergeable moments per class and fills histograms on those
ranges. Records per channel: ``predicted_mean``,
``predicted_var``, ``empirical_mean``, ``empirical_var``, ``fit_kl`` (KL of the empirical
histogram from the predicted Gamma, nats); per output node and class: ``kl_predicted``,
``kl_empirical`` (nats), the node's predicted and empirical mean and variance, and the predicted
mean and variance of the rest (``node_rest_predicted_*``, the moments of the other classes'
mixture that ``kl_predicted`` compares against); per layer ``effective_m``; and ``histogram``
rows (densities) that the plot draws: for the first ``plot_channels`` channels that are not
constant (a dead channel has nothing to draw), and for output node k of the first
``plot_channels`` nodes, class k's histogram and the rest's (``group: rest``) on their shared
binning.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from layerscope import Estimator, EstimatorTags, LoadedModel, TensorBatch, hookimpl
from layerscope.util.errors import UserError
from layerscope.util.lazy import lazy_module

from .aggregations import AGGREGATION_OPS, Aggregation, find_aggregations
from .maths import (
    aggregated_moments,
    gamma_parameters,
    gaussian_kl,
    histogram_kl,
    invert_rectified_moments,
    linear_output_moments,
    rectified_gaussian_moments,
)

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use: listing plugins does not load it

ALL = "all"
RECONSTRUCTED = (
    "Ong, Husain & Bober (arXiv 2107.04458): reconstructed from the abstract: "
    "rectified-Gaussian activations, moment-matched Gamma aggregates, Gaussian output nodes"
)


class AggregationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fit: Literal["input", "output"] = Field("input", description="fit μ, s from the activation's input or its output")
    effective_m: Literal["auto", "independent"] | float = Field(
        "auto",
        description="positions whose average g is: auto (estimated from the data, clipped to [1, M]), "
        "independent (M = H·W) or a number",
    )
    bins: StrictInt = Field(60, ge=5, le=10_000, description="histogram bins on the ranges found in a first pass")
    plot_channels: StrictInt = Field(
        4, ge=0, le=1000, description="channels and output nodes whose histograms are recorded"
    )


def _sums(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(count, Σv, Σv²) per column over *rows* of a (samples, columns, positions) tensor."""
    chosen = values[rows]
    count = torch.full(
        (values.shape[1],), float(chosen.shape[0] * chosen.shape[2]), dtype=torch.float64, device=values.device
    )
    return torch.stack([count, chosen.sum(dim=(0, 2)), (chosen * chosen).sum(dim=(0, 2))])


class AggregationDistribution(Estimator):
    """Predicted vs empirical distributions of aggregation channels and output nodes (reconstruction)."""

    name = "aggregation_distribution"
    Params = AggregationParams
    params: AggregationParams
    # declared state (setup): by (aggregation index, part, class) and (aggregation index, part)
    moments: dict[tuple[int, str, object], torch.Tensor]
    low: dict[tuple[int, str], torch.Tensor]
    high: dict[tuple[int, str], torch.Tensor]
    histograms: dict[tuple[int, str, object], torch.Tensor]
    default_selector = {"op_type": sorted(AGGREGATION_OPS)}
    tags = EstimatorTags(
        reconstructed=RECONSTRUCTED,
        tokens="models a global aggregation as the layer computes it: a pooling over tokens includes the padded "
        "tokens the model itself pools",
    )
    metric_ranges = {
        "effective_m": (1.0, math.inf),
        "predicted_var": (0.0, math.inf),
        "empirical_var": (0.0, math.inf),
        "node_predicted_var": (0.0, math.inf),
        "node_rest_predicted_var": (0.0, math.inf),
        "node_empirical_var": (0.0, math.inf),
        "fit_kl": (0.0, math.inf),
        "kl_predicted": (0.0, math.inf),
        "kl_empirical": (0.0, math.inf),
        "histogram": (0.0, math.inf),
    }

    @classmethod
    def passes_for(cls, params) -> int:
        return 2  # the first pass finds the histograms' ranges

    def setup(self) -> None:
        self.structures: list[Aggregation] = []
        self.add_state("moments", {}, "sum")  # (aggregation, part, class) -> (3, columns)
        self.add_state("low", {}, "min")  # (aggregation, part) -> (columns,)
        self.add_state("high", {}, "max")
        self.add_state("histograms", {}, "sum")  # (aggregation, part, class) -> (columns, bins)

    def bind_graph(self, tensors, model: LoadedModel | None = None) -> None:
        found = {a.output: a for a in find_aggregations(model, tensors)} if model is not None else {}
        missing = [name for name in self.tensors if name not in found]
        if missing:
            raise UserError(
                f"aggregation_distribution needs global aggregations over every spatial axis; "
                f"not one: {', '.join(missing)}"
            )
        self.structures = [found[name] for name in self.tensors]
        for structure in self.structures:
            if structure.activation != "Relu":
                raise UserError(
                    f"{structure.layer}: the aggregated map comes from {structure.activation or 'no activation'}"
                    "; the rectified-Gaussian model needs a Relu"
                )
            if self.params.fit == "input" and structure.activation_input is None:
                raise UserError(f"{structure.layer}: the activation's input cannot be observed; use fit: output")

    def fetch_groups(self) -> list[tuple[str, ...]]:
        groups = []
        for s in self.structures:
            fitted = [s.activation_input] if self.params.fit == "input" and s.activation_input is not None else []
            names = [s.input, s.output] + fitted  # bind_graph refused fit: input without the activation's input
            groups.append(tuple(names + ([s.linear_output] if s.linear_output else [])))
        return groups

    # --- streaming ---------------------------------------------------------------------
    def _parts(self, s: Aggregation, batch: TensorBatch) -> dict[str, torch.Tensor]:
        """(samples, columns, positions) float64 views of z, a, g, y for one aggregation, on the
        tensors' device (only the statistics computed from them move to the host)."""
        t = batch.tensors
        n = t[s.input].shape[0]
        parts = {"a": t[s.input].reshape(n, t[s.input].shape[1], -1), "g": t[s.output].reshape(n, -1, 1)}
        if self.params.fit == "input" and s.activation_input is not None:  # see fetch_groups
            parts["z"] = t[s.activation_input].reshape(n, t[s.activation_input].shape[1], -1)
        if s.linear_output:
            parts["y"] = t[s.linear_output].reshape(n, -1, 1)
        return {k: v.to(torch.float64) for k, v in parts.items()}

    def update(self, batch: TensorBatch) -> None:
        labels = batch.labels.reshape(-1).cpu() if batch.labels is not None else None
        classes: list[Any] = [ALL] if labels is None else sorted(set(labels.tolist()))  # ALL or class codes
        for index, s in enumerate(self.structures):
            if s.input not in batch.tensors:
                continue
            parts = self._parts(s, batch)
            for part, values in parts.items():
                key = (index, part)
                if self.pass_index == 0:  # value ranges only: min/max merge idempotently across shards
                    if part in ("g", "y"):
                        low, high = values.amin(dim=(0, 2)).cpu(), values.amax(dim=(0, 2)).cpu()
                        self.low[key] = torch.minimum(self.low[key], low) if key in self.low else low
                        self.high[key] = torch.maximum(self.high[key], high) if key in self.high else high
                    continue
                for cls in classes:
                    rows = torch.ones(len(values), dtype=torch.bool) if cls == ALL else labels == cls
                    rows = rows.to(values.device)
                    self._add("moments", (index, part, cls), _sums(values, rows))
                    if part in ("g", "y"):
                        self._add("histograms", (index, part, cls), self._histogram(key, values[rows][:, :, 0]))

    def _histogram(self, key, values: torch.Tensor) -> torch.Tensor:
        low, high = self._edges(key)
        counts = torch.zeros(values.shape[1], self.params.bins, dtype=torch.float64, device=values.device)
        for column in range(values.shape[1]):
            counts[column] = torch.histc(values[:, column], self.params.bins, float(low[column]), float(high[column]))
        return counts

    def _edges(self, key):
        """Histogram ranges per column; a constant column gets the widest range of its layer (or its
        value's magnitude), so binning does not depend on the activations' scale."""
        low, high = self.low[key].clone(), self.high[key].clone()
        flat = high <= low
        if flat.any():
            width = float((high - low).max())
            width = width if width > 0 else float(low.abs().max()) or 1.0  # all exactly 0: any width
            high[flat] = low[flat] + width
        return low, high

    def _add(self, state: str, key, value: torch.Tensor) -> None:
        self.accumulate(state, value.cpu(), key)  # state lives on the host

    # --- predictions ---------------------------------------------------------------------
    def _moments(self, index: int, part: str, cls) -> tuple[float, np.ndarray, np.ndarray]:
        """(values per column, mean, second moment) of a part for one class, or pooled (ALL); a KeyError
        when the data had none."""
        if cls == ALL and (index, part, ALL) not in self.moments:
            keys = [k for k in self.moments if k[:2] == (index, part)]
            sums = cast(np.ndarray, sum(self.moments[k].numpy() for k in keys)) if keys else None  # never 0: keys
        else:
            sums = self.moments[(index, part, cls)].numpy() if (index, part, cls) in self.moments else None
        if sums is None:
            raise KeyError((index, part, cls))
        return float(sums[0][0]), sums[1] / sums[0], sums[2] / sums[0]

    def _classes(self, index: int) -> list:
        return sorted({k[2] for k in self.moments if k[0] == index and k[2] != ALL})

    def _effective_m(self, index: int, s: Aggregation) -> float:
        """M_eff: given, M, or (auto) the data's estimate (:meth:`_estimated_m`) clipped to [1, M]."""
        setting = self.params.effective_m
        if setting == "independent" or (s.kind == "max" and setting == "auto"):
            return float(s.positions)
        if setting != "auto":
            return float(setting)
        return float(np.clip(self._estimated_m(index, s), 1.0, s.positions))

    def _estimated_m(self, index: int, s: Aggregation) -> float:
        """The median over classes and channels of Var a / Var g (× M² for a sum); M without usable channels."""
        ratios = []
        for cls in self._classes(index) or [ALL]:
            _, mean_a, second_a = self._moments(index, "a", cls)
            _, mean_g, second_g = self._moments(index, "g", cls)
            var_a, var_g = second_a - mean_a**2, second_g - mean_g**2
            usable = (var_g > 0) & (var_a > 0)
            ratios += list(var_a[usable] / var_g[usable])
        if not ratios:
            return float(s.positions)
        return float((s.positions**2 if s.kind == "sum" else 1.0) * np.median(ratios))

    def _mixture(self, index: int, s: Aggregation, classes: list, effective_m: float):
        """E[g], Var g and (E[y], Var y) of the mixture of *classes*' predictions, weighted by class size."""
        parts = [(self._moments(index, "g", cls)[0], self._predict(index, s, cls, effective_m)) for cls in classes]
        total = sum(weight for weight, _ in parts)

        def combine(pairs):
            mean = sum(w * m for w, (m, _) in pairs) / total
            second = sum(w * (v + m**2) for w, (m, v) in pairs) / total
            return mean, second - mean**2

        mean_g, var_g = combine([(w, (p[0], p[1])) for w, p in parts])
        node = combine([(w, p[2]) for w, p in parts]) if s.weight is not None else None
        return mean_g, var_g, node

    def _predict(self, index: int, s: Aggregation, cls, effective_m: float):
        """E[g], Var g per channel and (E[y], Var y) per node for one class (or ALL without labels)."""
        _, mean, second = self._moments(index, "z" if self.params.fit == "input" else "a", cls)
        scale = np.sqrt(max(float(second.max()), np.finfo(np.float64).tiny))  # the layer's RMS: floors are relative
        if self.params.fit == "input":
            mu, sd = mean, np.sqrt(np.maximum(second - mean**2, (1e-12 * scale) ** 2))
        else:  # a channel that is never positive is fitted as far below zero
            inverted = [
                invert_rectified_moments(m, q) if m > 0 else (-10.0 * scale, scale) for m, q in zip(mean, second)
            ]
            mu, sd = np.array([p[0] for p in inverted]), np.array([p[1] for p in inverted])
        mean_a, var_a = rectified_gaussian_moments(mu, sd)
        mean_g, var_g = aggregated_moments(mean_a, var_a, s.positions, effective_m, s.kind, mu, sd)
        node = (
            linear_output_moments(s.weight, s.bias, mean_g, var_g)
            if s.weight is not None and s.bias is not None  # found together
            else None
        )
        return mean_g, var_g, node

    # --- results -------------------------------------------------------------------------
    def finalize(self) -> list[dict]:
        records = []
        for index, s in enumerate(self.structures):
            if (index, "g", ALL) not in self.moments and not self._classes(index):
                continue
            effective_m = self._effective_m(index, s)
            varying = self._varying_channels(index)
            records.append(
                self.record(
                    s.output,
                    "effective_m",
                    effective_m,
                    "",
                    positions=s.positions,
                    aggregation=s.kind,
                    constant_channels=len(self.low[(index, "g")]) - len(varying),
                )
            )
            records += self._channel_records(index, s, effective_m, varying[: self.params.plot_channels])
            if s.linear_output:
                records += self._node_records(index, s, effective_m)
        return records

    def _channel_records(self, index: int, s: Aggregation, effective_m: float, drawn: list[int]) -> list[dict]:
        """Per channel and class, and pooled over classes (the prediction then is the mixture of the
        class Gammas, weighted by class size); the pooled histograms of the channels *drawn*."""
        from scipy import stats  # imported when used (see layerscope.plugins.aggregation_math)

        records = []
        low, high = self._edges((index, "g"))
        classes = self._classes(index)
        per_class = {cls: self._predict(index, s, cls, effective_m) for cls in classes}
        weights = {cls: self._moments(index, "g", cls)[0] for cls in classes}
        groups = [(cls, [cls]) for cls in classes] + [(ALL, classes or [ALL])]
        for cls, members in groups:
            if cls == ALL and not classes:
                mean_g, var_g, _ = self._predict(index, s, ALL, effective_m)
            else:
                mean_g, var_g, _ = per_class[cls] if cls != ALL else self._mixture(index, s, classes, effective_m)
            samples, empirical_mean, second = self._moments(index, "g", cls)
            hist = self.histograms.get((index, "g", cls))
            if hist is None:  # pooled over the classes (there are some: the class has moments)
                hist = cast(torch.Tensor, sum(v for k, v in self.histograms.items() if k[:2] == (index, "g")))
            for channel in range(len(mean_g)):
                edges = np.linspace(float(low[channel]), float(high[channel]), self.params.bins + 1)
                predicted = sum(
                    weights.get(member, 1.0)
                    * np.diff(stats.gamma.cdf(edges, *self._gamma(index, s, member, channel, per_class, effective_m)))
                    for member in members
                )
                predicted_bins = predicted / predicted.sum() * hist[channel].numpy().sum()  # as expected counts
                keys = {"channel": channel, "class": cls, "samples": int(samples)}
                records += [
                    self.record(s.output, "predicted_mean", mean_g[channel], **keys),
                    self.record(s.output, "predicted_var", var_g[channel], **keys),
                    self.record(s.output, "empirical_mean", empirical_mean[channel], **keys),
                    self.record(s.output, "empirical_var", second[channel] - empirical_mean[channel] ** 2, **keys),
                    self.record(
                        s.output, "fit_kl", histogram_kl(hist[channel].numpy(), predicted_bins), "nats", **keys
                    ),
                ]
                if cls == ALL and channel in drawn:
                    records += self._histogram_records(
                        s.output, hist[channel].numpy(), edges, channel=channel, **{"class": ALL}
                    )
        return records

    def _varying_channels(self, index: int) -> list[int]:
        """The aggregated channels whose value is not the same for every sample (dead ReLU channels are constant)."""
        return torch.nonzero(self.high[(index, "g")] > self.low[(index, "g")]).flatten().tolist()

    def _gamma(self, index, s, cls, channel, per_class, effective_m):
        """(shape, loc, scale) arguments of scipy's Gamma for one class's channel prediction."""
        mean_g, var_g, _ = per_class[cls] if cls in per_class else self._predict(index, s, cls, effective_m)
        shape, scale = gamma_parameters(mean_g[channel], var_g[channel])
        return shape, 0.0, scale

    def _node_records(self, index: int, s: Aggregation, effective_m: float) -> list[dict]:
        records: list[dict] = []
        if s.linear_output is None:  # no linear layer follows (finalize asks only when one does)
            return records
        low, high = self._edges((index, "y"))
        classes = self._classes(index)
        for cls in classes if len(classes) > 1 else []:
            (mean_in, var_in) = self._predict(index, s, cls, effective_m)[2]
            (mean_out, var_out) = self._mixture(index, s, [c for c in classes if c != cls], effective_m)[2]
            _, emp_mean, emp_second = self._moments(index, "y", cls)
            hist_in = self.histograms[(index, "y", cls)].numpy()
            rest = (v for k, v in self.histograms.items() if k[0] == index and k[1] == "y" and k[2] not in (cls, ALL))
            hist_out = cast(torch.Tensor, sum(rest)).numpy()  # never 0: there is another class
            for node in range(len(mean_in)):
                keys = {"node": node, "class": cls}
                records += [
                    self.record(
                        s.linear_output,
                        "kl_predicted",
                        gaussian_kl(mean_in[node], var_in[node], mean_out[node], var_out[node]),
                        "nats",
                        **keys,
                    ),
                    self.record(
                        s.linear_output, "kl_empirical", histogram_kl(hist_in[node], hist_out[node]), "nats", **keys
                    ),
                    self.record(s.linear_output, "node_predicted_mean", mean_in[node], **keys),
                    self.record(s.linear_output, "node_predicted_var", var_in[node], **keys),
                    self.record(s.linear_output, "node_empirical_mean", emp_mean[node], **keys),
                    self.record(s.linear_output, "node_empirical_var", emp_second[node] - emp_mean[node] ** 2, **keys),
                    self.record(s.linear_output, "node_rest_predicted_mean", mean_out[node], **keys),
                    self.record(s.linear_output, "node_rest_predicted_var", var_out[node], **keys),
                ]
                if node < self.params.plot_channels and node == cls:  # the class and the rest on the shared binning
                    edges = np.linspace(float(low[node]), float(high[node]), self.params.bins + 1)
                    records += self._histogram_records(
                        s.linear_output, hist_in[node], edges, node=node, **{"class": cls}
                    )
                    records += self._histogram_records(
                        s.linear_output, hist_out[node], edges, node=node, **{"class": cls, "group": "rest"}
                    )
        return records

    def _histogram_records(self, tensor: str, counts: np.ndarray, edges: np.ndarray, **keys) -> list[dict]:
        width = edges[1] - edges[0]
        density = counts / max(counts.sum() * width, 1e-300)
        return [
            self.record(
                tensor,
                "histogram",
                float(d),
                "density",
                bin=i,
                bin_center=float((edges[i] + edges[i + 1]) / 2),
                bin_width=float(width),
                **keys,
            )
            for i, d in enumerate(density)
        ]

    def collect_warnings(self) -> list[str]:
        warnings = super().collect_warnings()
        if any(s.linear_output is None for s in self.structures):
            warnings.append("no linear layer follows some aggregations: output-node predictions are skipped there")
        if any(s.kind == "max" for s in self.structures):
            warnings.append("max aggregation: predicted from the order statistics of M iid rectified Gaussians")
        if self.params.effective_m == "auto":
            for index, s in enumerate(self.structures):
                if s.kind == "max" or not any(k[0] == index for k in self.moments):
                    continue
                estimate = self._estimated_m(index, s)
                if not 1.0 <= estimate <= s.positions:
                    why = (
                        f"the aggregate varies less than {s.positions} independent positions would "
                        "(negatively correlated positions)"
                        if estimate > s.positions
                        else "the aggregate varies more than a single position does"
                    )
                    warnings.append(
                        f"{s.layer}: effective_m was estimated as {estimate:.4g}, outside [1, "
                        f"{s.positions}] ({s.positions} positions are aggregated): {why}; the "
                        f"predictions use {min(max(estimate, 1.0), s.positions):g}"
                    )
        return warnings

    @classmethod
    def plot(cls, records: list[dict]):
        from .plot import plot_aggregation

        return plot_aggregation(records)


@hookimpl
def register_estimators(register):
    register(AggregationDistribution)
