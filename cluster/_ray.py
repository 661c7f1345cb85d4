"""The node's connection to its Ray cluster: joining it, its workers and their resources, placing tasks.

The node is the cluster's driver. It joins at start (``[cluster] address``, or ``"local"`` to start a
one-machine instance), waits a bounded time for a worker, then reads the cluster's nodes every
``refresh_seconds`` in the background: each worker's CPUs, memory, GPUs, name (``hearth-worker:<name>``)
and models (``hearth-model:<cid>``). Ray is imported here only: a node without ``[cluster]`` never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cluster import _task
from cluster.names import MODEL_PREFIX, WORKER_PREFIX
from core.config import ClusterSection
from core.errors import ConfigError, ExecutionError, HearthError
from provider.capacity import MachineInfo, Resources
from sandbox.runner import RunSpec

log = logging.getLogger("hearth.cluster")

MIB = 1024 * 1024
ASK_TIMEOUT_SECONDS = 60.0
# A run's items wait in Ray's object store until the head takes them; a slow head holds the worker back.
GENERATOR_BACKPRESSURE_ITEMS = 16


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One machine of the cluster, as Ray reports it and as this node has used it."""

    node_id: str
    name: str
    address: str
    alive: bool
    cpus: float
    memory_mb: int
    gpus: int
    models: tuple[str, ...]
    running: int
    lost: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "name": self.name,
            "address": self.address,
            "alive": self.alive,
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "gpus": self.gpus,
            "models": list(self.models),
            "running": self.running,
            "lost": self.lost,
        }


