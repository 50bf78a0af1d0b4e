"""``runtime.engine: ray``: the shard tasks of a run (:mod:`layerscope.engine.lifecycle`) run by Ray actors.

Each actor holds a :class:`~layerscope.engine.checkpoint_run.ShardWorker` and claims ``threads`` CPUs
of the cluster (and its share of the cluster's GPUs unless ``device: cpu``); Ray's
``ActorPool`` hands the (checkpoint × shard) tasks of a pass to idle actors, and the
driver merges what they return. ``runtime.address`` joins an existing
cluster (its nodes need layerscope and the plugins installed, and the spec's model and
data paths readable at the same place); without it a local cluster is started for the run
and stopped after it. A process that already called ``ray.init`` keeps its cluster.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from layerscope.data.source import Samples
from layerscope.model.adapter import Checkpoint
from layerscope.util.errors import UserError

from .lifecycle import ShardOutcome, ShardTask
from .plan import RunPlan
from .process_pool import run_spans, start_worker, worker_arguments


class _ShardActor:
    """A Ray actor holding a :class:`~layerscope.engine.checkpoint_run.ShardWorker` rebuilt from the spec document."""

    def __init__(self, *arguments):
        self.worker = start_worker(*arguments)

    def run(self, task: ShardTask) -> ShardOutcome:
        return self.worker.run(task)


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
    except (ConnectionError, RuntimeError, ValueError) as error:
        hint = (
            "; a cluster with token authentication (Ray's default) also needs RAY_AUTH_MODE=token and its "
            "token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
            if "RAY_AUTH_MODE" not in os.environ
            else ""
        )
        raise UserError(
            f"{plan.where('runtime', 'address')}: cannot join the Ray cluster at '{runtime.address}': {error}{hint}"
        ) from None
    finally:
        ray_logger.setLevel(level)
    return True


def _gpu_share(plan: RunPlan, gpus: float, workers: int) -> float:
    """GPUs each actor claims of the cluster's *gpus*: Ray hides the GPUs from actors that claim
    none, so with ``device: auto`` or ``cuda`` they are shared out among the actors (fractions
    of one GPU when there are more actors than GPUs)."""
    device = plan.spec.runtime.device
    if device == "cuda" and not gpus:
        raise UserError(f"{plan.where('runtime', 'device')}: cuda was requested but the Ray cluster has no GPUs")
    if device == "cpu" or not gpus:
        return 0
    share = gpus / workers
    return math.floor(share) if share >= 1 else math.floor(share * 1000) / 1000


class RayExecutor:
    """Runs tasks on Ray actors, each task on the next idle actor."""

    parallel = True

    def __init__(self, actors: list, shards: int):
        from ray.util import ActorPool

        self.pool, self.shards = ActorPool(actors), shards

    def run(self, tasks: list[ShardTask]) -> list[ShardOutcome]:
        return list(self.pool.map(lambda actor, task: actor.run.remote(task), tasks))


@contextmanager
def ray_actors(
    plan: RunPlan, checkpoints: list[Checkpoint], example: Samples, warnings: list[str]
) -> Iterator[RayExecutor]:
    """An executor of ``runtime.workers`` actors (the cluster's CPUs when omitted), on a cluster
    joined or started for the run (see module docstring)."""
    import ray

    started = _connect(plan)
    actors = []
    try:
        runtime = plan.spec.runtime
        resources = ray.cluster_resources()
        cpus = max(1, int(resources.get("CPU", 1)))
        workers = runtime.workers if "workers" in runtime.model_fields_set else cpus
        if workers > cpus:
            warnings.append(
                f"runtime.workers is {workers} but the Ray cluster has {cpus} CPUs; {cpus} actors ran the tasks"
            )
            workers = cpus
        threads = max(1, cpus // workers)
        actor_class = ray.remote(num_cpus=threads, num_gpus=_gpu_share(plan, resources.get("GPU", 0), workers))(
            _ShardActor
        )
        spans = run_spans(plan, workers, len(checkpoints))
        arguments = worker_arguments(plan, checkpoints, spans, plan.order, example, threads)
        actors = [actor_class.remote(*arguments) for _ in range(workers)]
        yield RayExecutor(actors, len(spans))
    finally:
        for actor in actors:
            ray.kill(actor)  # type: ignore[arg-type]  # ray types an actor as ActorHandle | its class; kill takes it
        if started:
            ray.shutdown()
