"""The lifecycle driver (pass scheduling, failure isolation, resume) tested directly, and the
local engines (this process, worker processes) without Ray: shards and schedules give the
single-process records."""

from __future__ import annotations

import itertools
import pickle
import sys

import numpy as np
import pytest
import torch

import layerscope
from layerscope import Estimator, TensorBatch
from layerscope.data.source import iter_batches, shard_spans
from layerscope.engine.lifecycle import (
    Isolation,
    SequentialExecutor,
    ShardMerge,
    ShardOutcome,
    ShardTask,
    copied,
    drive,
)
from layerscope.testing import assert_records_close
from layerscope.util.errors import SpecError, UserError

# Every built-in estimator on two epochs of the demo GAP CNN (it has activations, a
# global-average-pooling layer and an output), in one spec.
EVERY_ESTIMATOR = {
    "model": {"source": "demo:digits-gap", "checkpoints": ["epoch_02", "epoch_10"]},
    "data": {"source": "digits", "split": "train", "limit": 500, "batch_size": 100},
    "analyses": [
        {"id": "binary", "estimator": "activation_entropy"},
        {"id": "hist", "estimator": "activation_entropy", "params": {"variant": "histogram", "bins": 12}},
        {"id": "ip", "estimator": "information_plane", "params": {"sigma_grid": 30, "smoothing": 0.9}},
        {"id": "nls", "estimator": "nonlinearity_signature"},
        {"id": "md", "estimator": "mean_dimension", "params": {"pairs": 60, "features": "channels"}},
        {"id": "agg", "estimator": "aggregation_distribution", "params": {"bins": 20}},
    ],
}


# --- the driver, on a journal estimator ----------------------------------------------------------
JOURNAL: list[tuple] = []  # (event, checkpoint, …) in the order the driver caused them


class Journal(Estimator):
    """Two passes; sums its shard's values, writes every lifecycle call into JOURNAL."""

    name = "journal"
    fail_in: str | None = None  # a phase that raises, for the isolation tests

    @classmethod
    def passes_for(cls, params) -> int:
        return 2

    def setup(self) -> None:
        self.add_state("total", 0.0, "sum")
        self.add_state("first_pass_total", 0.0, "max")
        self.add_state("checkpoint", -1, "max")
        self.carried = None

    def _log(self, event: str, *details) -> None:
        JOURNAL.append((event, self.checkpoint, self.pass_index, *details))
        if event == self.fail_in:
            raise RuntimeError(f"{event} broke")

    def update(self, batch: TensorBatch) -> None:
        self.total += float(batch.inputs.sum())
        self._log("update", batch.start)

    def merge(self, other: Journal) -> Journal:
        self._log("merge")
        return super().merge(other)

    def carry_over(self, previous: Journal) -> None:
        self.carried = previous.first_pass_total
        self._log("carry_over", previous.checkpoint, previous.pass_index)

    def end_pass(self) -> None:
        self._log("end_pass")
        if self.pass_index == 0:
            self.first_pass_total, self.total = self.total, 0.0
        super().end_pass()

    def finalize(self) -> list[dict]:
        return [{"layer": "x", "tensor": "x", "metric": "total", "value": self.total}]


class Feeder:
    """Runs a driver task on batches of ones: checkpoint c's shard s holds `batches` batches starting at s·10."""

    def __init__(self, shards: int, analyses=("a",)):
        self.shards, self.analyses = shards, analyses

    def run(self, task: ShardTask) -> ShardOutcome:
        estimators = task.estimators
        if estimators is None:
            estimators = [(aid, Journal()) for aid in self.analyses]
            for _, estimator in estimators:
                estimator.checkpoint = task.checkpoint
        isolation = Isolation(f"c{task.checkpoint}")
        isolation.failures.update(task.failures)
        for start in (10 * task.shard, 10 * task.shard + 5):
            batch = TensorBatch({}, torch.full((5, 1), float(task.checkpoint + 1)), start=start)
            for aid, estimator in estimators:
                if estimator.passes > task.pass_index:
                    isolation.call(aid, estimator, "update", estimator.update, batch)
        return ShardOutcome(f"c{task.checkpoint}", estimators, isolation.failures, samples=10)


