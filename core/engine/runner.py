"""The runner: onnxruntime sessions, batches in, requested tensors out as torch tensors.

Only the tensors the analyses need are exposed. They are fetched in groups whose bytes
for one batch stay within ``runtime.memory_budget``; a group that alone exceeds the
budget is fetched in micro-batches when its consumers accept that. When every consumer
accepts micro-batches, the whole set stays in one session and the batch is split
instead (no extra session, and onnxruntime's working memory shrinks with the
micro-batch). onnxruntime keeps every graph output of a run alive until the run ends,
fetched or not (measured: a session exposing all tensors of the demo CNN holds them
all even when one is fetched), so each fetch group gets its own session whose outputs
are exactly that group; when everything fits, that is one session and one forward
pass per batch. Outputs are bound
with I/O binding on the session's device and handed to torch through DLPack, without a
copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from layerscope.data.source import Samples, sample_count, take
from layerscope.graph.optimised_graph import OptimisedGraph
from layerscope.graph.session import CPU, CUDA, create_session, exposing, requested_providers
from layerscope.graph.tensors import TensorInfo
from layerscope.graph.weights import Weights
from layerscope.util.errors import UserError, first_line

from .feeds import ModelFeeds
from .reused_sessions import ReusedSessions


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch view of *array*, including ml_dtypes' bfloat16 (which ``torch.from_numpy`` refuses)."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(value: torch.Tensor) -> np.ndarray:
    """*value* as a NumPy array on the host (the inverse of :func:`to_torch`; bfloat16 as ml_dtypes')."""
    if value.dtype == torch.bfloat16:
        import ml_dtypes

        return value.view(torch.uint16).cpu().numpy().view(ml_dtypes.bfloat16)
    return value.cpu().numpy()


@dataclass
class FetchGroup:
    """Tensors fetched by one ``session.run``, in micro-batches of ``micro_batch`` samples (None: whole batch)."""

    names: list[str]
    micro_batch: int | None = None


def connected_units(units: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Units that share a tensor joined into one, in order of first appearance.

    Estimators declare tuples of tensors that must arrive in the same batch (an activation's
    input and output, say). Two declarations can overlap — one analysis reads an activation's
    output alone, another reads it with its input — and packing them separately could put the
    shared tensor in an earlier fetch group than its partner, so that the second estimator
    never sees the pair together. Joining overlapping units (the connected components of
    the "shares a tensor" relation) keeps every declared tuple inside one fetch group.
    """
    components: list[list[str]] = []
    for unit in units:
        touching = [i for i, component in enumerate(components) if any(name in component for name in unit)]
        if not touching:
            components.append(list(dict.fromkeys(unit)))
            continue
        first = touching[0]  # the joined unit keeps the place of the earliest one it touches
        for index in touching[1:]:
            components[first] += [n for n in components[index] if n not in components[first]]
        components[first] += [n for n in unit if n not in components[first]]
        components = [c for i, c in enumerate(components) if i not in touching[1:]]
    return [tuple(c) for c in components]


#: Bytes of fetched tensors a micro-batch holds at most when every tensor accepts micro-batches,
#: whatever the budget. onnxruntime's arena hands the same memory to every micro-batch after the
#: first, where a larger fetch writes fresh pages on every batch: measured on ResNet-50 (every
#: activation, batch 32, 64 samples), a 2 GiB fetch ran the whole analysis in 9.3 s with a peak
#: resident set of 2.7 GiB, micro-batches of at most 256 MiB in 4.7 s and 1.5 GiB.
WORKING_SET = 256 * 2**20


def plan_groups(
    atomic: Sequence[tuple[str, ...]],
    bytes_per_sample: dict[str, int],
    batch_size: int,
    budget: int,
    splittable: set[str],
) -> list[FetchGroup]:
    """Fetch groups whose bytes held at once stay within *budget*.

    When every tensor accepts micro-batches: one group (one session, one forward pass per
    micro-batch) over micro-batches of at most ``min(budget, WORKING_SET)`` bytes (the whole
    batch when it fits). Otherwise everything in one group when a batch of it fits the budget,
    else atomic groups packed in order, each group with its own session.
    """
    names = list(dict.fromkeys(n for unit in atomic for n in unit))
    per_sample = sum(bytes_per_sample[n] for n in names)
    if all(n in splittable for n in names) and per_sample <= budget:
        rows = max(1, min(budget, WORKING_SET) // per_sample) if per_sample else batch_size
        return [FetchGroup(names, micro_batch=rows if rows < batch_size else None)] if names else []
    if per_sample * batch_size <= budget:
        return [FetchGroup(names)] if names else []
    return _pack(atomic, bytes_per_sample, batch_size, budget, splittable)


def _pack(
    atomic: Sequence[tuple[str, ...]],
    bytes_per_sample: dict[str, int],
    batch_size: int,
    budget: int,
    splittable: set[str],
) -> list[FetchGroup]:
    """Pack atomic tensor groups, in order, into fetch groups of at most *budget* bytes per batch."""
    groups: list[FetchGroup] = []
    current: list[str] = []
    current_bytes = 0
    for unit in atomic:
        unit_bytes = sum(bytes_per_sample[n] for n in unit) * batch_size
        if unit_bytes > budget:
            per_sample = unit_bytes // batch_size
            if per_sample > budget:
                raise UserError(
                    f"runtime.memory_budget ({budget} bytes) is smaller than one sample of "
                    f"{', '.join(unit)} ({per_sample} bytes); raise the budget"
                )
            if not all(n in splittable for n in unit):
                raise UserError(
                    f"runtime.memory_budget ({budget} bytes) is smaller than one batch of "
                    f"{', '.join(unit)} ({unit_bytes} bytes); raise the budget or lower data.batch_size"
                )
            if current:
                groups.append(FetchGroup(current))
                current, current_bytes = [], 0
            groups.append(FetchGroup(list(unit), micro_batch=max(1, budget // per_sample)))
            continue
        if current and current_bytes + unit_bytes > budget:
            groups.append(FetchGroup(current))
            current, current_bytes = [], 0
        current += [n for n in unit if n not in current]
        current_bytes += unit_bytes
    if current:
        groups.append(FetchGroup(current))
    return groups


class Runner:
    """Runs a model over input batches and yields the requested tensors group by group.

    Requested model inputs are not fetched: they come from the batch's feeds, alone once per
    batch or beside the fetched tensors they were declared with.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        tensors: Sequence[TensorInfo],
        atomic_groups: Sequence[tuple[str, ...]],
        device: str,
        memory_budget: int,
        batch_size: int,
        splittable: set[str] | None = None,
        weights: Weights | None = None,
        feeds: ModelFeeds | None = None,
        reuse: ReusedSessions | None = None,
    ):
        #: how batches feed the model (default: every input of *tensors* from the data, no token mask)
        self.feeds = feeds or ModelFeeds.for_model(list(tensors))
        self.model, self.device, self.weights = model, device, weights
        #: Sessions kept across a monitor's steps (None: every runner makes its own).
        self.reuse = reuse
        self._unchecked: set[int] = set()  # kept sessions reused for the first time: checked at their first run
        self._by_name = {t.name: t for t in tensors}
        inputs = set(self.feeds.names)
        self.provider = "none (no tensor fetched)"
        self._sessions: list = []
        self.memory_budget = memory_budget
        self.batch_size = batch_size
        # inputs requested alone are yielded once per batch; with other tensors they travel in their group
        self._alone = list(dict.fromkeys(n for unit in atomic_groups if set(unit) <= inputs for n in unit))
        self._units = [set(unit) for unit in atomic_groups]
        self._atomic = connected_units(
            [tuple(n for n in unit if n not in inputs) for unit in atomic_groups if not set(unit) <= inputs]
        )
        self._splittable = splittable or set()
        self._sizes = {n: self._by_name[n].bytes_per_sample() for unit in self._atomic for n in unit}
        self.groups: list[FetchGroup] | None = None
        self.peak_fetched_bytes = 0  # the most bytes of fetched tensors yielded at once
        self.warnings: list[str] = []  # for the run's warnings

    def _inputs_with(self, names: list[str]) -> list[str]:
        """The model inputs declared in one unit with any of *names* (handed out beside them)."""
        return [n for n in self.feeds.names if any(n in unit and unit & set(names) for unit in self._units)]

    def prepare(self, samples: Samples) -> dict[str, np.ndarray]:
        """A batch as the model's feeds (:meth:`ModelFeeds.prepare`)."""
        return self.feeds.prepare(samples, "data")

    # --- fetching --------------------------------------------------------------------
    def _session_for(self, names: list[str], shared: bool = False):
        tensors = [self._by_name[n] for n in names]
        if self.reuse is not None and self.weights is not None:
            session, self.provider, check = self.reuse.session(self.model, tensors, self.device, self.weights, shared)
            if check:
                self._unchecked.add(id(session))
            return session
        with exposing(self.model, tensors, only=True) as exposed:
            session, self.provider = create_session(exposed, self.device, self.weights, shared)
        return session

    def _checked(self, index: int, feeds: dict[str, np.ndarray], names: list[str], fetched: dict) -> dict:
        """*fetched* by a kept session reused for the first time, compared with a new session's fetch of the
        same rows (:mod:`.reused_sessions`): when they differ, reuse stops and the new session's tensors count."""
        session = self._sessions[index]
        self._unchecked.discard(id(session))
        assert self.reuse is not None and self.weights is not None
        fresh = self.reuse.fresh(self.model, [self._by_name[n] for n in names], self.device, self.weights)
        expected = self._fetch_rows(fresh, feeds, names)
        same = all(torch.equal(fetched[name], expected[name]) for name in names)
        self.reuse.checked(session, same)
        if not same:
            self._sessions[index] = fresh
        return fetched if same else expected

    @property
    def fixed_batch(self) -> int | None:
        """The model's batch size when its first data input fixes one (e.g. 1), else None."""
        shape = self.feeds.primary.shape
        first = shape[0] if shape else None
        return first if isinstance(first, int) and first > 0 else None

    def _fetch(self, session, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, torch.Tensor]:
        rows = sample_count(feeds)
        fixed = self.fixed_batch
        if fixed is not None and rows != fixed:  # pad the last chunk by repeating a sample, drop the extra rows
            padded = {n: np.concatenate([a, np.repeat(a[-1:], fixed - rows, axis=0)]) for n, a in feeds.items()}
            return {name: value[:rows] for name, value in self._fetch(session, padded, names).items()}
        binding = session.io_binding()
        for name, array in (*feeds.items(), *self.feeds.constants.items()):
            binding.bind_cpu_input(name, array)
        # outputs stay on the GPU when torch can take them there; a CPU-only torch gets host copies
        device_type = "cuda" if self.provider == CUDA and torch.cuda.is_available() else "cpu"
        for name in names:
            binding.bind_output(name, device_type)
        session.run_with_iobinding(binding)
        return {name: torch.from_dlpack(value) for name, value in zip(names, binding.get_outputs())}

    def _fetch_rows(self, session, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, torch.Tensor]:
        """:meth:`_fetch` for any number of rows: a fixed-batch model runs in chunks of its batch size,
        concatenated."""
        fixed, rows = self.fixed_batch, sample_count(feeds)
        if fixed is None or rows <= fixed:
            return self._fetch(session, feeds, names)
        chunks = [
            self._fetch(session, take(feeds, slice(start, start + fixed)), names) for start in range(0, rows, fixed)
        ]
        return {name: torch.cat([chunk[name] for chunk in chunks]) for name in names}

    def _bindings(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """The sizes of the symbolic dims of the model's inputs in *feeds* (``seq`` of token ids), past the
        batch axis: the batch is not a per-sample size, and a dim that merges it (``batch*heads``) stays
        unknown."""
        batch = {t.shape[0] for t in self.feeds.inputs if t.shape and isinstance(t.shape[0], str)}
        return {
            dim: int(feeds[t.name].shape[axis])
            for t in self.feeds.inputs
            if t.name in feeds and t.shape is not None
            for axis, dim in enumerate(t.shape)
            if axis > 0 and isinstance(dim, str) and dim not in batch and axis < feeds[t.name].ndim
        }

    def sample_bytes(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """Bytes of one sample of each tensor the runner fetches, for batches like *feeds*: from the tensors'
        shapes, symbolic dims (a sequence axis) sized from the feeds' shapes; measured on the first sample
        when a shape is known only by running (data-dependent shapes)."""
        bindings = self._bindings(feeds)
        for name, size in self._sizes.items():
            self._sizes[name] = size if size is not None else self._by_name[name].bytes_per_sample(bindings)
        unknown = [n for n, size in self._sizes.items() if size is None]
        if unknown:
            for name, value in self._fetch(self._session_for(unknown), take(feeds, slice(0, 1)), unknown).items():
                self._sizes[name] = value.numel() * value.element_size()
        return {name: size for name, size in self._sizes.items() if size is not None}  # all of them, now

    def _plan(self, feeds: dict[str, np.ndarray]) -> list[FetchGroup]:
        sizes = self.sample_bytes(feeds)
        # a fixed-batch model runs that many rows at once; consumers that need whole batches hold them all
        splittable = all(n in self._splittable for unit in self._atomic for n in unit)
        rows = min(self.batch_size, self.fixed_batch or self.batch_size) if splittable else self.batch_size
        groups = plan_groups(self._atomic, sizes, rows, self.memory_budget, self._splittable)
        self._sessions = self._group_sessions(groups)
        return groups

    def _group_sessions(self, groups: list[FetchGroup]) -> list:
        """A session per fetch group. Several groups on the CPU share one optimised graph
        (:mod:`layerscope.graph.optimised_graph`): the model's weights, as onnxruntime rewrites them,
        are then held once rather than once per group."""
        if (
            len(groups) < 2
            or self.reuse is not None
            or self.weights is None
            or requested_providers(self.device) != [CPU]
        ):
            return [self._session_for(group.names, shared=len(groups) > 1) for group in groups]
        tensors = [self._by_name[n] for group in groups for n in group.names]
        try:
            optimised = OptimisedGraph(self.model, tensors, self.weights)
            try:
                sessions = [session for session, _ in (optimised.session(group.names) for group in groups)]
            finally:
                optimised.release_folder()
        except Exception as error:  # the optimised graph could not be saved (a full disk) or run: a copy per group
            reason = first_line(error)
            reason = reason if len(reason) <= 160 else "…" + reason[-159:]  # onnxruntime's own words come last
            self.warnings.append(
                f"the {len(groups)} fetch groups' sessions could not share one optimised graph ({reason}); each "
                "optimises its own, holding its own copy of the weights onnxruntime rewrites"
            )
            return [self._session_for(group.names, shared=True) for group in groups]
        self.provider = CPU
        return sessions

    def run(self, feeds: dict[str, np.ndarray]) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
        """Yield ``(sample slice, tensors)`` for each fetch group of the batch *feeds* (prepared by
        :meth:`ModelFeeds.prepare`)."""
        if self.groups is None:
            self.groups = self._plan(feeds)
        rows = sample_count(feeds)
        if self._alone:
            yield slice(0, rows), {name: to_torch(feeds[name]) for name in self._alone}
        for index, group in enumerate(self.groups):
            step = min(group.micro_batch or rows, self.fixed_batch or rows)
            attached = self._inputs_with(group.names)
            if not set(group.names) <= self._splittable:  # its consumers need the whole batch
                step = rows
            for start in range(0, rows, step):
                part = slice(start, min(start + step, rows))
                fetched = self._fetch_rows(self._sessions[index], take(feeds, part), group.names)
                if id(self._sessions[index]) in self._unchecked:
                    fetched = self._checked(index, take(feeds, part), group.names, fetched)
                held = sum(value.numel() * value.element_size() for value in fetched.values())
                self.peak_fetched_bytes = max(self.peak_fetched_bytes, held)
                fetched.update({name: to_torch(feeds[name][part]) for name in attached})
                yield part, fetched
                del fetched  # before the next fetch: at most one group's tensors are held at once
