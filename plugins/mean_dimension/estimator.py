"""Estimator ``mean_dimension``: given-data total indices and the mean dimension, layer by layer.

Method: Hahn, Feinauer & Borgonovo, "The Mean Dimension of Neural Networks" (arXiv
2207.04890), after the authors' code; maths in
:mod:`layerscope.plugins.mean_dimension.maths`.

The data stream (shuffled with the run's seed) is walked in consecutive pairs
(x_j, x_{j+1}), j < ``pairs``; for every pair and feature group u the network is
evaluated on x_j and on x_j with u taken from x_{j+1}. These inputs are this
estimator's *input plan*: the runner evaluates them in large batches (at most
``plan_rows`` rows) with the same session and memory budget, and every selected tensor
(any layer) comes back in the same pass. Each data batch carries the first sample of the
next one, so pairs across batch boundaries are kept and shards of whole batches merge
exactly.

``basis: pca`` perturbs uncorrelated principal components instead: a first pass fits
PCA on the standardised inputs, and the model is rewritten with the inverse-PCA layer
(:mod:`layerscope.plugins.mean_dimension.inverse_pca`) — the network is not retrained. ``nll: true``
adds the per-sample loss −log softmax(output)[label] as an output of its own (the
reference's heatmap target).

Records: ``mean_dimension`` per tensor (the mean over its output nodes of Σ_u T_u; nodes
with zero variance are left out), ``total_index`` per feature group (mean over nodes, with
``feature`` and its ``position`` in the input), and with ``per_node`` the per-node values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from layerscope import DataBatch, EstimatorTags, LoadedModel, PlanBatch, PlanEstimator, TensorBatch, hookimpl
from layerscope.util.errors import UserError
from layerscope.util.lazy import lazy_module

from .maths import FeatureGroups, feature_groups, plan_rows, total_indices

if TYPE_CHECKING:
    import torch

    from .inverse_pca import StandardisedPCA
else:
    torch = lazy_module("torch")  # imported on first use: listing plugins does not load it

NLL = "nll"
#: A node is constant when Var f is below this fraction of E[f²] (a spread under 1e-5 of its magnitude, float32
#: round-off) or of the largest Var f among the tensor's nodes: its indices would divide round-off by round-off.
RELATIVE_VARIANCE_FLOOR = 1e-10
#: Fewest pairs the indices are computed from: below this a variance estimate is noise (with 2 pairs of 3
#: samples, mean dimensions of 21267 came out for 8 inputs); below RELIABLE_PAIRS a warning says so.
MIN_PAIRS, RELIABLE_PAIRS = 10, 100
#: A plan-pass helper handed a batch that does not come from the input plan (update never does that).
NOT_PLANNED = "mean_dimension: a batch of its input plan has no plan batch or rows"


class MeanDimensionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: StrictInt = Field(1000, ge=MIN_PAIRS, description="consecutive pairs walked")
    features: str = Field("pixels", description="elements | pixels | channels | patches:k")
    estimator: Literal["variance", "half_mean_square"] = Field(
        "variance",
        description="variance: Var(Δ)/(2 Var f) (the reference code); half_mean_square: ½E[Δ²]/Var f (Jansen)",
    )
    basis: Literal["input", "pca"] = Field(
        "input",
        description="input: perturb input features; pca: perturb principal components through an inverse-PCA layer",
    )
    nll: StrictBool = Field(False, description="also the per-sample loss of the model output against the labels")
    per_node: StrictBool = Field(False, description="also record the mean dimension of every output node")
    plan_rows: StrictInt = Field(8192, ge=1, description="largest number of rows in one evaluation of the plan")

    @field_validator("features")
    @classmethod
    def _features(cls, value: str) -> str:
        if value in ("elements", "pixels", "channels"):
            return value
        if value.startswith("patches:") and value.split(":", 1)[1].isdigit() and int(value.split(":", 1)[1]) > 0:
            return value
        raise ValueError("features must be elements, pixels, channels or patches:k (k a positive integer)")

    @model_validator(mode="after")
    def _pca_features(self):
        if self.basis == "pca" and self.features not in ("elements", "pixels"):
            raise ValueError("basis: pca perturbs principal components one by one; use features: elements")
        return self


class MeanDimension(PlanEstimator):
    """Given-data total indices and mean dimension of every selected tensor."""

    name = "mean_dimension"
    Params = MeanDimensionParams
    params: MeanDimensionParams
    # declared state (setup): the PCA pass's moments by name, the sums by tensor (or NLL)
    moments: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    changed_pairs: int
    f_sums: dict[str, torch.Tensor]
    f_squares: dict[str, torch.Tensor]
    delta_sums: dict[str, torch.Tensor]
    delta_squares: dict[str, torch.Tensor]
    default_selector = [{"activation": "output"}, {"role": "output"}]
    lookahead = 1
    tags = EstimatorTags(
        tokens="perturbs one float model input: token ids are refused; the token axes of a float input are "
        "features like any other"
    )
    metric_ranges = {
        "mean_dimension": (0.0, math.inf),
        "total_index": (0.0, math.inf),
        "node_mean_dimension": (0.0, math.inf),
    }

    @classmethod
    def passes_for(cls, params) -> int:
        return 2 if params.basis == "pca" else 1

    def setup(self) -> None:
        self.groups: FeatureGroups | None = None
        self.output_name: str | None = None
        self.pca: StandardisedPCA | None = None
        self.add_state("moments", {}, "sum")  # PCA fit: count, Σx, Σxxᵀ (reset once fitted)
        for name in ("counts", "f_sums", "f_squares", "delta_sums", "delta_squares"):
            self.add_state(name, {}, "sum")
        self.add_state("changed_pairs", 0, "sum")  # pairs whose two samples differ in some feature

    # --- declaration -----------------------------------------------------------------
    def bind_graph(self, tensors, model: LoadedModel | None = None) -> None:
        inputs = [t for t in tensors if t.role == "input" and t.observable]  # constant inputs are not perturbed
        if len(inputs) != 1 or not np.issubdtype(np.dtype(inputs[0].dtype or "float32"), np.floating):
            listed = ", ".join(f"{t.name} ({t.dtype})" for t in inputs)
            raise UserError(
                f"mean_dimension perturbs the features of one float model input; this model's data "
                f"inputs are {listed} (token ids cannot be perturbed continuously)"
            )
        model_input = inputs[0]
        self.input_name = model_input.name
        shape = tuple(model_input.shape[1:]) if model_input.shape is not None else ()
        if not shape or not all(isinstance(d, int) for d in shape):
            raise UserError(f"mean_dimension needs a static input shape, not {model_input.shape}")
        self.sample_shape = shape
        outputs = [t for t in tensors if t.role == "output"]
        self.output_name = outputs[0].name if outputs else None
        if self.params.basis == "input":
            try:
                self.groups = feature_groups(shape, self.params.features, model_input.layout == "NHWC")
            except ValueError as error:
                raise UserError(str(error)) from None

    @property
    def _groups(self) -> FeatureGroups:
        """The feature groups, set by bind_graph (basis input) or at the end of the PCA pass (basis pca)."""
        if self.groups is None:
            raise RuntimeError("mean_dimension: the feature groups are not known before bind_graph and the PCA pass")
        return self.groups

    def fetch_groups(self) -> list[tuple[str, ...]]:
        if self.pass_index < self.passes - 1:
            return []  # the PCA pass reads the data only
        names = list(self.tensors)
        if self.params.nll and self.output_name and self.output_name not in names:
            names.append(self.output_name)
        return [(name,) for name in names]

    def plan_rows(self, batch_size: int) -> int:
        return min(self.params.plan_rows, batch_size * (len(self._groups) + 1))

    # --- the PCA pass ------------------------------------------------------------------
    def update(self, batch: TensorBatch) -> None:
        if batch.plan is None:
            self._collect_moments(batch.inputs)
            return
        if batch.rows is not None and not batch.rows.start:  # a plan batch's first rows: count its pairs once
            self.accumulate("changed_pairs", batch.plan.meta.get("changed", 0))
        for name, values in batch.tensors.items():
            # per plan batch in the tensor's own precision, on its device; every sum accumulates in float64
            f = values.reshape(values.shape[0], -1)
            if name in self.tensors:
                self._accumulate(name, f, batch)
            if self.params.nll and name == self.output_name:
                self._accumulate(NLL, self._nll(f, batch), batch)

    def _collect_moments(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(inputs.shape[0], -1).to(torch.float64).cpu()
        update = {"count": torch.tensor(float(len(x)), dtype=torch.float64), "total": x.sum(0), "outer": x.T @ x}
        for key, value in update.items():
            self.accumulate("moments", value, key)

    def end_pass(self) -> None:
        if self.pass_index < self.passes - 1 and self.params.basis == "pca":
            from .inverse_pca import fit_standardised_pca

            m = self.moments
            self.pca = fit_standardised_pca(float(m["count"]), m["total"].numpy(), m["outer"].numpy())
            self.groups = feature_groups((len(self.pca.mean),), "elements")
            self.moments = {}
        super().end_pass()

    def transform_model(self, model):
        if self.params.basis != "pca":
            return model
        from .inverse_pca import prepend_inverse_pca

        if self.pca is None:
            raise RuntimeError("mean_dimension: the model is transformed before the PCA pass ended")
        return prepend_inverse_pca(model, self.pca)

    # --- the plan --------------------------------------------------------------------------
    def input_plan(self, data: DataBatch):
        """Per data batch: base rows x_j of every pair, then x_j with each group from x_{j+1}."""
        x = data.x[self.input_name] if isinstance(data.x, Mapping) else data.x  # named arrays: the perturbed input's
        x = x.reshape(len(x), -1)
        x = self.pca.transform(x.astype(np.float64)) if self.pca is not None else x.astype(np.float32, copy=False)
        local = np.arange(data.size)
        local = local[(data.start + local < self.params.pairs) & (local + 1 < len(x))]
        per_chunk = max(1, self.params.plan_rows // (len(self._groups) + 1))
        for begin in range(0, len(local), per_chunk):
            pairs = local[begin : begin + per_chunk]
            rows = plan_rows(x[pairs], x[pairs + 1], self._groups).astype(np.float32, copy=False)
            labels = None if data.y is None else np.asarray(data.y)[pairs]
            changed = int(np.count_nonzero(np.any(x[pairs] != x[pairs + 1], axis=1)))  # pairs whose inputs differ
            yield PlanBatch(rows, {"pairs": len(pairs), "labels": labels, "changed": changed})

    def _nll(self, logits: torch.Tensor, batch: TensorBatch) -> torch.Tensor:
        if batch.plan is None:
            raise ValueError(NOT_PLANNED)
        labels = batch.plan.meta["labels"]
        if labels is None:
            raise UserError("mean_dimension with nll: true needs labels in the data")
        pair_of_row = self._pair_of_rows(batch)
        targets = torch.as_tensor(labels, dtype=torch.int64)[pair_of_row].to(logits.device)
        outside = (targets < 0) | (targets >= logits.shape[1])
        if bool(outside.any()):
            raise UserError(
                f"mean_dimension with nll: true reads the labels as indices of the model's "
                f"{logits.shape[1]} outputs, but a label's class index is {int(targets[outside][0])}"
            )
        return -torch.log_softmax(logits, dim=1).gather(1, targets[:, None])

    def _pair_of_rows(self, batch: TensorBatch) -> torch.Tensor:
        if batch.plan is None or batch.rows is None:
            raise ValueError(NOT_PLANNED)
        pairs = batch.plan.meta["pairs"]
        rows = torch.arange(batch.rows.start, batch.rows.start + batch.size)
        return torch.where(rows < pairs, rows, (rows - pairs) // len(self._groups))

    def _accumulate(self, key: str, f: torch.Tensor, batch: TensorBatch) -> None:
        """Fold rows of one plan batch into the sums: base rows give f, perturbed rows Δ = f − f(base)."""
        if batch.plan is None or batch.rows is None:
            raise ValueError(NOT_PLANNED)
        pairs, groups = batch.plan.meta["pairs"], len(self._groups)
        first = batch.rows.start
        cache = getattr(self, "_cache_base", {})
        self._cache_base = cache
        if cache.get(key, (None,))[0] is not batch.plan:
            cache[key] = (batch.plan, torch.zeros(pairs, f.shape[1], dtype=f.dtype, device=f.device))
        base = cache[key][1]
        n_base = min(max(pairs - first, 0), len(f))
        if n_base:
            base_rows = f[:n_base]
            base[first : first + n_base] = base_rows
            self._add("counts", key, torch.tensor(float(n_base), dtype=torch.float64))
            self._add("f_sums", key, base_rows.sum(0, dtype=torch.float64))
            self._add("f_squares", key, (base_rows.double() ** 2).sum(0))
        perturbed = f[n_base:]
        if len(perturbed):
            offset = max(first, pairs) - pairs  # position of the first perturbed row among them
            if offset % groups == 0 and len(perturbed) % groups == 0:  # whole pairs: (pairs, groups, nodes)
                pair = offset // groups
                # in float64: squares of tiny or huge activations stay finite and non-zero
                delta = (
                    perturbed.view(-1, groups, f.shape[1]) - base[pair : pair + len(perturbed) // groups, None, :]
                ).double()
                self._add("delta_sums", key, delta.sum(0))
                self._add("delta_squares", key, (delta * delta).sum(0))
            else:  # a part that cuts through pairs
                index = torch.arange(offset, offset + len(perturbed), device=f.device)
                delta = (perturbed - base[index // groups]).double()
                zeros = torch.zeros(groups, f.shape[1], dtype=torch.float64, device=f.device)
                self._add("delta_sums", key, zeros.index_add(0, index % groups, delta))
                self._add("delta_squares", key, zeros.index_add(0, index % groups, delta * delta))

    def _add(self, state: str, key: str, value: torch.Tensor) -> None:
        self.accumulate(state, value.cpu(), key)  # per-node sums: the state lives on the host

    # --- results -------------------------------------------------------------------------
    def _indices(self, key: str):
        count = float(self.counts[key])
        t, variance_f = total_indices(
            count,
            self.f_sums[key],
            self.f_squares[key],
            self.delta_sums[key],
            self.delta_squares[key],
            self.params.estimator,
        )
        mean_square = self.f_squares[key] / count
        largest = float(variance_f.max().clamp(min=0))
        valid = (variance_f > RELATIVE_VARIANCE_FLOOR * mean_square) & (variance_f > RELATIVE_VARIANCE_FLOOR * largest)
        return t, valid, count

    def finalize(self) -> list[dict]:
        records = []
        keys = [name for name in self.tensors if name in self.counts] + ([NLL] if NLL in self.counts else [])
        available = min((int(self.counts[key]) for key in keys), default=0)
        if keys and available < MIN_PAIRS:
            raise UserError(
                f"mean_dimension: only {available} pairs of consecutive samples came with the data; total indices "
                f"need at least {MIN_PAIRS} (a variance from fewer is noise): give more samples"
            )
        if keys and not self.changed_pairs:
            raise UserError(
                "mean_dimension: every pair of consecutive samples is identical in every feature (the data is "
                "constant): no perturbation changes the input, so no index can be estimated"
            )
        for key in keys:
            t, valid, count = self._indices(key)
            if not bool(valid.any()):
                continue
            kept = t[:, valid]
            common = {"pairs": int(count), "nodes": int(valid.sum())}
            record = self._record_for(key)
            records.append(record("mean_dimension", float(kept.sum(0).mean()), **common))
            grid = list(self._groups.grid)
            for u, position in enumerate(self._groups.positions):
                records.append(
                    record(
                        "total_index",
                        float(kept[u].mean()),
                        feature=u,
                        position=[int(p) for p in position],
                        grid=grid,
                        pairs=int(count),
                    )
                )
            if self.params.per_node:
                for node, value in zip(torch.nonzero(valid).flatten().tolist(), kept.sum(0).tolist()):
                    records.append(record("node_mean_dimension", value, node=node, pairs=int(count)))
        return records

    def _record_for(self, key: str):
        def make(metric: str, value: float, **keys):
            built = self.record(key, metric, value, "", basis=self.params.basis, **keys)
            if key == NLL:
                built["layer"] = "loss (nll)"
            return built

        return make

    def collect_warnings(self) -> list[str]:
        warnings = super().collect_warnings()
        for key in self.counts:
            t, valid, count = self._indices(key)
            if count < self.params.pairs:
                warnings.append(f"{key}: only {int(count)} of the {self.params.pairs} pairs were available")
            if count < RELIABLE_PAIRS:
                warnings.append(f"{key}: indices from {int(count)} pairs vary by tens of percent between samples")
            constant = int((~valid).sum())
            mean_dimension = float(t[:, valid].sum(0).mean()) if constant < len(valid) else 0.0
            if mean_dimension > len(self._groups) * (1 + 1e-6):
                warnings.append(
                    f"{key}: mean dimension {mean_dimension:.4g} exceeds the {len(self._groups)} feature groups: the "
                    "features are strongly dependent (generalised indices, e.g. duplicated inputs), so it counts no "
                    "interacting features"
                )
            if constant == len(valid):
                warnings.append(f"{key}: every output node is constant (a dead or constant layer): no mean dimension")
            elif constant:
                warnings.append(f"{key}: {constant} output nodes with zero variance left out of the mean dimension")
        return list(dict.fromkeys(warnings))

    @classmethod
    def plot(cls, records: list[dict]):
        from .plot import plot_mean_dimension

        return plot_mean_dimension(records)


@hookimpl
def register_estimators(register):
    register(MeanDimension)