class InProcessParallel(SequentialExecutor):
    """Tasks side by side: every ready task (every checkpoint in flight) started at once, each on its own
    copy as a worker would get it."""

    parallel = True

    def run(self, queue):
        while queue:
            started = [queue.pop() for _ in range(len(queue))]
            yield from [(task, self.run_task(copied(task))) for task in started]


def drive_all(*args, **keywords) -> dict:
    """:func:`drive`, returning each checkpoint's final state by index, in the order they finished."""
    states: dict = {}
    drive(*args, finished=lambda index, state: states.__setitem__(index, state), **keywords)
    return states


def events(kind: str, checkpoint: int | None = None) -> list[tuple]:
    return [e for e in JOURNAL if e[0] == kind and (checkpoint is None or e[1] == checkpoint)]


@pytest.mark.parametrize("parallel", [False, True])
def test_the_driver_runs_every_pass_of_every_shard_then_merges_then_ends_the_pass(parallel):
    JOURNAL.clear()
    feeder = Feeder(shards=3)
    executor = InProcessParallel(feeder.run, 3) if parallel else SequentialExecutor(feeder.run, 3)
    states = drive_all(2, executor, Isolation)
    assert list(states) == [0, 1]
    for checkpoint in (0, 1):
        # each pass: 3 shards × 2 batches, then shards 1 and 2 merged into shard 0, then one end_pass
        for pass_index in (0, 1):
            updates = [e for e in events("update", checkpoint) if e[2] == pass_index]
            assert sorted(e[3] for e in updates) == [0, 5, 10, 15, 20, 25]
            end = JOURNAL.index(("end_pass", checkpoint, pass_index))
            assert all(JOURNAL.index(e) < end for e in updates)
        assert len(events("merge", checkpoint)) == 4 and len(events("end_pass", checkpoint)) == 2
        # sums are not counted once per shard: 30 samples of value c + 1, in each pass
        assert dict(states[checkpoint].estimators)["a"].total == 30 * (checkpoint + 1)
        assert dict(states[checkpoint].estimators)["a"].first_pass_total == 30 * (checkpoint + 1)
    # carry_over: once, to checkpoint 1, before its first end_pass, from a predecessor past its first pass
    (carry,) = events("carry_over")
    assert carry[1] == 1 and carry[3] == 0 and carry[4] >= 1
    assert JOURNAL.index(carry) < JOURNAL.index(("end_pass", 1, 0))
    assert dict(states[1].estimators)["a"].carried == 30
    first_update_of_1 = JOURNAL.index(events("update", 1)[0])
    if parallel:  # both checkpoints in flight: checkpoint 1 starts before checkpoint 0's second pass
        assert first_update_of_1 < JOURNAL.index(("end_pass", 0, 1))
    else:  # one by one: a checkpoint's model is needed for one stretch only
        assert first_update_of_1 > JOURNAL.index(("end_pass", 0, 1))


def test_checkpoints_run_one_by_one_are_released_once_their_successor_has_them():
    import gc
    import weakref

    alive = {}

    def finished(index, state):
        alive[index] = weakref.ref(dict(state.estimators)["a"])
        gc.collect()
        alive_now = [i for i, ref in alive.items() if ref() is not None]
        assert alive_now == [index], (index, alive_now)  # the predecessor went once carried over

    drive(4, SequentialExecutor(Feeder(shards=1).run), Isolation, finished=finished)
    assert len(alive) == 4


