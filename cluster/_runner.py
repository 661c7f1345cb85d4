"""The head's side of a run placed on a Ray cluster: :class:`RemoteRunner`, a sandbox runner whose
containers run on the cluster's workers.

It answers what :class:`sandbox.runner.SandboxRunner` answers, so the executors run unchanged: a run
becomes one Ray task (:func:`cluster._task.run`) asking for the container's CPUs, memory and GPUs and,
when it mounts a model, one unit of that model's resource, so only a worker holding the weights takes it.
Inputs travel by CID (the worker fetches them from this node's gateway); the output folder comes back as
a CAR whose every block is checked against its CID and the DAG's links, into a blockstore of the run's
own, and is written out where the executor expects it. Nothing is published here: the executor checks
and publishes the output exactly as on one machine.

A worker that dies mid-run (its node gone, its raylet killed) fails the run as ``worker_lost``
(execution, retryable): the scheduler runs the attempt again, within the retry budget, wherever it
fits. Cancelling a run force-cancels its task and removes its container on its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from cluster.names import model_resource
from core.config import SandboxSection, StorageSection
from core.errors import (
    DOMAINS,
    ConfigError,
    ExecutionError,
    HearthError,
    NotFoundError,
    OutputValidationError,
    RequestError,
    StorageError,
)
from sandbox.runner import RunResult, RunSpec
from storage import CID, Blockstore, CarImport, export_tree

if TYPE_CHECKING:
    from cluster._ray import RayCluster

log = logging.getLogger("hearth.cluster")

MIB = 1024 * 1024
# What the head writes out of a run's output DAG at most (the byte cap is the run's own output cap).
OUTPUT_MAX_FILES = 10_000
OUTPUT_MAX_DEPTH = 16
CLEAN_TIMEOUT_SECONDS = 30.0
_ERRORS: Mapping[str, type[HearthError]] = {
    cls.__name__: cls
    for cls in (
        HearthError,
        ExecutionError,
        StorageError,
        OutputValidationError,
        RequestError,
        NotFoundError,
        ConfigError,
    )
}

# Told of every run placed on a worker: (spec, worker name, Ray node id).
PlacedObserver = Callable[[RunSpec, str, str], None]


class RemoteRunner:
    """Runs :class:`RunSpec`\\ s on the workers of a :class:`~cluster.RayCluster` (see the module)."""

    def __init__(
        self,
        cluster: RayCluster,
        *,
        node: str,
        sandbox: SandboxSection,
        storage: StorageSection,
        head_url: Callable[[], str | None],
        on_placed: PlacedObserver | None = None,
        on_start: Callable[[RunSpec], None] | None = None,
    ) -> None:
        self._cluster = cluster
        self._node = node
        self._sandbox = sandbox
        self._storage = storage
        self._head_url = head_url
        self._on_placed = on_placed
        self._on_start = on_start
        self._images: dict[str, str] = {}

    @property
    def node(self) -> str:
        return self._node

    def reconfigure(self, sandbox: SandboxSection, storage: StorageSection) -> None:
        self._sandbox = sandbox
        self._storage = storage

    async def ping(self) -> None:
        """Check that the cluster has a live worker; raises ``no_workers`` when it has none."""
        if not any(w.alive for w in self._cluster.workers()):
            raise ExecutionError("no_workers", "the cluster has no live worker", retryable=True)

    async def image_digest(self, ref: str) -> str:
        """The ID the workers' engines give ``ref``: what every run is pinned to (and checked against, as
        the worker's engine runs only that exact image). Workers that disagree are named in the log."""
        if ref not in self._images:
            answers = await self._cluster.ask_every_worker("image_id", ref)
            ids: dict[str, list[str]] = {}
            errors: list[dict[str, Any]] = []
            for answer in answers:
                if "error" in answer:
                    errors.append(answer["error"])
                else:
                    ids.setdefault(answer["image"], []).append(answer["worker"])
            if not ids:
                if errors:
                    raise _rebuilt(errors[0])
                raise ExecutionError("no_workers", "the cluster has no live worker", retryable=True)
            chosen = max(ids, key=lambda i: len(ids[i]))
            if len(ids) > 1:
                log.warning(
                    "workers hold different images for %s: runs are pinned to %s; load the same image on %s",
                    ref,
                    chosen,
                    sorted(w for i, ws in ids.items() if i != chosen for w in ws),
                )
            self._images[ref] = chosen
        return self._images[ref]

    async def run(
        self,
        spec: RunSpec,
        *,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
    ) -> RunResult:
        """Run ``spec`` on a worker that fits it; as :meth:`sandbox.runner.SandboxRunner.run`."""
        order = self._order(spec, on_stdout is not None, on_stderr is not None)
        resources = {model_resource(m.cid): 1.0 for m in spec.inputs if m.cid and m.model}
        stream = self._cluster.submit_run(order, spec, resources)
        run = _Run(spec, self._cluster)
        try:
            async with asyncio.timeout(self._cluster.placement_timeout):
                first = await stream.next_item()
            run.placed(first, self._on_placed)
            if self._on_start is not None:
                self._on_start(spec)
            while (item := await stream.next_item()) is not None:
                await run.take(item, on_stdout, on_stderr)
            return await run.result()
        except TimeoutError:
            await stream.cancel()
            raise ExecutionError(
                "no_worker_fits",
                f"no worker took the run within {self._cluster.placement_timeout:.0f} s",
                details={"cpus": spec.cpus, "memory_mb": spec.memory_mb, "gpus": spec.gpus, **resources},
                retryable=True,
            ) from None
        except asyncio.CancelledError:
            await asyncio.shield(self._cancelled(stream, run))
            raise
        except HearthError as exc:
            if run.worker:
                exc.details.setdefault("worker", run.worker)
            if exc.code == "image_missing":  # that worker was not prepared; another may run it
                exc.retryable = True
            raise
        except Exception as exc:
            raise self._cluster.failure(exc, run.worker, run.node_id) from None
        finally:
            run.close()

    async def _cancelled(self, stream: Any, run: _Run) -> None:
        """A cancelled run: its task is force-cancelled and its container removed on its worker."""
        await stream.cancel()
        if run.node_id:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLEAN_TIMEOUT_SECONDS):
                    answer = await self._cluster.ask_worker(
                        run.node_id, "clean", self._node, run.spec.job_id, run.spec.attempt
                    )
                if "error" in answer:
                    log.warning("could not remove a cancelled run's container on %s: %s", run.worker, answer)

    def _order(self, spec: RunSpec, stdout: bool, stderr: bool) -> dict[str, Any]:
        head = self._head_url()
        if not head and any(not m.model for m in spec.inputs):
            raise ConfigError(
                "no_head_url",
                "workers cannot fetch inputs: set [cluster] head_url (or the node's endpoint)",
            )
        inputs = []
        for mount in spec.inputs:
            if not mount.cid:
                raise ExecutionError(
                    "not_addressed",
                    f"input {mount.target} has no CID, so no worker can fetch it",
                    details={"target": mount.target},
                )
            inputs.append(
                {"cid": mount.cid, "target": mount.target, "kind": "model" if mount.model else "input"}
            )
        storage = self._storage
        return {
            "node": self._node,
            "job_id": spec.job_id,
            "attempt": spec.attempt,
            "head_url": head,
            "inputs": inputs,
            "gpus": spec.gpus,
            "streams": [s for s, on in (("stdout", stdout), ("stderr", stderr)) if on],
            "storage": {
                "max_input_mb": storage.max_input_mb,
                "fetch_timeout_seconds": storage.fetch_timeout_seconds,
                "connect_timeout_seconds": storage.connect_timeout_seconds,
                "read_timeout_seconds": storage.read_timeout_seconds,
            },
            "sandbox": self._sandbox.model_dump(mode="json"),
            "spec": {
                "image": spec.image,
                "argv": list(spec.argv),
                "cpus": spec.cpus,
                "memory_mb": spec.memory_mb,
                "timeout_seconds": spec.timeout_seconds,
                "max_output_bytes": spec.max_output_bytes,
                "pids_limit": spec.pids_limit,
                "tmpfs_mb": spec.tmpfs_mb,
                "shm_mb": spec.shm_mb,
                "env": dict(spec.env),
                "workdir": spec.workdir,
                "user": spec.user,
            },
        }

    async def remove_containers(
        self, *, job_id: str | None = None, attempt: int | None = None, any_node: bool = False
    ) -> list[str]:
        """Remove this node's containers on every live worker (recovery at start); their IDs."""
        removed: list[str] = []
        for answer in await self._cluster.ask_every_worker("clean", self._node, job_id, attempt):
            if "error" in answer:
                log.warning("a worker could not remove this node's containers: %s", answer["error"])
            else:
                removed += answer["removed"]
        return removed

    def close(self) -> None:
        """Nothing to close: the cluster's connection is the node's (see :meth:`RayCluster.close`)."""


