"""Warm inference engines (DESIGN §15): one long-lived vLLM server per model marked ``warm = true``.

A cold ``vllm_batch`` run loads its model for every job (about 30 s on a CPU here). A warm model keeps
one engine: vLLM's OpenAI server in a container with every control of a cold run (read-only root and
model, no network, all capabilities dropped, non-root, pids/memory/CPU limits, GPUs pinned), serving on
a unix socket in a folder of its own, the container's one writable mount. Prefix caching is off, so one
requester's prompts cannot be timed by another's.

- **Capacity.** While the engine runs it holds its CPUs, memory and GPUs (``warm_cpus``,
  ``warm_memory_mb``, ``warm_gpus``) in the node's capacity, as a job does; an engine that does not fit
  is not started and the batch runs cold.
- **Lifecycle.** Started with the node (``preload``) or by the first batch; ready once ``/health``
  answers (within ``warm_start_seconds``); stopped after ``max_idle_seconds`` unused, on drain, or when
  its container exits. A batch in flight on an engine that dies fails ``engine_crashed`` (retryable): the
  scheduler runs the attempt again, on a new engine. Engines are never adopted after a node restart:
  recovery removes every container of the node, engines included.
- **A batch.** Its lines go to the engine with at most ``warm_concurrency`` in flight; each answer is
  written as a line of the OpenAI batch output format, in input order, so checks, usage and charge are
  exactly those of a cold run. Progress is reported per request. Cancelling the job cancels its
  requests only: the engine and other jobs on it go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp

from core.config import ModelSection, SandboxSection
from core.errors import ExecutionError, HearthError
from node.scheduler import ProgressReport
from provider.capacity import Resources
from provider.catalog import CatalogModel
from sandbox.runner import Mount, Runner, RunResult, RunSpec
from sandbox.vllm import (
    BATCH_URL,
    CONTAINER_MODEL_DIR,
    CONTAINER_OUTPUT_NAME,
    CONTAINER_SOCKET_NAME,
    Batch,
    BatchPlan,
    cpu_memory_needed_mb,
    server_plan,
)

log = logging.getLogger("hearth.warm")

EngineState = Literal["stopped", "starting", "ready", "failed"]
# An engine runs until stopped: its container's time limit is only a backstop.
ENGINE_LIFETIME_SECONDS = 365 * 24 * 3600.0
# The engine's folder holds its socket and nothing else worth keeping.
ENGINE_FOLDER_BYTES = 16 * 1024 * 1024
HEALTH_POLL_SECONDS = 0.5
HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=5)
HEALTH_CHECK_SECONDS = 30.0  # an idle ready engine's /health is asked this often
# Each answer is read whole; a completion is at most max_tokens, well under this.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
# The socket is made group- and world-writable inside the engine's folder; the folder's parents are the
# node's own (0700), so only the node reaches it.
_UMASK_SHIM = ("sh", "-c", 'umask 0; exec "$@"', "hearth-engine")
_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
# What a batch on a warm engine holds for itself: the engine holds the model's memory and compute; the job
# is the node streaming requests and writing answers.
WARM_JOB_NEED = Resources(cpus=0.1, memory_mb=256, gpus=0)

# (key, need) -> the GPU ids pinned for it; raises CapacityError when it does not fit. And its release.
Hold = Callable[[str, Resources], tuple[str, ...]]
Unhold = Callable[[str], None]


@dataclass
class _Engine:
    model: CatalogModel
    folder: Path
    state: EngineState = "stopped"
    task: asyncio.Task[None] | None = None
    session: aiohttp.ClientSession | None = None
    plan: BatchPlan | None = None
    image: str = ""
    users: int = 0
    last_used: float = 0.0
    starts: int = 0
    error: str = ""
    checked: float = 0.0  # when /health was last asked

    @property
    def key(self) -> str:
        return f"engine:{self.model.name}"


class WarmEngines:
    """The node's warm engines, one per ``warm = true`` model (see the module)."""

    def __init__(
        self,
        runner: Runner,
        sandbox: SandboxSection,
        models: Mapping[str, CatalogModel],
        *,
        folder: Path,
        hold: Hold,
        unhold: Unhold,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._runner = runner
        self._sandbox = sandbox
        self._folder = folder
        self._hold = hold
        self._unhold = unhold
        self._now = now
        self._engines = {
            name: _Engine(model, folder / _NAME_SAFE.sub("_", name))
            for name, model in models.items()
            if model.entry.warm
        }
        self._locks = {name: asyncio.Lock() for name in self._engines}
        self._preloads: list[asyncio.Task[None]] = []

    # -- views ----------------------------------------------------------------------------------------

    def is_warm(self, model: str) -> bool:
        return model in self._engines

    def states(self) -> dict[str, dict[str, Any]]:
        """Each warm model's engine: its state, jobs on it now, and since when it is unused."""
        return {
            name: {
                "state": e.state,
                "jobs": e.users,
                "starts": e.starts,
                "idle_seconds": round(max(0.0, self._now() - e.last_used), 1) if e.state == "ready" else None,
                "error": e.error or None,
            }
            for name, e in self._engines.items()
        }

    # -- lifetime -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Clear what engines of an earlier run left in their folders; start the ``preload`` ones, in the
        background (the node is ready meanwhile: a batch arriving first waits for its engine)."""
        await asyncio.to_thread(shutil.rmtree, self._folder, True)
        for name, engine in self._engines.items():
            if engine.model.entry.preload:
                self._preloads.append(asyncio.create_task(self._preload(name), name=f"hearth-preload-{name}"))

    async def _preload(self, name: str) -> None:
        try:
            await self.acquire(name)
        except HearthError as exc:
            log.warning("warm engine for %s did not start: %s", name, exc.message)

    async def stop(self) -> None:
        """Stop every engine (drain: jobs have ended or been stopped already)."""
        for task in self._preloads:
            task.cancel()
        await asyncio.gather(*self._preloads, return_exceptions=True)
        await asyncio.gather(*(self._stop(e) for e in self._engines.values()))

    async def housekeep(self) -> None:
        """The node's housekeeping round: stop the engines that died or stopped answering (their capacity
        is freed; the next batch starts a new one), check the others' ``/health`` every
        :data:`HEALTH_CHECK_SECONDS`, and evict the idle."""
        now = self._now()
        for name, engine in self._engines.items():
            if self._locks[name].locked():
                continue  # a batch is starting it
            if engine.task is not None and engine.task.done():
                log.warning("warm engine for %s is gone (%s): stopped", name, engine.error or "exited")
                engine.state = "failed"
                await self._stop(engine)
            elif (
                engine.state == "ready" and engine.users == 0 and now - engine.checked >= HEALTH_CHECK_SECONDS
            ):
                engine.checked = now
                if not await self._healthy(engine):
                    engine.state, engine.error = "failed", "its /health did not answer"
                    log.warning("warm engine for %s does not answer /health: stopped", name)
                    await self._stop(engine)
        await self.evict_idle()

    async def _healthy(self, engine: _Engine) -> bool:
        if engine.session is None:
            return False
        try:
            async with engine.session.get("http://engine/health", timeout=HEALTH_TIMEOUT) as r:
                return r.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def evict_idle(self) -> list[str]:
        """Stop the engines unused for their ``max_idle_seconds``; their names."""
        now, evicted = self._now(), []
        for name, engine in self._engines.items():
            idle = now - engine.last_used
            if engine.state == "ready" and engine.users == 0 and idle >= engine.model.entry.max_idle_seconds:
                log.info("warm engine for %s idle %.0f s: stopped", name, idle)
                await self._stop(engine)
                evicted.append(name)
        return evicted

    # -- engines --------------------------------------------------------------------------------------

    async def acquire(self, name: str) -> _Engine:
        """The model's engine, ready; started (and waited for) when it is not running."""
        engine = self._engines[name]
        async with self._locks[name]:
            if engine.state != "ready" or engine.task is None or engine.task.done():
                await self._stop(engine)
                await self._start(engine)
        engine.last_used = self._now()
        return engine

    async def _start(self, engine: _Engine) -> None:
        entry, model = engine.model.entry, engine.model
        need = engine_resources(entry, model.size_bytes)
        memory = need.memory_mb
        gpu_ids = self._hold(engine.key, need)  # CapacityError: it does not fit now
        try:
            engine.plan = server_plan(
                served_name=model.name,
                max_context=entry.max_context,
                dtype=entry.dtype,
                cpus=entry.warm_cpus,
                memory_mb=memory,
                gpus=len(gpu_ids),
                model_bytes=model.size_bytes,
            )
            sandbox = self._sandbox
            tag = sandbox.vllm_gpu_image if engine.plan.device == "gpu" else sandbox.vllm_cpu_image
            engine.image = await self._runner.image_digest(tag)
            await asyncio.to_thread(shutil.rmtree, engine.folder, True)
            spec = RunSpec(
                image=engine.image,
                argv=(*_UMASK_SHIM, *engine.plan.argv),
                job_id=engine.key.replace(":", "-"),
                attempt=engine.starts,
                output_dir=engine.folder,
                inputs=(Mount(host=model.path, target=CONTAINER_MODEL_DIR, cid=entry.cid, model=True),),
                cpus=entry.warm_cpus,
                memory_mb=memory,
                timeout_seconds=ENGINE_LIFETIME_SECONDS,
                max_output_bytes=ENGINE_FOLDER_BYTES,
                pids_limit=sandbox.pids_limit,
                tmpfs_mb=sandbox.tmpfs_mb,
                shm_mb=sandbox.vllm_shm_mb,
                env=engine.plan.env,
                user=sandbox.user,
                gpu_ids=gpu_ids,
            )
            engine.starts += 1
            engine.state, engine.error = "starting", ""
            engine.task = asyncio.create_task(self._serve(engine, spec), name=f"hearth-engine-{model.name}")
            engine.session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(engine.folder / CONTAINER_SOCKET_NAME)),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
            await self._until_healthy(engine)
        except BaseException:
            await self._stop(engine)
            raise
        engine.state = "ready"
        log.info("warm engine for %s ready (start %d)", model.name, engine.starts)

    async def _serve(self, engine: _Engine, spec: RunSpec) -> None:
        """The engine's container, run until it is stopped (cancelled) or exits on its own."""
        stderr: list[str] = []
        try:
            await self._runner.run(spec, on_stderr=lambda line: _keep_tail(stderr, line))
            engine.error = "the engine exited"
        except HearthError as exc:
            engine.error = f"{exc.code}: {exc.message}"[:500]
        if engine.error:
            engine.state = "failed"
            log.warning("warm engine for %s stopped: %s %s", engine.model.name, engine.error, stderr[-3:])

    async def _until_healthy(self, engine: _Engine) -> None:
        deadline = asyncio.get_running_loop().time() + engine.model.entry.warm_start_seconds
        assert engine.session is not None and engine.task is not None
        while True:
            if engine.task.done():
                raise ExecutionError(
                    "engine_failed",
                    f"the warm engine for {engine.model.name} exited while starting: {engine.error}",
                    details={"model": engine.model.name},
                    retryable=True,
                )
            if await self._healthy(engine):
                engine.checked = self._now()
                return
            if asyncio.get_running_loop().time() >= deadline:
                raise ExecutionError(
                    "engine_start_timeout",
                    f"the warm engine for {engine.model.name} did not answer within "
                    f"{engine.model.entry.warm_start_seconds:.0f} s",
                    details={"model": engine.model.name},
                    retryable=True,
                )
            await asyncio.sleep(HEALTH_POLL_SECONDS)

    async def _stop(self, engine: _Engine) -> None:
        task, engine.task = engine.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # the runner removes the container
        if engine.session is not None:
            await engine.session.close()
            engine.session = None
        if engine.state != "failed":
            engine.state = "stopped"
        self._unhold(engine.key)

    # -- a batch --------------------------------------------------------------------------------------

    async def run_batch(
        self,
        model: CatalogModel,
        entry_lines: list[dict[str, Any]],
        batch: Batch,
        out: Path,
        report: ProgressReport,
        *,
        limit_seconds: float,
    ) -> tuple[RunResult, BatchPlan]:
        """Answer ``batch`` (its parsed lines ``entry_lines``) on the model's engine, into
        ``out``/output.jsonl.

        Raises ``engine_crashed`` (retryable) when the engine dies meanwhile, ``timeout`` past
        ``limit_seconds``.
        """
        engine = await self.acquire(model.name)
        assert engine.plan is not None
        engine.users += 1
        started = time.monotonic()
        total, done = len(batch.requests), 0
        answers: list[bytes | None] = [None] * total
        limit = asyncio.Semaphore(model.entry.warm_concurrency)
        report(
            {"stage": "inferring", "percent": 0.0, "requests_done": 0, "requests": total, "engine": "warm"}
        )

        async def answer(index: int) -> None:
            nonlocal done
            async with limit:
                answers[index] = await self._post(
                    engine, entry_lines[index], batch.requests[index].max_tokens
                )
            done += 1
            report(
                {
                    "stage": "inferring",
                    "percent": round(100.0 * done / total, 1),
                    "requests_done": done,
                    "requests": total,
                    "done": done == total,
                    "engine": "warm",
                }
            )

        try:
            async with asyncio.timeout(limit_seconds), asyncio.TaskGroup() as group:
                for index in range(total):
                    group.create_task(answer(index))
        except TimeoutError:
            raise ExecutionError(
                "timeout",
                f"the batch passed its {limit_seconds:.0f} s limit on the warm engine",
                retryable=True,
            ) from None
        except BaseExceptionGroup as failed:
            raise self._failure(engine, failed) from None
        finally:
            engine.users -= 1
            engine.last_used = self._now()
        data = b"".join(a for a in answers if a is not None)
        await asyncio.to_thread(_write_output, out, data)
        wall = time.monotonic() - started
        result = RunResult(
            exit_code=0,
            wall_seconds=wall,
            output_bytes=len(data),
            container_id="",
            image_id=engine.image,
            stderr_tail="",
        )
        return result, engine.plan

    async def _post(self, engine: _Engine, line: Mapping[str, Any], max_tokens: int) -> bytes:
        """One request to the engine, as one line of the batch output format."""
        body = dict(line["body"])
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = max_tokens  # a cold run's cap for lines that name none
        session = engine.session
        if session is None:
            raise ExecutionError("engine_crashed", "the warm engine stopped", retryable=True)
        async with session.post(f"http://engine{BATCH_URL}", json=body) as response:
            raw = await response.content.read(MAX_ANSWER_BYTES + 1)
            status = response.status
        try:
            answer: Any = json.loads(raw) if len(raw) <= MAX_ANSWER_BYTES else None
        except ValueError:
            answer = None
        token = secrets.token_hex(16)
        doc = {
            "id": f"vllm-{token}",
            "custom_id": line["custom_id"],
            "response": {"status_code": status, "request_id": f"vllm-batch-{token}", "body": answer},
            "error": None,
        }
        return json.dumps(doc, separators=(",", ":")).encode() + b"\n"

    def _failure(self, engine: _Engine, failed: BaseExceptionGroup[BaseException]) -> HearthError:
        first = failed.exceptions[0]
        if isinstance(first, HearthError):
            return first
        if isinstance(first, aiohttp.ClientError | OSError):
            # the engine is gone (or going): the next batch starts a new one rather than trying it again
            engine.state, engine.error = "failed", engine.error or f"{type(first).__name__}: {first}"[:500]
            return ExecutionError(
                "engine_crashed",
                f"the warm engine for {engine.model.name} failed mid-batch: {type(first).__name__}",
                details={"model": engine.model.name, "engine": engine.error or None},
                retryable=True,
            )
        raise first


def _write_output(out: Path, data: bytes) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / CONTAINER_OUTPUT_NAME).write_bytes(data)


def _keep_tail(lines: list[str], line: str) -> None:
    lines.append(line[-500:])
    del lines[:-20]


def engine_resources(entry: ModelSection, model_bytes: int) -> Resources:
    """What a warm engine of ``entry`` holds while it runs."""
    memory = entry.warm_memory_mb or cpu_memory_needed_mb(model_bytes)
    return Resources(cpus=entry.warm_cpus, memory_mb=memory, gpus=entry.warm_gpus)