def test_a_failing_estimator_is_isolated_from_then_on_and_the_others_complete():
    JOURNAL.clear()
    feeder = Feeder(shards=2, analyses=("good", "bad"))
    original = feeder.run

    def run(task):
        outcome = original(task)
        if task.estimators is None:
            dict(outcome.estimators)["bad"].fail_in = "end_pass"  # fails once the first pass is merged
        return outcome

    states = drive_all(1, SequentialExecutor(run, 2), lambda label: Isolation(label, lambda est: "journal-plugin"))
    state = states[0]
    assert list(state.isolation.failures) == ["bad"]
    failure = state.isolation.failures["bad"]
    assert failure["phase"] == "end_pass" and failure["plugin"] == "journal-plugin"
    assert "end_pass broke" in failure["error"]
    good, bad = dict(state.estimators)["good"], dict(state.estimators)["bad"]
    assert good.total == 20 and good.pass_index == 2
    assert bad.pass_index == 0  # it broke in its first end_pass
    assert len([e for e in events("update") if e[2] == 1]) == 4  # the second pass fed only 'good' (2 shards × 2)


def test_user_errors_end_the_run_and_strict_isolation_lets_bugs_through():
    def broken(task):
        return ShardOutcome("c0", error="data.path: sample 3 contains NaN")

    with pytest.raises(UserError, match="sample 3 contains NaN"):
        drive(1, SequentialExecutor(broken), Isolation)
    journal = Journal()
    journal.fail_in = "end_pass"
    with pytest.raises(RuntimeError, match="end_pass broke"):
        drive(
            1,
            SequentialExecutor(lambda task: ShardOutcome("c0", [("a", journal)])),
            lambda label: Isolation(label, strict=True),
        )


def test_restored_checkpoints_are_skipped_and_handed_to_their_successor():
    JOURNAL.clear()
    saved = Journal()
    saved.first_pass_total, saved.checkpoint, saved.pass_index = 123.0, 0, 2
    feeder = Feeder(shards=1)
    states = drive_all(
        2, SequentialExecutor(feeder.run), Isolation, restored=lambda index: {"a": saved} if index == 0 else None
    )
    assert list(states) == [1] and not events("update", 0)
    assert dict(states[1].estimators)["a"].carried == 123.0


# --- the local engines on a real model --------------------------------------------------------------
@pytest.fixture(scope="module")
def single_process():
    return layerscope.run(EVERY_ESTIMATOR, write=False, progress=False)


