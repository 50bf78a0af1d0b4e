"""Estimator ``information_plane``: I(X;T) and I(T;Y) per layer from matrix-based Rényi entropy.

Method: Wickstrøm, Løkse, Kampffmeyer, Yu, Príncipe & Jenssen, "Information Plane Analysis
of Deep Neural Networks via Matrix-Based Rényi's Entropy and Tensor Kernels" (arXiv
1909.11396; Entropy 25(6):899, 2023), after the authors' code.

On every batch of ``batch_size`` samples (default 100; samples outside full batches are
not used, as with the paper's fixed-size training batches), for every selected tensor T:
Gram matrices K = exp(−‖a − b‖²/σ²) of the input X, of T (the tensor kernel: the Gaussian
on the flattened tensor, never pooled) and of the one-hot labels Y; A = K / tr K;

    I(X;T) = S_α(A_X) + S_α(A_T) − S_α(A_X, A_T),   I(T;Y) = S_α(A_T) + S_α(A_Y) − S_α(A_T, A_Y)

in bits (maths in :mod:`layerscope.plugins.information_plane.maths`). Records are the means over
batches (``I_XT``, ``I_TY``, ``H_T``), their spread (``*_std``, population standard deviation
over batches), and the kernel widths used (``sigma``).

Kernel widths. ``sigma_x`` defaults to the mean pairwise distance of the inputs over the
data (a first pass). Hidden layers use ``sigma: alignment`` by default: the width that
maximises the kernel alignment ⟨K_σ, K_Y⟩/(‖K_σ‖‖K_Y‖) with the label kernel over a grid.
The paper searches ``linspace(0.3, 10·d̄)`` per training batch; here the grid is
``f·d̄`` with f on ``linspace(*grid_range, sigma_grid)`` and d̄ the batch's mean pairwise
distance (``width_grid: absolute`` searches the paper's grid instead), the alignment curves are
summed over the batches of a first pass, and every checkpoint uses its own σ*. A σ* at an end of
its grid (once per layer and run), and a smoothed σ more than a factor 1.25 from its checkpoint's σ*,
are warned about. The authors' grid runs downward, from 0.3 to 10·d̄, when 10·d̄ < 0.3.
The paper smooths σ* with a moving average σ_t = 0.9·σ_{t−1} + 0.1·σ*_t over *training
iterations*, a few steps apart; across saved
checkpoints, epochs apart, the same average would still carry 39 % of checkpoint 1's width
at checkpoint 10 (0.9⁹), so it is off by default (``smoothing: 0``) and available as
``smoothing`` (the weight of the previous checkpoint's σ). Both σ* (``sigma_optimal``) and the
σ used (``sigma``) are recorded per layer and checkpoint. A model output is passed through a softmax
before its kernel (``softmax_output``).

Tokens: X is the model's first data input, so a model fed token ids (integers) is refused.
In a model with a token mask, padded tokens of a layer are zeroed before its kernel, so
extra padding changes no distance.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from layerscope import Estimator, EstimatorTags, LoadedModel, TensorBatch, hookimpl
from layerscope.graph.tokens import zero_padding
from layerscope.util.errors import UserError
from layerscope.util.lazy import lazy_module

from .maths import (
    alignment_curve,
    gaussian_gram,
    joint_entropy,
    label_gram,
    mean_pairwise_distance,
    normalise,
    pairwise_sq_distances,
    renyi_entropy,
    width_grid,
)

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")  # imported on first use: listing plugins does not load it

METRICS = ("I_XT", "I_TY", "H_T")
#: A smoothed width more than this factor from its checkpoint's σ* (either side) is warned about.
FAR_FROM_OPTIMUM = 1.25
INPUT_KEY, LABELS_KEY = "input", "labels"


class InformationPlaneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.01, gt=0, description="Rényi order; 1 gives the von Neumann limit")
    batch_size: StrictInt = Field(
        100, ge=2, le=20_000, validate_default=True, description="samples per estimate (the paper's training batch)"
    )
    sigma: float | Literal["alignment"] = Field("alignment", description="hidden-layer kernel width")
    sigma_x: float | None = Field(None, gt=0, description="input kernel width; default: mean pairwise distance")
    sigma_y: float = Field(0.1, gt=0, description="label kernel width on one-hot labels")
    softmax_output: StrictBool = Field(True, description="softmax on the model output before its kernel")
    sigma_grid: StrictInt = Field(300, ge=2, le=100_000, description="widths searched by kernel alignment")
    grid_range: tuple[float, float] = Field(
        (0.03, 10.0), description="the searched widths are f·(mean pairwise distance) for f evenly spaced on this range"
    )
    width_grid: Literal["relative", "absolute"] = Field(
        "relative",
        description="relative: widths f·d̄ for f on grid_range; absolute: the authors' grid, "
        "linspace(0.3, 10·d̄, sigma_grid), its floor 0.3 in the layer's own units",
    )
    smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="weight of the previous checkpoint's sigma "
        "(0: every checkpoint uses its own; the paper: 0.9 per "
        "training iteration)",
    )

    @field_validator("batch_size")
    @classmethod
    def _within_the_data_batches(cls, size: int, info: ValidationInfo) -> int:
        """The method estimates on batches of the data stream as it comes (data batches are never pooled, so
        that shards merge exactly): a batch larger than the data's batches, or than the samples a run reads,
        would give no estimate at all."""
        context = info.context or {}
        for key, name in (("data_batch_size", "data.batch_size"), ("data_limit", "data.limit")):
            if type(context.get(key)) is int and size > context[key]:  # bool is an int: a wrong value, refused apart
                raise ValueError(
                    f"batch_size {size} is larger than {name} ({context[key]}): every estimate takes "
                    f"{size} samples of one data batch; give batch_size ≤ {context[key]} or a larger {name}"
                )
        return size

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.sigma, float) and self.sigma <= 0:
            raise ValueError("sigma must be positive or 'alignment'")
        if not 0 < self.grid_range[0] < self.grid_range[1]:
            raise ValueError("grid_range must be [low, high] with 0 < low < high")
        if self.width_grid == "absolute" and "grid_range" in self.model_fields_set:
            raise ValueError(
                "grid_range sets the relative grid; width_grid: absolute is the authors' grid, linspace(0.3, 10·d̄)"
            )
        if self.width_grid == "absolute" and self.sigma != "alignment":
            raise ValueError(
                "width_grid: absolute is the grid kernel alignment searches; a fixed sigma searches none: "
                "give sigma: alignment or leave width_grid out"
            )
        return self


def _moments(values: list[float]) -> torch.Tensor:
    """(count, Σv, Σv²) for mergeable means and spreads."""
    v = torch.tensor(values, dtype=torch.float64)
    return torch.stack([torch.tensor(float(len(values)), dtype=torch.float64), v.sum(), (v * v).sum()])


def _rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if mask is None else mask[rows]


class InformationPlane(Estimator):
    """I(X;T), I(T;Y) and H(T) per layer (matrix-based Rényi entropy, tensor kernels)."""

    name = "information_plane"
    Params = InformationPlaneParams
    params: InformationPlaneParams
    # declared state (setup)
    alignment_sums: dict[str, torch.Tensor]
    distance_sums: dict[str, torch.Tensor]
    input_distances: dict[int, float]
    sigma_used: dict[str, float]
    sigma_optimal: dict[str, float]
    sigma_x_used: dict[str, float]
    at_grid_end: dict[str, int]
    moments: dict[str, dict[str, torch.Tensor]]
    reference_entropies: dict[int, torch.Tensor]
    unused_samples: dict[int, int]
    one_class_batches: dict[int, int]
    default_selector = [{"activation": "output"}, {"role": "output"}]
    tags = EstimatorTags(
        needs_labels=True,
        per_batch=True,
        tokens="with a token mask: padded tokens zeroed before the kernel (X must be a float input, not token ids)",
    )

    @classmethod
    def passes_for(cls, params) -> int:
        return 2 if params.sigma == "alignment" or params.sigma_x is None else 1

    def setup(self) -> None:
        p = self.params
        self.grid = width_grid(p.width_grid, p.grid_range, p.sigma_grid)
        self.previous_sigma: dict[str, float] = {}
        # first pass: width statistics (reset once turned into widths)
        self.add_state("alignment_sums", {}, "sum")  # tensor -> (grid,) Σ alignment over batches
        self.add_state("distance_sums", {}, "sum")  # tensor -> (batches, Σ mean pairwise distance)
        self.add_state("input_distances", {}, "max")  # chunk start -> mean pairwise input distance
        # widths (identical in every shard once the first pass is merged)
        self.add_state("sigma_used", {}, "max")
        self.add_state("sigma_optimal", {}, "max")
        self.add_state("sigma_x_used", {}, "max")  # {"input": σ_x}
        # layers whose σ* was at an end of its grid at this or an earlier checkpoint: warned about once a run
        self.add_state("at_grid_end", {}, "max")  # tensor -> 1
        # estimates
        self.add_state("moments", {}, "sum")  # tensor -> metric -> (n, Σv, Σv²)
        self.add_state("reference_entropies", {}, "max")  # chunk start -> (H_X, H_Y)
        self.add_state("unused_samples", {}, "max")  # data batch start -> samples outside full chunks
        self.add_state("one_class_batches", {}, "max")  # chunk start -> 1 when its samples are of one class
        if p.sigma != "alignment":
            self.sigma_used = {name: float(p.sigma) for name in self.tensors}
        if p.sigma_x is not None:
            self.sigma_x_used = {INPUT_KEY: float(p.sigma_x)}

    def carry_over(self, previous: InformationPlane) -> None:
        self.previous_sigma = dict(previous.sigma_used)
        self.at_grid_end = dict(previous.at_grid_end)

    # --- streaming ---------------------------------------------------------------------
    def _chunks(self, batch: TensorBatch):
        size = self.params.batch_size
        full = batch.size - batch.size % size
        if full < batch.size:
            self.unused_samples[batch.start] = batch.size - full
        for start in range(0, full, size):
            yield slice(start, start + size), batch.start + start

    def bind_graph(self, tensors, model: LoadedModel | None = None) -> None:
        inputs = [t for t in tensors if t.role == "input" and t.observable]
        if not inputs or not np.issubdtype(np.dtype(inputs[0].dtype or "float32"), np.floating):
            raise UserError(
                f"information_plane: I(X;T) needs a float model input X (a kernel on its values); "
                f"this model's first data input is {inputs[0].name} ({inputs[0].dtype})"
                if inputs
                else "information_plane: the model has no data input"
            )

    def _tensor_distances(self, name: str, values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pairwise squared distances of the samples of tensor *name* (padded tokens zeroed: extra padding
        changes no distance)."""
        info = self.tensors.get(name)
        if mask is not None and self.token_axes.get(name):
            values = zero_padding(values, mask.to(values.device), self.token_axes[name])
        if self.params.softmax_output and info is not None and info.role == "output" and values.ndim == 2:
            values = torch.softmax(values.to(torch.float64), dim=1)
        return pairwise_sq_distances(values)

    def update(self, batch: TensorBatch) -> None:
        if batch.labels is None:
            raise ValueError("information_plane needs labels")
        final_pass = self.pass_index == self.passes - 1
        device = next(iter(batch.tensors.values())).device  # the runner's device (CUDA tensors stay there)
        for chunk, chunk_start in self._chunks(batch):
            labels = batch.labels[chunk].to(device)
            if final_pass:
                self._estimate(batch, chunk, chunk_start, labels)
            else:
                self._collect_widths(batch, chunk, chunk_start, labels)

    def _collect_widths(self, batch: TensorBatch, chunk: slice, chunk_start: int, labels: torch.Tensor) -> None:
        self.input_distances[chunk_start] = mean_pairwise_distance(
            pairwise_sq_distances(batch.inputs[chunk].to(labels.device))
        )
        if self.params.sigma != "alignment":
            return
        self.one_class_batches[chunk_start] = int(bool((labels == labels[0]).all()))
        label_kernel = label_gram(labels, self.params.sigma_y)
        for name, values in batch.tensors.items():
            d2 = self._tensor_distances(name, values[chunk], _rows(batch.token_mask, chunk))
            mean_distance = mean_pairwise_distance(d2)
            if mean_distance == 0.0:
                continue  # a constant layer in this batch: every width gives the same kernel
            curve = alignment_curve(d2, label_kernel, self.grid.widths(mean_distance).to(d2.device)).cpu()
            self.accumulate("alignment_sums", curve, name)
            self.accumulate("distance_sums", torch.tensor([1.0, mean_distance], dtype=torch.float64), name)

    def end_pass(self) -> None:
        if self.pass_index < self.passes - 1:
            if self.params.sigma_x is None and self.input_distances:
                distances = list(self.input_distances.values())
                self.sigma_x_used = {INPUT_KEY: sum(distances) / len(distances)}
                if self.sigma_x_used[INPUT_KEY] == 0.0:
                    raise UserError(
                        "information_plane: every input sample of every batch is the same (the mean pairwise "
                        "distance that sets σ_x is 0), so I(X;T) has no kernel width; give params.sigma_x, or "
                        "data whose samples differ"
                    )
            if self.params.sigma == "alignment":
                self._choose_widths()
            self.alignment_sums, self.distance_sums, self.input_distances = {}, {}, {}
        super().end_pass()

    def _choose_widths(self) -> None:
        """σ* = the grid width of the summed alignment curves' argmax at the batches' mean d̄, smoothed with the
        previous checkpoint's σ; warns when σ* is an end of its grid (the alignment may peak beyond it) or the
        smoothed σ lies more than a factor ``FAR_FROM_OPTIMUM`` from σ*."""
        at_edge, far = [], []
        smoothing = self.params.smoothing
        for name, curve in self.alignment_sums.items():
            count, distance_sum = self.distance_sums[name].tolist()
            index = int(torch.argmax(curve))
            widths = self.grid.widths(distance_sum / count)
            best = float(widths[index])
            self.sigma_optimal[name] = best
            previous = self.previous_sigma.get(name)
            self.sigma_used[name] = best if previous is None else smoothing * previous + (1 - smoothing) * best
            layer = self.tensors[name].layer if name in self.tensors else name
            if index in (0, len(widths) - 1) and name not in self.at_grid_end:
                self.at_grid_end[name] = 1
                end = "first" if index == 0 else "last"
                downward = ", a grid that runs downward as 10·d̄ < 0.3" if widths[-1] < widths[0] else ""
                at_edge.append(
                    f"{layer} σ* = {best:.4g} (the {end} of {float(widths[0]):.4g}…{float(widths[-1]):.4g}{downward})"
                )
            ratio = self.sigma_used[name] / best
            if max(ratio, 1 / ratio) > FAR_FROM_OPTIMUM:
                far.append(f"{layer} σ = {self.sigma_used[name]:.4g} against σ* = {best:.4g}")
        if at_edge:
            self.warn(
                f"kernel widths chosen at an end of their {self.params.width_grid} alignment grid (the alignment "
                "may peak beyond it, so these widths and the estimates they give are the grid's, not the "
                "alignment's; each layer is named once a run, at the first checkpoint where it happens): "
                + ", ".join(at_edge)
            )
        if far:
            self.warn(
                f"smoothing {smoothing:g} leaves kernel widths more than a factor {FAR_FROM_OPTIMUM:g} from this "
                "checkpoint's alignment optimum σ* (the estimates then reflect earlier checkpoints' widths): "
                + ", ".join(far)
            )

    def _estimate(self, batch: TensorBatch, chunk: slice, chunk_start: int, labels: torch.Tensor) -> None:
        p = self.params
        cache = getattr(self, "_cache_chunk", None)
        if cache is None or cache[0] != chunk_start:
            inputs = batch.inputs[chunk].to(labels.device)
            a_x = normalise(gaussian_gram(pairwise_sq_distances(inputs), self.sigma_x_used[INPUT_KEY]))
            a_y = normalise(label_gram(labels, p.sigma_y))
            cache = (chunk_start, a_x, a_y, renyi_entropy(a_x, p.alpha), renyi_entropy(a_y, p.alpha))
            self._cache_chunk = cache
            self.reference_entropies[chunk_start] = torch.tensor(cache[3:], dtype=torch.float64)  # on the CPU
        _, a_x, a_y, h_x, h_y = cache
        for name, values in batch.tensors.items():
            sigma = self.sigma_used.get(name)
            if sigma is None:
                continue  # constant in every batch of the width pass: no kernel width (warned in finalize)
            a_t = normalise(
                gaussian_gram(self._tensor_distances(name, values[chunk], _rows(batch.token_mask, chunk)), sigma)
            )
            h_t = renyi_entropy(a_t, p.alpha)
            estimates = {
                "I_XT": h_x + h_t - joint_entropy(a_x, a_t, p.alpha),
                "I_TY": h_t + h_y - joint_entropy(a_t, a_y, p.alpha),
                "H_T": h_t,
            }
            for metric, value in estimates.items():
                self.accumulate("moments", _moments([value]), name, metric)

    # --- results -------------------------------------------------------------------------
    def finalize(self) -> list[dict]:
        if not self.moments and self.unused_samples:
            raise UserError(
                f"information_plane: no batch of {self.params.batch_size} samples came with the data (the data "
                f"batches held {max(self.unused_samples.values())} samples at most); lower params.batch_size"
            )
        records = []
        for name in self.tensors:
            store = self.moments.get(name)
            if not store:
                continue
            for metric in METRICS:
                n, total, squares = store[metric].tolist()
                mean = total / n
                records.append(self.record(name, metric, mean, "bits", batches=int(n)))
                spread = math.sqrt(max(squares / n - mean * mean, 0.0))
                records.append(self.record(name, f"{metric}_std", spread, "bits", batches=int(n)))
            records.append(self.record(name, "sigma", self.sigma_used[name]))
            if name in self.sigma_optimal:
                records.append(self.record(name, "sigma_optimal", self.sigma_optimal[name]))
        if self.reference_entropies:
            entropies = torch.stack(list(self.reference_entropies.values())).mean(dim=0).tolist()
            batches = len(self.reference_entropies)
            records.append(
                {
                    "layer": INPUT_KEY,
                    "tensor": INPUT_KEY,
                    "metric": "H_X",
                    "value": entropies[0],
                    "unit": "bits",
                    "batches": batches,
                }
            )
            records.append(
                {
                    "layer": LABELS_KEY,
                    "tensor": LABELS_KEY,
                    "metric": "H_Y",
                    "value": entropies[1],
                    "unit": "bits",
                    "batches": batches,
                }
            )
            records.append(
                {
                    "layer": INPUT_KEY,
                    "tensor": INPUT_KEY,
                    "metric": "sigma",
                    "value": self.sigma_x_used[INPUT_KEY],
                    "unit": "",
                }
            )
        return records

    def value_range(self, record: dict) -> tuple[float, float]:
        """Entropies and mutual informations (and their spreads) of a trace-one N×N Gram matrix lie in
        [0, log2 N], N = ``batch_size``; kernel widths are positive."""
        if record["metric"].startswith(("I_", "H_")):
            return 0.0, math.log2(self.params.batch_size)
        return 0.0, math.inf

    def collect_warnings(self) -> list[str]:
        warnings = super().collect_warnings()
        unused = sum(self.unused_samples.values())
        if unused:
            warnings.append(f"{unused} samples outside full batches of {self.params.batch_size} were not used")
        if self.one_class_batches and all(self.one_class_batches.values()):
            warnings.append(
                "every batch holds samples of one class: I(T;Y) is 0, and kernel alignment with the label kernel "
                "cannot choose a width (the widths recorded are arbitrary); give a number for params.sigma"
            )
        missing = [name for name in self.tensors if name not in self.sigma_used]
        if missing:
            warnings.append(
                f"tensors constant in every batch have no kernel width and no estimate: {', '.join(missing)}"
            )
        return warnings

    @classmethod
    def plot(cls, records: list[dict]):
        from .plot import plot_information_plane

        return plot_information_plane(records)


@hookimpl
def register_estimators(register):
    register(InformationPlane)
