"""The Docker sandbox every workload runs in (the README's Execution).

:class:`SandboxRunner` runs one :class:`RunSpec` in a fresh container and removes the container afterwards.
Every run gets all of §6's controls, none of them optional: a read-only root filesystem, inputs bind-mounted
read-only, one writable output directory (``/out``), no network, every capability dropped,
``no-new-privileges``, a non-root user, pids/memory (no swap)/CPU limits, a size-limited ``noexec`` tmpfs
on ``/tmp``, no ``/dev/shm`` unless asked for, no core dumps, a wall-clock timeout and an output size cap
(watched while the workload runs, checked again at its end). The container's settings are made in
:mod:`sandbox._hardening`; the run's specification and its checks live in :mod:`sandbox.spec` (re-exported
here). Containers carry the labels ``hearth.job_id``, ``hearth.node`` and ``hearth.attempt``, so that after
a crash the node can find what it left behind (:meth:`SandboxRunner.list_containers`,
:meth:`SandboxRunner.remove_containers`).

The docker SDK is synchronous: short calls run through :func:`asyncio.to_thread`; the two calls that block
for a whole run (waiting for the exit, reading the output streams) get threads of their own, so that many
concurrent runs cannot starve the loop's shared executor. Docker's own errors never leave this module: they
become :class:`~core.errors.ExecutionError` with one of these codes:

``docker_unavailable`` (retryable)  the engine does not answer
``image_missing``                   the image is not on this node (``scripts/docker.sh`` builds them)
``docker_error``                    the engine refused a request (retryable when it was the engine's fault)
``timeout`` (retryable)             the workload ran past its wall-clock limit and was killed
``output_cap_exceeded``             the workload wrote more than its output cap and was killed
``output_unreadable``               the output directory holds something the node cannot read back
``oom_killed``                      the kernel killed the workload for exceeding its memory limit
``nonzero_exit``                    the workload exited with an error of its own
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, Protocol, TypeVar

from core.config import SandboxSection
from core.defaults import (
    DEFAULT_DOCKER_API_TIMEOUT_SECONDS,
    DEFAULT_DOCKER_URL,
    DEFAULT_OUTPUT_POLL_SECONDS,
    DEFAULT_STDERR_TAIL_BYTES,
)
from core.errors import ExecutionError
from sandbox._engine import close_stream, kill, remove
from sandbox._engine import sdk as _sdk
from sandbox._hardening import create_kwargs as _create_kwargs
from sandbox._outdir import prepare_output_dir, tree_size
from sandbox._streams import LineSplitter, Tail
from sandbox.spec import LABEL_ATTEMPT as LABEL_ATTEMPT
from sandbox.spec import LABEL_JOB_ID as LABEL_JOB_ID
from sandbox.spec import LABEL_NODE as LABEL_NODE
from sandbox.spec import LABEL_WORKER as LABEL_WORKER
from sandbox.spec import OUTPUT_MOUNT as OUTPUT_MOUNT
from sandbox.spec import TMP_MOUNT as TMP_MOUNT
from sandbox.spec import Mount as Mount
from sandbox.spec import RunResult as RunResult
from sandbox.spec import RunSpec as RunSpec
from sandbox.spec import SandboxContainer as SandboxContainer

log = logging.getLogger(__name__)

# ``_create_kwargs`` and ``_sdk`` are looked up in this module on every run, so that a test can loosen the
# container a run creates (tests/sandbox/test_hardening.py) and see the escape checks notice.

_T = TypeVar("_T")

_StopReason = Literal["timeout", "output_cap_exceeded"]


class Runner(Protocol):
    """What runs a :class:`RunSpec`: :class:`SandboxRunner` on this machine, or a cluster's remote runner."""

    @property
    def node(self) -> str: ...

    async def image_digest(self, ref: str) -> str: ...

    async def run(
        self,
        spec: RunSpec,
        *,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
    ) -> RunResult: ...

    async def remove_containers(
        self, *, job_id: str | None = None, attempt: int | None = None, any_node: bool = False
    ) -> list[str]: ...

    def close(self) -> None: ...