@pytest.mark.slow
def test_worker_processes_with_data_shards_give_the_single_process_records(single_process, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # the local engine needs no Ray: importing it would fail
    parallel = layerscope.run({**EVERY_ESTIMATOR, "runtime": {"workers": 2, "shards": 3}}, write=False, progress=False)
    assert [m["label"] for m in parallel.models] == ["epoch_02", "epoch_10"]
    assert_records_close(parallel.records, single_process.records, rtol=0, atol=1e-9)


@pytest.mark.slow
def test_the_order_in_which_the_driver_merges_shards_does_not_change_records(single_process):
    """Shards of both checkpoints run in this process, as copies; the driver merges them in every order."""
    from layerscope.api import prepare
    from layerscope.engine.checkpoint_run import ShardWorker
    from layerscope.engine.outcomes import finish_checkpoint

    plan = prepare(EVERY_ESTIMATOR)
    checkpoints = plan.checkpoints()
    spans = shard_spans(len(plan.order), plan.spec.data.batch_size, 3)
    worker = ShardWorker(plan, checkpoints, spans, plan.order, plan.example())
    for permutation in [(0, 1, 2), (2, 0, 1), (1, 2, 0)]:

        class Permuted:
            """Runs every ready task, then hands back each checkpoint's shards in the order *permutation*."""

            parallel, shards = True, 3

            def run(self, queue, permutation=permutation):
                while queue:
                    started = [queue.pop() for _ in range(len(queue))]  # whole passes, in shard order
                    done = [(task, worker.run(pickle.loads(pickle.dumps(task)))) for task in started]
                    yield from [done[3 * (i // 3) + permutation[i % 3]] for i in range(len(done))]

        states = drive_all(len(checkpoints), Permuted(), lambda label: Isolation(label, plan.host.origin_of))
        records = [
            r for index in sorted(states) for r in finish_checkpoint(plan, states[index], checkpoints[index]).records
        ]
        assert_records_close(records, single_process.records, rtol=0, atol=1e-9)


class Workers(SequentialExecutor):
    """*slots* workers: a free worker takes the most urgent ready task; the task started first ends first.
    Writes ("start", checkpoint, pass) into *log* as a task starts."""

    parallel = True

    def __init__(self, run_task, slots: int, log: list):
        super().__init__(run_task)
        self.slots, self.log = slots, log

    def run(self, queue):
        started: list = []
        while queue or started:
            while queue and len(started) < self.slots:
                task = queue.pop()
                self.log.append(("start", task.checkpoint, task.pass_index))
                started.append(task)
            task = started.pop(0)
            yield task, self.run_task(copied(task))


def test_a_parallel_run_hands_over_each_checkpoint_as_it_ends_not_all_at_the_end():
    """Ten checkpoints of two passes on two workers: checkpoint 0 is finished (saved for --resume) before the
    last checkpoint has started, and each checkpoint is finished in training order."""
    log: list = []
    drive(
        10, Workers(Feeder(shards=1).run, 2, log), Isolation, finished=lambda index, state: log.append(("saved", index))
    )
    assert [entry[1] for entry in log if entry[0] == "saved"] == list(range(10))
    assert log.index(("saved", 0)) < log.index(("start", 9, 0))


class Shards(Estimator):
    """Lists the shards merged into it, in the order merged (a merge that is associative but not commutative)."""

    name = "shards"

    def update(self, batch: TensorBatch) -> None:
        pass

    def merge(self, other: Shards) -> Shards:
        self.seen += other.seen
        return self

    def finalize(self) -> list[dict]:
        return []


def _shard(index: int) -> ShardOutcome:
    estimator = Shards()
    estimator.seen = [index]
    return ShardOutcome("c0", [("s", estimator)], warnings=[f"w{index}"], samples=10)


@pytest.mark.parametrize("order", list(itertools.permutations(range(5))))
def test_shards_merged_as_they_arrive_equal_shards_merged_in_order(order):
    """Whatever order the shards of a pass arrive in, every merge joins a stretch of samples with the one right
    after it: the whole equals the in-order merge, and it is handed back once, when the last shard arrives."""
    merge = ShardMerge(5, 0, Isolation("c0"))
    handed = [merge.add(shard, _shard(shard)) for shard in order]
    assert handed[:-1] == [None] * 4 and merge.held == 0
    whole = handed[-1]
    assert whole.estimators[0][1].seen == [0, 1, 2, 3, 4]
    assert whole.warnings == [f"w{i}" for i in range(5)] and whole.samples == 50


@pytest.mark.parametrize(
    ("order", "most_held"),
    [(range(16), 1), (reversed(range(16)), 1), ([*range(0, 16, 2), *range(1, 16, 2)], 8)],
)
def test_the_driver_holds_only_shards_whose_neighbours_are_still_out(order, most_held):
    """Shards arriving in order (or in reverse) are held as one run; every other shard first, half of them."""
    merge = ShardMerge(16, 0, Isolation("c0"))
    held = []
    for shard in order:
        merge.add(shard, _shard(shard))
        held.append(merge.held)
    assert max(held) == most_held and held[-1] == 0


def test_shard_spans_cover_the_stream_in_whole_batches():
    for samples, batch, shards in itertools.product([1, 99, 100, 101, 1000, 1347], [1, 7, 100], [1, 2, 3, 8]):
        spans = shard_spans(samples, batch, shards)
        assert spans[0][0] == 0 and spans[-1][1] == samples
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(first % batch == 0 for first, _ in spans)
        sizes = [-(-(stop - first) // batch) for first, stop in spans]
        assert len(spans) == min(shards, -(-samples // batch)) and max(sizes) - min(sizes) <= 1


def test_a_shard_reads_the_look_ahead_past_its_end():
    from layerscope.plugins.data.synthetic import SyntheticSource

    source = SyntheticSource(SyntheticSource.Params(samples=10, shape=[2], classes=2), base_dir=None)
    order = np.arange(10)
    (first, *_), whole = shard_spans(10, 3, 2), list(iter_batches(source, order, 3, lookahead=2))
    shard = list(iter_batches(source, order, 3, lookahead=2, span=(0, 6)))
    assert [start for start, _, _ in shard] == [0, 3] and first == (0, 6)
    assert np.array_equal(shard[1][1], whole[1][1]) and len(shard[1][1]) == 5  # 3 samples + 2 of the next shard


def test_runtime_errors_name_the_key(monkeypatch):
    base = {"model": {"source": "demo:digits-mlp"}, "analyses": [{"id": "e", "estimator": "activation_entropy"}]}
    with pytest.raises(SpecError, match="runtime.address: address is only used with engine: ray"):
        layerscope.validate({**base, "runtime": {"address": "auto"}}, with_model=False)
    with pytest.raises(SpecError, match="runtime.shards"):
        layerscope.validate({**base, "runtime": {"shards": 0}}, with_model=False)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(SpecError, match=r'runtime.engine: the ray engine needs Ray: pip install "layerscope\[ray\]"'):
        layerscope.validate({**base, "runtime": {"engine": "ray"}}, with_model=False)


def test_auto_shards_keep_one_small_checkpoint_in_this_process(monkeypatch):
    """`workers: 2` on one small checkpoint ran 2.4–3.3× slower than one process (each worker re-imports and
    re-prepares the model): with `shards: auto` the run stays in this process unless the forward passes,
    estimated from the graph's multiply-accumulates, outlast the workers' start; the records are the same."""
    from layerscope.engine import process_pool

    pools = []
    real_pool = process_pool.process_pool
    monkeypatch.setattr(process_pool, "process_pool", lambda *args: pools.append(1) or real_pool(*args))
    spec = {
        "model": {"source": "demo:digits-cnn"},
        "data": {"source": "digits", "limit": 200},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
    }
    alone = layerscope.run(spec, write=False, progress=False)
    auto = layerscope.run({**spec, "runtime": {"workers": 2}}, write=False, progress=False)
    assert not pools and auto.records == alone.records
    assert any("runtime.workers: 2 left unused" in w for w in auto.warnings)
    monkeypatch.setattr("layerscope.engine.execute.WORKER_START_SECONDS", 0.0)  # as if the work were large
    spread = layerscope.run({**spec, "runtime": {"workers": 2}}, write=False, progress=False)
    assert pools and not any("left unused" in w for w in spread.warnings)
    assert_records_close(spread.records, alone.records)


def test_more_shards_than_batches_say_how_many_ran():
    """`shards: 100000` on a run of 2 batches was accepted without a word."""
    spec = {
        "model": {"source": "demo:digits-mlp"},
        "data": {"source": "digits", "limit": 200},
        "analyses": [{"id": "e", "estimator": "activation_entropy"}],
    }
    alone = layerscope.run(spec, write=False, progress=False)
    many = layerscope.run({**spec, "runtime": {"workers": 2, "shards": 100000}}, write=False, progress=False)
    assert_records_close(many.records, alone.records)
    expected = "runtime.shards is 100000 but the data has 2 batch(es) of 100 samples; a shard holds whole batches"
    assert any(w.startswith(expected) and w.endswith("so 2 shard(s) ran") for w in many.warnings), many.warnings


def test_the_cost_estimate_counts_the_dense_ops_of_a_real_network():
    """ResNet-18 at 224 × 224 is 1.81 GMAC per image (the published figure): the estimate the auto rule uses."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "benchmarks"))
    from architectures import build

    from layerscope.adapters.torch_export import export_to_onnx
    from layerscope.graph.cost import macs_per_sample
    from layerscope.graph.tensors import describe_tensors

    proto = export_to_onnx(build("resnet18"), np.zeros((2, 3, 224, 224), np.float32))
    assert macs_per_sample(proto, describe_tensors(proto)) == pytest.approx(1.814e9, rel=0.01)