class _Run:
    """One run's state at the head: where it landed, its output CAR, its result."""

    def __init__(self, spec: RunSpec, cluster: RayCluster) -> None:
        self.spec = spec
        self._cluster = cluster
        self.worker = ""
        self.node_id = ""
        self._folder = spec.output_dir.parent / f".run-{spec.attempt}-{secrets.token_hex(4)}"
        self._import: CarImport | None = None
        self._store: Blockstore | None = None
        self._done: dict[str, Any] | None = None
        self._counted = False

    def placed(self, item: Mapping[str, Any] | None, observer: PlacedObserver | None) -> None:
        if item is not None and item.get("type") == "error":  # it failed before it could say where it ran
            raise _rebuilt(item)
        if item is None or item.get("type") != "placed":
            raise ExecutionError(
                "worker_failed", "the worker's task ended before it started the run", retryable=True
            )
        self.worker, self.node_id = str(item.get("worker", "")), str(item.get("node_id", ""))
        self._cluster.run_started(self.node_id)
        self._counted = True
        if observer is not None:
            with contextlib.suppress(Exception):
                observer(self.spec, self.worker, self.node_id)

    async def take(
        self,
        item: Mapping[str, Any],
        on_stdout: Callable[[str], None] | None,
        on_stderr: Callable[[str], None] | None,
    ) -> None:
        kind = item.get("type")
        if kind == "lines":
            for line in item.get("stdout", ()):
                if on_stdout is not None:
                    on_stdout(line)
            for line in item.get("stderr", ()):
                if on_stderr is not None:
                    on_stderr(line)
        elif kind == "root":
            self._folder.mkdir(parents=True)
            self._store = await asyncio.to_thread(Blockstore.open, self._folder, verify_reads=False)
            root = CID.parse(str(item["cid"]))
            self._import = CarImport(root, self._store, max_bytes=self.spec.max_output_bytes + MIB)
        elif kind == "car":
            if self._import is None:
                raise StorageError("unexpected_block", "the worker sent output blocks before their root")
            await asyncio.to_thread(self._import.feed, bytes(item["data"]))
        elif kind == "done":
            self._done = dict(item["result"])
        elif kind == "error":
            raise _rebuilt(item)

    async def result(self) -> RunResult:
        if self._done is None or self._import is None or self._store is None:
            raise ExecutionError("worker_failed", "the worker's task ended without a result", retryable=True)
        await asyncio.to_thread(self._import.finish)
        await asyncio.to_thread(
            export_tree,
            self._store,
            self._import.root,
            self.spec.output_dir,
            max_bytes=self.spec.max_output_bytes,
            max_files=OUTPUT_MAX_FILES,
            max_depth=OUTPUT_MAX_DEPTH,
        )
        done = self._done
        return RunResult(
            exit_code=int(done["exit_code"]),
            wall_seconds=float(done["wall_seconds"]),
            output_bytes=int(done["output_bytes"]),
            container_id=str(done["container_id"]),
            image_id=str(done["image_id"]),
            stderr_tail=str(done["stderr_tail"]),
            worker=self.worker,
        )

    def close(self) -> None:
        if self._import is not None:
            self._import.abort()
        shutil.rmtree(self._folder, ignore_errors=True)
        if self._counted:
            self._cluster.run_ended(self.node_id)


def _rebuilt(item: Mapping[str, Any]) -> HearthError:
    """The error a worker reported, as the class it was raised as (its domain and retryability kept)."""
    cls = _ERRORS.get(str(item.get("class")), HearthError)
    details, domain = item.get("details"), item.get("domain")
    return cls(
        str(item.get("code") or "worker_failed"),
        str(item.get("message") or "the worker failed the run"),
        details=dict(details) if isinstance(details, Mapping) else {},
        retryable=bool(item.get("retryable")),
        domain=domain if domain in DOMAINS else None,
    )
