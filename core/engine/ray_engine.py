"""``runtime.engine: ray``: the shard tasks of a run (:mod:`layerscope.engine.lifecycle`) run by Ray actors.

**Placement.** By default one actor per node of the cluster, claiming all of the node's CPUs
(onnxruntime runs the model on that many threads), or, on a node with GPUs and ``device: auto``
or ``cuda``, one actor per GPU with an equal share of the node's CPUs: a node holds the model
once, however many cores it has. ``runtime.workers: N`` asks for N actors instead, each with an
equal share of the cluster's CPUs (and GPUs), placed where Ray finds room. Each actor holds a
:class:`~layerscope.engine.checkpoint_run.ShardWorker` and runs up to two tasks at a time (one
queued behind the other, so it never waits for the driver); the estimators a pass starts from
are put into the object store once for all its shards.

**Lost workers.** An actor that dies (its process killed, its node lost) is replaced by a new
one wherever the cluster has room, and the tasks it held run again on the actors there are; a
task runs at most ``1 + runtime.retries`` times. The run ends with an
:class:`~layerscope.util.errors.InfrastructureError` naming the failure when a task was lost more
often, when no actor is left and none could start for :data:`STARVED_SECONDS`, or when the
cluster's head stops accepting connections for :data:`HEAD_GRACE_SECONDS` (Ray would end the
process a minute later without a word).

**Files.** ``runtime.address`` joins an existing cluster (its nodes need layerscope and the
plugins installed); without it a local cluster is started for the run and stopped after it, also
when the run fails. A process that already called ``ray.init`` keeps its cluster. Workers read the
spec's files at the same paths as the driver, and a worker that lacks one fails naming it; with
``runtime.ship`` the files travel through the object store (:mod:`layerscope.engine.inputs`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from layerscope.data.source import Samples
from layerscope.model.adapter import Checkpoint
from layerscope.util.errors import InfrastructureError, UserError, first_line

from .inputs import NamedFile, Relocation, Shipment, check_present, named_files
from .lifecycle import ShardOutcome, ShardTask, TaskQueue
from .plan import RunPlan
from .process_pool import run_spans, start_worker, worker_arguments

#: Seconds the cluster's head may refuse connections before the run ends (Ray ends a driver after 60).
HEAD_GRACE_SECONDS = 5.0
#: Seconds a run may have no actor at all (every one lost, none started in its place) before it ends.
STARVED_SECONDS = 60.0
#: Tasks an actor holds at once: one running, one queued behind it.
TASKS_PER_ACTOR = 2


class _ShardActor:
    """A Ray actor holding a :class:`~layerscope.engine.checkpoint_run.ShardWorker` rebuilt from the spec document
    (from the shipped copies of the run's files, with ``runtime.ship``). What stops it from starting is kept
    and reported by :meth:`ready`: a Ray actor whose constructor raises only reports that it died."""

    def __init__(self, arguments: tuple, files: list[NamedFile], shipment: Shipment | None):
        import ray

        self.node = ray.util.get_node_ip_address()
        self.relocation: Relocation | None = None
        self.error: str | None = None  # a user error: a missing file, a plugin missing on this node
        self.failure: str | None = None  # anything else: a bug
        try:
            if shipment is not None:
                self.relocation = shipment.unpack()
                arguments = self.relocation.arguments(arguments)
            check_present(files, self.node, self.relocation)
            self.worker = start_worker(*arguments)
        except UserError as error:
            self.error = self.relocation.strip(str(error)) if self.relocation else str(error)
        except Exception:  # reported to the driver, which ends the run as an internal error
            self.failure = traceback.format_exc()

    def ready(self) -> tuple[str, str | None, str | None]:
        """(this node's address, the user error that stopped the worker, the traceback of a bug that did)."""
        return self.node, self.error, self.failure

    def run(self, task: ShardTask, estimators) -> ShardOutcome:
        """Run *task*, starting from *estimators* (a pass after the first; the object store's copy)."""
        if estimators is not None:
            task.estimators = estimators
        outcome = self.worker.run(task)
        return self.relocation.restore(outcome) if self.relocation else outcome


@dataclass(frozen=True)
class Placement:
    """What an actor claims: CPUs (its onnxruntime threads), GPUs, and the node it must run on (None: anywhere)."""

    cpus: int
    gpus: float = 0
    node: str | None = None


def _check_reachable(plan: RunPlan, address: str) -> None:
    """Fail fast when ``host:port`` (or ``ray://host:port``) does not accept connections (Ray
    itself keeps retrying for minutes); ``auto`` and other forms are left to Ray."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserError(
            f"{plan.where('runtime', 'address')}: cannot join the Ray cluster at '{address}': {error.strerror or error}"
        ) from None


def _connect(plan: RunPlan) -> bool:
    """Start or join the cluster; True when this run started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    runtime = plan.spec.runtime
    if runtime.address:
        _check_reachable(plan, runtime.address)
    local: dict[str, Any] = {"num_cpus": runtime.workers if "workers" in runtime.model_fields_set else None}
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    ray_logger.setLevel(logging.ERROR)  # start-up notices would garble the run's output
    try:
        ray.init(
            address=runtime.address or "local",
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            **({} if runtime.address else local),
        )
    except Exception as error:  # Ray raises bare Exceptions too ("the current node timed out during startup")
        if not runtime.address:
            ray.shutdown()  # the processes it started before it failed
            raise InfrastructureError(
                f"runtime.engine: could not start a local Ray cluster for the run: {first_line(error).rstrip('.')}"
            ) from None
        if not isinstance(error, (ConnectionError, RuntimeError, ValueError)):
            raise InfrastructureError(
                f"runtime.address: lost the Ray cluster at '{runtime.address}' while joining it: {error}"
            ) from None
        hint = (
            "; a cluster with token authentication (Ray's default) also needs RAY_AUTH_MODE=token and its "
            "token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
            if "RAY_AUTH_MODE" not in os.environ
            else "; check that RAY_AUTH_TOKEN (or ~/.ray/auth_token) holds the cluster's token"
        )
        raise UserError(
            f"{plan.where('runtime', 'address')}: cannot join the Ray cluster at '{runtime.address}': {error}{hint}"
        ) from None
    except BaseException:  # an interrupt while the local cluster starts: stop what started
        if not runtime.address:
            ray.shutdown()
        raise
    finally:
        ray_logger.setLevel(level)
    return True


def _gpu_share(plan: RunPlan, gpus: float, workers: int) -> float:
    """GPUs each of *workers* actors claims of the cluster's *gpus* (fractions of one GPU when there are
    more actors than GPUs): Ray hides the GPUs from actors that claim none."""
    if plan.spec.runtime.device == "cpu" or not gpus:
        return 0
    share = gpus / workers
    return math.floor(share) if share >= 1 else math.floor(share * 1000) / 1000


def placements(plan: RunPlan, nodes: list[dict], warnings: list[str]) -> list[Placement]:
    """The actors of a run on a cluster of *nodes* (``ray.nodes()``): one per node or per GPU, or
    ``runtime.workers`` of them (module docstring)."""
    runtime = plan.spec.runtime
    alive = [node for node in nodes if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= 1]
    gpus = sum(node["Resources"].get("GPU", 0) for node in alive)
    if runtime.device == "cuda" and not gpus:
        raise UserError(f"{plan.where('runtime', 'device')}: cuda was requested but the Ray cluster has no GPUs")
    if "workers" in runtime.model_fields_set:
        cpus = max(1, int(sum(node["Resources"]["CPU"] for node in alive)))
        workers = runtime.workers
        if workers > cpus:
            warnings.append(
                f"runtime.workers is {workers} but the Ray cluster has {cpus} CPUs; {cpus} actors ran the tasks"
            )
            workers = cpus
        return [Placement(cpus // workers, _gpu_share(plan, gpus, workers))] * workers
    chosen = []
    for node in alive:
        cpus, node_gpus = int(node["Resources"]["CPU"]), int(node["Resources"].get("GPU", 0))
        if node_gpus and runtime.device != "cpu":
            chosen += [Placement(max(1, cpus // node_gpus), 1, node["NodeID"])] * node_gpus
        else:
            chosen.append(Placement(cpus, 0, node["NodeID"]))
    return chosen


def _summary(error: BaseException) -> str:
    """A lost worker's Ray error in one line: its type and the line that says why."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    why = next((line for line in lines if "because" in line), lines[0] if lines else "")
    why = why.split(". ")[0].rstrip(".")  # its first sentence
    return f"{type(error).__name__}: {why}" if why else type(error).__name__


class _HeadWatch:
    """Notices that the cluster's head (its GCS, at ``host:port``) is gone: it refuses connections for
    :data:`HEAD_GRACE_SECONDS`."""

    def __init__(self, address: str | None):
        self.address = address or ""
        host, _, port = self.address.rpartition(":")
        self.host, self.port = host, int(port) if port.isdigit() else None
        self.last_check, self.refused_since = 0.0, 0.0  # refused since: 0 while it accepts

    @property
    def refusing(self) -> bool:
        """Whether the head refused the last connection tried."""
        return bool(self.refused_since)

    def check(self, *, now_or_never: bool = False) -> None:
        """Try to connect to the head (at most once a second, unless *now_or_never*); raise an
        :class:`InfrastructureError` once it has refused connections for :data:`HEAD_GRACE_SECONDS`."""
        now = time.monotonic()
        if self.port is None or (now - self.last_check < 1 and not now_or_never):  # no address: Ray Client
            return
        self.last_check = now
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
            self.refused_since = 0.0
        except OSError as error:
            self.refused_since = self.refused_since or now
            if now - self.refused_since >= HEAD_GRACE_SECONDS:
                raise InfrastructureError(
                    f"runtime.engine: lost the Ray cluster: its head at {self.address} has not accepted a "
                    f"connection for {HEAD_GRACE_SECONDS:g} s ({error.strerror or error})"
                ) from None

    def wait_while_refused(self) -> None:
        """Return once the head accepts connections; raise as :meth:`check` when it does not come back. Called
        before the run asks the head for anything (a new actor, killing one): with the head gone, Ray blocks
        such a call for a minute and then ends the process."""
        self.check(now_or_never=True)
        while self.refusing:
            time.sleep(0.25)
            self.check(now_or_never=True)


@dataclass(eq=False)
class _Actor:
    handle: Any
    placement: Placement
    node: str = ""  # its node's address, once it has started
    tasks: list = field(default_factory=list)  # the object references of the tasks it holds


class RayExecutor:
    """Runs tasks on Ray actors, each task on the next actor with room (see the module docstring)."""

    parallel = True

    def __init__(self, spawn, wanted: list[Placement], shards: int, retries: int, labels: list[str], warnings):
        import ray

        self.spawn, self.shards, self.retries, self.labels, self.warnings = spawn, shards, retries, labels, warnings
        self.head = _HeadWatch(getattr(ray.get_runtime_context(), "gcs_address", None))
        self.starting: dict[Any, _Actor] = {}  # by the reference of its ready() call
        self.actors: list[_Actor] = []  # started
        self.running: dict[Any, tuple[ShardTask, _Actor]] = {}  # by the reference of the task's result
        self.payloads: dict[tuple[int, int], tuple[Any, int]] = {}  # (checkpoint, pass) → (estimators, tasks left)
        self.lost: Counter[tuple[int, int, int]] = Counter()  # times each task's worker was lost, by task key
        self.starts_left = len(wanted) * (retries + 1)  # actors that may still be started (replacements too)
        self.starved_since: float | None = None
        self.last_loss = "no worker was lost"
        self.lost_one = False  # an actor was lost: from then on, a run without actors is starved
        for placement in wanted:
            self._start(placement)

    def _start(self, placement: Placement) -> None:
        self.starts_left -= 1
        actor = _Actor(self.spawn(placement), placement)
        self.starting[actor.handle.ready.remote()] = actor

    def run(self, queue: TaskQueue) -> Iterator[tuple[ShardTask, ShardOutcome]]:
        import ray

        while queue or self.running:
            self._dispatch(queue)
            waiting = [*self.running, *self.starting]
            if not waiting:
                raise InfrastructureError(
                    f"runtime.engine: every Ray worker was lost and no other could be started ({self.last_loss})"
                )
            done, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            self.head.check()
            self._check_starved()
            for ref in done:
                if ref in self.starting:
                    self._started(ref, self.starting.pop(ref), queue)
                    continue
                task, actor = self.running.pop(ref)
                actor.tasks.remove(ref)
                try:
                    outcome = ray.get(ref)
                except lost_worker_errors() as error:
                    self._lost(actor, error, [task], queue)
                    continue
                self._done(task)
                yield task, outcome

    def _dispatch(self, queue: TaskQueue) -> None:
        """Hand queued tasks to the started actors, the least busy first."""
        for holding in range(TASKS_PER_ACTOR):
            for actor in self.actors:
                if queue and len(actor.tasks) == holding:
                    task = queue.pop()
                    ref = actor.handle.run.remote(*self._payload(task))
                    actor.tasks.append(ref)
                    self.running[ref] = (task, actor)

    def _payload(self, task: ShardTask) -> tuple[ShardTask, Any]:
        """(*task* without its estimators, a reference to them in the object store, put once per pass)."""
        import ray

        if task.estimators is None:
            return task, None
        key = task.checkpoint, task.pass_index
        if key not in self.payloads:
            self.payloads[key] = (ray.put(task.estimators), self.shards)
        return replace(task, estimators=None), self.payloads[key][0]

    def _done(self, task: ShardTask) -> None:
        """Let go of a pass's estimators in the object store once all its tasks have finished."""
        key = task.checkpoint, task.pass_index
        if key in self.payloads:
            reference, left = self.payloads[key]
            self.payloads[key] = (reference, left - 1)
            if left == 1:
                del self.payloads[key]

    def _started(self, ref, actor: _Actor, queue: TaskQueue) -> None:
        """An actor's ready() answered: it joins the pool, or its start failed (a user error ends the run)."""
        import ray

        try:
            actor.node, error, failure = ray.get(ref)
        except lost_worker_errors() as lost:  # it died while starting (its node lost): start another
            self._lost(actor, lost, [], queue)
            return
        if error is not None:
            raise UserError(error)
        if failure is not None:
            raise RuntimeError(f"a Ray worker on node {actor.node} could not start:\n{failure}")
        self.actors.append(actor)
        self.starved_since = None

    def _lost(self, actor: _Actor, error: BaseException, lost: list[ShardTask], queue: TaskQueue) -> None:
        """Replace a dead actor and queue the tasks it held again (each at most ``runtime.retries`` times)."""
        import ray

        self.head.wait_while_refused()  # a lost head loses every worker: name it, not them
        if actor in self.actors:
            self.actors.remove(actor)
        for ref in actor.tasks:
            lost.append(self.running.pop(ref)[0])
        actor.tasks.clear()
        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception:  # already gone with its node: nothing to stop
            pass
        where = f" on node {actor.node}" if actor.node else ""
        self.warnings.append(
            f"a Ray worker{where} was lost ({_summary(error)}); "
            + (f"its {len(lost)} task(s) ran again on other workers" if lost else "another was started")
        )
        self.last_loss = f"last: worker{where}, {_summary(error)}"
        self.lost_one = True
        queue.requeue_lost(
            lost,
            self.lost,
            self.retries,
            lambda task, times: (
                f"runtime.engine: the Ray workers running pass {task.pass_index + 1} of data shard "
                f"{task.shard + 1} of checkpoint {self.labels[task.checkpoint]} were lost "
                f"{times} (runtime.retries: {self.retries}; {self.last_loss})"
            ),
        )
        if self.starts_left > 0:
            self._start(replace(actor.placement, node=None))  # its node may be gone: anywhere with room

    def _check_starved(self) -> None:
        """End the run when, once it has lost an actor, it has had no started actor for :data:`STARVED_SECONDS`.
        The first actors are waited for however long they take (Ray keeps them pending until there is room,
        and on a busy machine starting one takes minutes)."""
        if self.actors or not self.starting or not self.lost_one:
            self.starved_since = None
            return
        self.starved_since = self.starved_since or time.monotonic()
        if time.monotonic() - self.starved_since >= STARVED_SECONDS:
            raise InfrastructureError(
                f"runtime.engine: no Ray worker could start for {STARVED_SECONDS:g} s after the last was lost: the "
                f"cluster has no room for one ({self.last_loss})"
            )

    def stop(self) -> None:
        """Kill every actor the run started (gone with the cluster when its head is gone)."""
        import ray

        if self.head.refusing:
            return
        for actor in [*self.actors, *self.starting.values()]:
            try:
                ray.kill(actor.handle, no_restart=True)
            except Exception:  # gone already
                pass


@cache
def lost_worker_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a worker that is gone (its process or node), as opposed to an error in the task's code."""
    from ray import exceptions

    return (
        exceptions.RayActorError,
        exceptions.WorkerCrashedError,
        exceptions.NodeDiedError,
        exceptions.ObjectLostError,
        exceptions.LocalRayletDiedError,
        exceptions.OutOfMemoryError,
    )


@contextmanager
def ray_actors(
    plan: RunPlan, checkpoints: list[Checkpoint], example: Samples, warnings: list[str]
) -> Iterator[RayExecutor]:
    """An executor of actors placed on a cluster joined or started for the run (module docstring)."""
    import ray

    started = _connect(plan)
    executor = None
    try:
        runtime = plan.spec.runtime
        wanted = placements(plan, ray.nodes(), warnings)
        spans = run_spans(plan, len(wanted), len(checkpoints), warnings)
        files = named_files(plan, checkpoints)
        shipment = ray.put(Shipment.pack(files)) if runtime.ship else None
        arguments: dict[int, Any] = {}  # the worker arguments in the object store, by threads
        actor_class = ray.remote(_ShardActor)

        def spawn(placement: Placement):
            if placement.cpus not in arguments:
                arguments[placement.cpus] = ray.put(
                    worker_arguments(plan, checkpoints, spans, plan.order, example, placement.cpus)
                )
            options: dict[str, Any] = {"num_cpus": placement.cpus, "num_gpus": placement.gpus}
            if placement.node is not None:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(placement.node, soft=False)
            return actor_class.options(**options).remote(arguments[placement.cpus], files, shipment)

        executor = RayExecutor(spawn, wanted, len(spans), runtime.retries, [c.label for c in checkpoints], warnings)
        yield executor
    finally:
        if executor is not None:
            executor.stop()
        if started:
            ray.shutdown()