class SandboxRunner:
    """Runs workloads in hardened, labelled, always-removed Docker containers; one per node.

    ``node`` is this node's stable identity (its DID), written on every container it makes so that
    recovery touches only this node's containers even where engines are shared. The engine is first
    contacted on first use, not on construction. ``on_start`` is told of every container the engine has
    started, with its spec (e.g. to count them).
    """

    def __init__(
        self,
        *,
        node: str,
        docker_url: str = DEFAULT_DOCKER_URL,
        api_timeout_seconds: float = DEFAULT_DOCKER_API_TIMEOUT_SECONDS,
        output_poll_seconds: float = DEFAULT_OUTPUT_POLL_SECONDS,
        stderr_tail_bytes: int = DEFAULT_STDERR_TAIL_BYTES,
        on_start: Callable[[RunSpec], None] | None = None,
        worker: str | None = None,
    ) -> None:
        """``worker``: the cluster worker this runner runs on (the ``hearth.worker`` label of its containers,
        which then also bounds what :meth:`list_containers` and :meth:`remove_containers` see)."""
        self._node = node
        self._worker = worker
        self._on_start = on_start
        self._url = docker_url
        self._api_timeout = api_timeout_seconds
        self._poll = output_poll_seconds
        self._tail_bytes = stderr_tail_bytes
        self._client: Any = None

    @classmethod
    def from_config(
        cls,
        section: SandboxSection,
        *,
        node: str,
        on_start: Callable[[RunSpec], None] | None = None,
        worker: str | None = None,
        docker_url: str | None = None,
    ) -> SandboxRunner:
        """A runner set up from ``[sandbox]`` of node.toml (a cluster worker names itself and its engine)."""
        return cls(
            node=node,
            on_start=on_start,
            worker=worker,
            docker_url=docker_url or section.docker_url,
            api_timeout_seconds=section.docker_timeout_seconds,
            output_poll_seconds=section.output_poll_seconds,
            stderr_tail_bytes=section.stderr_tail_bytes,
        )

    @property
    def node(self) -> str:
        return self._node

    async def ping(self) -> None:
        """Check that the engine answers; raises ``docker_unavailable`` when it does not."""
        client = await self._docker()
        with self._errors():
            await asyncio.to_thread(client.ping)

    async def image_digest(self, ref: str) -> str:
        """The image ID (``sha256:...``, a digest of the image's config) that ``ref`` names on this node.

        Locally built images have no registry digest; their ID is the content address to run and record.
        """
        client = await self._docker()
        with self._errors(image=ref):
            image = await asyncio.to_thread(client.images.get, ref)
        return str(image.id)

    async def run(
        self,
        spec: RunSpec,
        *,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
    ) -> RunResult:
        """Run ``spec`` to its end and return its :class:`RunResult`, or raise :class:`ExecutionError`.

        ``on_stdout`` is called on the event loop with each line the workload writes to stdout, as it comes
        (ffmpeg's ``-progress`` reports); stderr is kept as a bounded tail for error details and, with
        ``on_stderr``, handed over line by line too (a carriage return ends a line: progress bars redraw).
        Cancelling the call kills the workload. The container is removed in every case, after its exit state
        was read.
        """
        client = await self._docker()
        group_add = await asyncio.to_thread(prepare_output_dir, spec.output_dir, spec.user)
        extra = {"worker": self._worker} if self._worker else {}
        container_id = await self._create(
            client, spec, _create_kwargs(spec, node=self._node, group_add=group_add, **extra)
        )
        try:
            return await self._supervise(client, container_id, spec, on_stdout, on_stderr)
        finally:
            # Shielded: a cancelled run still waits for its container to be gone.
            await asyncio.shield(asyncio.to_thread(self._discard, client, container_id))

    async def list_containers(
        self, *, job_id: str | None = None, attempt: int | None = None, any_node: bool = False
    ) -> list[SandboxContainer]:
        """This node's containers on the engine, running or not, optionally only those of ``job_id`` (and
        ``attempt``). A worker's runner sees only its own; with ``any_node`` it sees its own of every node
        (a worker joining again removes whatever it left, for whichever node)."""
        client = await self._docker()
        labels = [] if any_node and self._worker else [f"{LABEL_NODE}={self._node}"]
        if self._worker:
            labels.append(f"{LABEL_WORKER}={self._worker}")
        if job_id is not None:
            labels.append(f"{LABEL_JOB_ID}={job_id}")
        if attempt is not None:
            labels.append(f"{LABEL_ATTEMPT}={attempt}")
        with self._errors():
            rows = await asyncio.to_thread(client.api.containers, all=True, filters={"label": labels})
        return [_container_from_row(row) for row in rows]

    async def remove_containers(
        self, *, job_id: str | None = None, attempt: int | None = None, any_node: bool = False
    ) -> list[str]:
        """Kill and remove this node's containers (only ``job_id``'s, and ``attempt``'s, when given);
        returns their IDs. ``any_node`` as for :meth:`list_containers`.

        For recovery after a crash, before new runs start: a container removed here is a run that is lost.
        """
        found = await self.list_containers(job_id=job_id, attempt=attempt, any_node=any_node)
        client = await self._docker()
        with self._errors():
            for container in found:
                await asyncio.to_thread(remove, client, container.container_id)
        return [c.container_id for c in found]

    def close(self) -> None:
        """Close the connection pool to the engine (runs in flight must have ended)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _docker(self) -> Any:
        if self._client is None:
            with self._errors():
                # Version negotiation talks to the engine, hence a thread; no fixed API version is assumed.
                client = await asyncio.to_thread(
                    _sdk().DockerClient, base_url=self._url, timeout=self._api_timeout
                )
            if self._client is None:
                self._client = client
            else:
                client.close()
        return self._client

    async def _create(self, client: Any, spec: RunSpec, kwargs: dict[str, Any]) -> str:
        creating = asyncio.ensure_future(asyncio.to_thread(client.containers.create, spec.image, **kwargs))
        try:
            with self._errors(image=spec.image, job_id=spec.job_id):
                container = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The engine may still create it: remove it once it exists rather than leave an orphan.
            with contextlib.suppress(Exception):
                late = await creating
                await asyncio.to_thread(self._discard, client, str(late.id))
            raise
        return str(container.id)

    async def _supervise(
        self,
        client: Any,
        container_id: str,
        spec: RunSpec,
        on_stdout: Callable[[str], None] | None,
        on_stderr: Callable[[str], None] | None,
    ) -> RunResult:
        facts: dict[str, Any] = {"job_id": spec.job_id, "attempt": spec.attempt, "container_id": container_id}
        tail = Tail(self._tail_bytes)
        with self._errors(**facts):
            # Attached before start, so not a byte is missed; the container keeps no log of its own.
            stream = await asyncio.to_thread(
                client.api.attach, container_id, stdout=True, stderr=True, stream=True, demux=True, logs=False
            )
        try:
            with self._errors(**facts):
                await asyncio.to_thread(client.api.start, container_id)
                started = time.monotonic()
                if self._on_start is not None:
                    self._on_start(spec)
                emit, emit_err = _emitter(on_stdout), _emitter(on_stderr)
                pumped = _in_thread(lambda: _pump(stream, emit, tail, emit_err), "hearth-sandbox-output")
                exited = _in_thread(
                    lambda: client.api.wait(container_id, timeout=None), "hearth-sandbox-wait"
                )
                stop = await self._watch(exited, spec, started)
                if stop is not None:
                    await asyncio.to_thread(kill, client, container_id)
                await asyncio.wait_for(exited, self._api_timeout)
                wall_seconds = time.monotonic() - started
                await asyncio.wait_for(pumped, self._api_timeout)  # every stdout line delivered
                attrs = await asyncio.to_thread(client.api.inspect_container, container_id)
        finally:
            close_stream(stream)
        size = await asyncio.to_thread(tree_size, spec.output_dir)
        state = attrs["State"]
        facts |= {
            "image_id": attrs["Image"],
            "exit_code": state["ExitCode"],
            "wall_seconds": round(wall_seconds, 3),
            "output_bytes": size.total_bytes,
            "stderr_tail": tail.text(),
        }
        _raise_for_failure(
            spec, facts, stop=stop, oom_killed=bool(state["OOMKilled"]), unreadable=size.unreadable
        )
        return RunResult(
            exit_code=facts["exit_code"],
            wall_seconds=wall_seconds,
            output_bytes=size.total_bytes,
            container_id=container_id,
            image_id=facts["image_id"],
            stderr_tail=facts["stderr_tail"],
        )

    async def _watch(self, exited: asyncio.Future[Any], spec: RunSpec, started: float) -> _StopReason | None:
        """Wait for the exit, measuring the output meanwhile; says why the run must be stopped, if it must."""
        deadline = started + spec.timeout_seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            done, _ = await asyncio.wait({exited}, timeout=min(self._poll, remaining))
            if done:
                return None
            size = await asyncio.to_thread(tree_size, spec.output_dir)
            if size.total_bytes > spec.max_output_bytes:
                return "output_cap_exceeded"

    def _discard(self, client: Any, container_id: str) -> None:
        try:
            remove(client, container_id)
        except (_sdk().errors.DockerException, OSError) as exc:
            # Not fatal to the run's outcome: the labels let recovery find and remove it later.
            log.warning("could not remove sandbox container %s: %s", container_id[:12], exc)

    @contextlib.contextmanager
    def _errors(self, **context: Any) -> Iterator[None]:
        """Translate the docker SDK's (and its HTTP stack's) errors into ExecutionError."""
        try:
            yield
        except _sdk().errors.ImageNotFound as exc:
            raise ExecutionError(
                "image_missing",
                f"image {context.get('image')!r} is not on this node (scripts/docker.sh builds the images)",
                details=context,
            ) from exc
        except _sdk().errors.APIError as exc:
            status = int(exc.status_code or 500)
            raise ExecutionError(
                "docker_error",
                f"the Docker engine refused: {exc.explanation or exc}",
                details={**context, "status": status},
                retryable=status >= 500,
            ) from exc
        except (_sdk().errors.DockerException, OSError) as exc:
            # requests' errors (connection refused, read timeouts) are OSErrors, as is asyncio's TimeoutError.
            raise ExecutionError(
                "docker_unavailable",
                f"the Docker engine at {self._url} does not answer: {exc}",
                details={**context, "docker_url": self._url},
                retryable=True,
            ) from exc


def _raise_for_failure(
    spec: RunSpec, facts: dict[str, Any], *, stop: _StopReason | None, oom_killed: bool, unreadable: bool
) -> None:
    """Raise the ExecutionError that says why the run failed; return when it did not fail."""
    job = spec.job_id
    if stop == "timeout":
        raise ExecutionError(
            "timeout",
            f"job {job} ran past its {spec.timeout_seconds:g}s timeout and was killed",
            details={**facts, "timeout_seconds": spec.timeout_seconds},
            retryable=True,
        )
    if stop == "output_cap_exceeded" or facts["output_bytes"] > spec.max_output_bytes:
        raise ExecutionError(
            "output_cap_exceeded",
            f"job {job} wrote more than its {spec.max_output_bytes} byte output cap",
            details={**facts, "max_output_bytes": spec.max_output_bytes},
        )
    if unreadable:
        raise ExecutionError(
            "output_unreadable", f"job {job} left output the node cannot read back", details=facts
        )
    if facts["exit_code"] != 0 and oom_killed:
        raise ExecutionError(
            "oom_killed",
            f"job {job} was killed for exceeding its {spec.memory_mb} MB memory limit",
            details={**facts, "memory_mb": spec.memory_mb},
        )
    if facts["exit_code"] != 0:
        raise ExecutionError(
            "nonzero_exit", f"job {job} exited with status {facts['exit_code']}", details=facts
        )


def _container_from_row(row: dict[str, Any]) -> SandboxContainer:
    labels: dict[str, str] = row.get("Labels") or {}
    attempt = labels.get(LABEL_ATTEMPT, "")
    return SandboxContainer(
        container_id=row["Id"],
        job_id=labels.get(LABEL_JOB_ID, ""),
        attempt=int(attempt) if attempt.isdigit() else None,
        state=row.get("State", ""),
        image_id=row.get("ImageID", ""),
    )


def _emitter(on_stdout: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """``on_stdout`` made callable from a reader thread: each line is handed to the event loop, in order."""
    if on_stdout is None:
        return None
    loop = asyncio.get_running_loop()

    def emit(line: str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens any more
            loop.call_soon_threadsafe(on_stdout, line)

    return emit


def _pump(
    stream: Iterable[tuple[bytes | None, bytes | None]],
    emit: Callable[[str], None] | None,
    tail: Tail,
    emit_err: Callable[[str], None] | None = None,
) -> None:
    """Read the attached streams to their end: stdout as lines to ``emit``, stderr into ``tail``.

    With ``emit_err``, stderr goes there as lines too, a carriage return counting as a line end.
    """
    lines, err_lines = LineSplitter(), LineSplitter()
    for out, err in stream:
        if out and emit is not None:
            for line in lines.feed(out):
                emit(line)
        if err:
            tail.feed(err)
            if emit_err is not None:
                for line in err_lines.feed(err.replace(b"\r\n", b"\n").replace(b"\r", b"\n")):
                    emit_err(line)
    for splitter, sink in ((lines, emit), (err_lines, emit_err)):
        if sink is not None:
            for line in splitter.flush():
                sink(line)


def _in_thread(fn: Callable[[], _T], name: str) -> asyncio.Future[_T]:
    """Run a call that blocks for a long time in a thread of its own; its outcome settles the future.

    Unlike :func:`asyncio.to_thread` this holds no worker of the loop's shared, small executor for the
    length of a run. The thread is a daemon: a wait the engine never answers cannot hold up the exit.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():  # else the awaiting side gave up (cancelled, timed out)
            outcome()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:
            outcome = functools.partial(future.set_exception, exc)
        else:
            outcome = functools.partial(future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(settle, outcome)

    # An outcome nobody awaits any more (a cancelled run) must not be reported as "never retrieved".
    future.add_done_callback(_consume)
    threading.Thread(target=target, name=name, daemon=True).start()
    return future


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