class RayCluster:
    """This node's Ray cluster (see the module)."""

    def __init__(self, section: ClusterSection) -> None:
        self._section = section
        self._ray: Any = None
        self._remote_run: Any = None
        self._questions: dict[str, Any] = {}  # clean / image_id of cluster._task, as Ray remote functions
        self._nodes: list[dict[str, Any]] = []
        self._running: Counter[str] = Counter()
        self._lost: Counter[str] = Counter()
        self._seen: dict[str, dict[str, float]] = {}  # each node's resources when last seen alive
        self._refresher: asyncio.Task[None] | None = None

    # -- lifetime -------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Join the cluster and wait (up to ``connect_timeout_seconds``) for a live worker."""
        # Ray's own crash handler would take SIGTERM from the node, which drains on it (node.server).
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        import ray  # heavy: loaded only by a node with [cluster]

        self._ray = ray
        section = self._section
        kwargs: dict[str, Any] = {
            "namespace": "hearth",
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "configure_logging": False,
            "ignore_reinit_error": True,
        }
        if section.address == "local":
            from cluster.worker import WorkerHome

            # this machine is the one worker: its name and models as `hearth worker join` would give them
            kwargs |= {"include_dashboard": False, "resources": WorkerHome.load().resources()}
        else:
            kwargs["address"] = section.address
        try:
            async with asyncio.timeout(section.connect_timeout_seconds):
                await asyncio.to_thread(ray.init, **kwargs)
        except (TimeoutError, ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(
                "cluster_unreachable",
                f"cannot join the Ray cluster at {section.address}: {exc}",
                details={"address": section.address},
            ) from None
        self._remote_run = ray.remote(max_retries=0)(_task.run)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + section.connect_timeout_seconds
        while True:
            await self.refresh()
            if any(w.alive for w in self.workers()) or loop.time() >= deadline:
                break
            await asyncio.sleep(0.5)
        if not any(w.alive for w in self.workers()):
            log.warning("the Ray cluster at %s has no worker yet: nothing can run", section.address)
        self._refresher = asyncio.create_task(self._refresh_forever(), name="hearth-cluster-refresh")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._ray is not None:
            await asyncio.to_thread(self._ray.shutdown)
            self._ray = None

    # -- what it has ----------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._section.address

    @property
    def placement_timeout(self) -> float:
        return self._section.placement_timeout_seconds

    @property
    def lost_total(self) -> int:
        return sum(self._lost.values())

    async def refresh(self) -> None:
        """Read the cluster's nodes again."""
        ray = self._ray
        if ray is not None:
            self._nodes = await asyncio.to_thread(ray.nodes)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._section.refresh_seconds)
            try:
                await self.refresh()
            except Exception as exc:  # the GCS away for a moment: keep the last view, try again
                log.warning("reading the cluster's nodes failed: %s", exc)

    def workers(self) -> list[WorkerInfo]:
        """Every node that offers CPUs or GPUs (a head started with none is not a worker), by name."""
        found = []
        for node in self._nodes:
            resources: Mapping[str, float] = node.get("Resources") or {}
            node_id = str(node.get("NodeID", ""))
            if node.get("Alive") and resources:
                self._seen[node_id] = dict(resources)
            else:  # Ray lists a dead node without its resources: show what it had
                resources = self._seen.get(node_id, resources)
            cpus, gpus = float(resources.get("CPU", 0.0)), int(resources.get("GPU", 0.0))
            if cpus <= 0 and gpus <= 0:
                continue
            address = str(node.get("NodeManagerAddress", ""))
            names = [k[len(WORKER_PREFIX) :] for k in resources if k.startswith(WORKER_PREFIX)]
            found.append(
                WorkerInfo(
                    node_id=node_id,
                    name=names[0] if names else f"{address}/{node_id[:8]}",
                    address=address,
                    alive=bool(node.get("Alive")),
                    cpus=cpus,
                    memory_mb=int(float(resources.get("memory", 0.0)) // MIB),
                    gpus=gpus,
                    models=tuple(
                        sorted(k[len(MODEL_PREFIX) :] for k in resources if k.startswith(MODEL_PREFIX))
                    ),
                    running=self._running[node_id],
                    lost=self._lost[node_id],
                )
            )
        return sorted(found, key=lambda w: (not w.alive, w.name))

    def machine(self, head: MachineInfo) -> MachineInfo:
        """What the node sells: the live workers' resources summed (the head's own disk kept), each worker
        listed with its CPUs, memory, GPUs and models."""
        alive = [w for w in self.workers() if w.alive]
        cpus = sum(w.cpus for w in alive)
        memory = sum(w.memory_mb for w in alive)
        gpus = sum(w.gpus for w in alive)
        return MachineInfo(
            cpu_count=int(cpus),
            memory_total_mb=memory,
            memory_available_mb=memory,
            disk=head.disk,
            gpus=(),
            driver_version=None,
            cuda_version=None,
            offered=Resources(cpus=cpus, memory_mb=memory, gpus=gpus),
            workers=tuple(
                {
                    "name": w.name,
                    "cpus": w.cpus,
                    "memory_mb": w.memory_mb,
                    "gpus": w.gpus,
                    "models": list(w.models),
                }
                for w in alive
            ),
        )

    def gpu_slots(self) -> tuple[str, ...]:
        """One label per GPU of the cluster (``<worker>:<n>``): the scheduler counts them, Ray pins them."""
        return tuple(f"{w.name}:{i}" for w in self.workers() if w.alive for i in range(w.gpus))

    # -- placing tasks ----------------------------------------------------------------------------------

    def submit_run(self, order: Mapping[str, Any], spec: RunSpec, resources: Mapping[str, float]) -> _Stream:
        """Start :func:`cluster._task.run` for ``order`` on a worker that fits ``spec``."""
        if self._remote_run is None:
            raise ExecutionError("cluster_not_joined", "the node has not joined its cluster", retryable=True)
        generator = self._remote_run.options(
            num_cpus=spec.cpus,
            num_gpus=spec.gpus,
            memory=spec.memory_mb * MIB,
            resources=dict(resources),
            scheduling_strategy="SPREAD",
            name=f"hearth-run:{spec.job_id}:{spec.attempt}",
            _generator_backpressure_num_objects=GENERATOR_BACKPRESSURE_ITEMS,
        ).remote(dict(order))
        return _Stream(self._ray, generator)

    async def ask_worker(self, node_id: str, question: str, *args: Any) -> dict[str, Any]:
        """Ask one worker (``clean`` or ``image_id`` of :mod:`cluster._task`); its plain answer."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = self._questions.get(question)
        if remote is None:
            remote = self._questions[question] = self._ray.remote(max_retries=0, num_cpus=0)(
                getattr(_task, question)
            )
        ref = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(
            *args
        )
        try:
            async with asyncio.timeout(ASK_TIMEOUT_SECONDS):
                return dict(await ref)
        except TimeoutError:
            self._ray.cancel(ref, force=True)
            return {"error": {"code": "worker_unresponsive", "message": f"no answer to {question} in time"}}
        except Exception as exc:
            return {"error": {"code": "worker_lost", "message": f"{type(exc).__name__}: {exc}"}}

    async def ask_every_worker(self, question: str, *args: Any) -> list[dict[str, Any]]:
        """Ask every live worker at once."""
        await self.refresh()
        alive = [w for w in self.workers() if w.alive]
        return list(await asyncio.gather(*(self.ask_worker(w.node_id, question, *args) for w in alive)))

    def run_started(self, node_id: str) -> None:
        self._running[node_id] += 1

    def run_ended(self, node_id: str) -> None:
        self._running[node_id] -= 1
        if self._running[node_id] <= 0:
            del self._running[node_id]

    def failure(self, exc: BaseException, worker: str, node_id: str) -> HearthError:
        """What a Ray error during a run means for the attempt: the worker lost, or its task failing."""
        ray = self._ray
        name = worker or "unknown"
        details = {"worker": name, "node_id": node_id, "ray_error": type(exc).__name__}
        if ray is not None and isinstance(exc, ray.exceptions.RayTaskError):
            return ExecutionError(
                "worker_failed",
                f"the task on worker {name} failed: {exc}"[:2000],
                details=details,
                retryable=True,
            )
        if ray is not None and isinstance(exc, ray.exceptions.RayError):
            if node_id:
                self._lost[node_id] += 1
            return ExecutionError(
                "worker_lost",
                f"worker {name} was lost while it ran the attempt ({type(exc).__name__})",
                details=details,
                retryable=True,
            )
        if isinstance(exc, HearthError):
            return exc
        return ExecutionError(
            "worker_failed",
            f"the run on worker {name} failed: {type(exc).__name__}: {exc}",
            details=details,
            retryable=True,
        )


class _Stream:
    """A run's items as they come from its task (a Ray streaming generator)."""

    def __init__(self, ray: Any, generator: Any) -> None:
        self._ray = ray
        self._generator = generator

    async def next_item(self) -> dict[str, Any] | None:
        """The next item, or None once the task ended; a Ray error when the worker or task failed."""
        try:
            ref = await self._generator.__anext__()
        except StopAsyncIteration:
            return None
        return dict(await ref)

    async def cancel(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._ray.cancel, self._generator, force=True)
