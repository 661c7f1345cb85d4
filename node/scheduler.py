"""The scheduler: runs accepted jobs up to the node's capacity, FIFO with per-requester fairness.

Every step is journalled before it is acted on (docs/architecture.md): ``accepted -> running`` before a
container starts, ``running -> completed`` (with the result) or ``running -> failed`` (with its domain) after
it ends. A retryable failure goes back to ``accepted`` while the retry budget lasts; a permanent one fails
once. A cancel (``running -> cancelled``, written by admission) stops the job's task, which stops its
container.

Funding: with a ``runnable`` gate (the node's payments), an accepted job is queued only once the gate
says so, i.e. once its escrow funding is confirmed; :meth:`Scheduler.admit` queues it then. An unfunded
job therefore never holds the head of the line.

Fairness: each requester DID has its own FIFO queue; the next job comes from the requester served
longest ago. When that job does not fit the free capacity the scheduler waits rather than letting
smaller jobs overtake it, so a large job is never starved.

Recovery: a job found ``running`` at start belonged to a daemon that died. Its containers are removed
(the executor finds them by label), the attempt is recorded as failed (retryable, ``node_restarted``)
and retried within the budget. Nothing it produced was published: a result is recorded only once its
artifact is stored whole. A job left ``failed``, retryable, with retries unspent (the node stopped between
a failure and its retry) is retried too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from core.errors import CapacityError, ConflictError, HearthError, IllegalTransitionError, JournalError
from core.journal import Event, JobRecord, Journal
from core.logs import enter_job
from provider.capacity import CapacityLedger, Resources

log = logging.getLogger("hearth.scheduler")

ACTOR = "scheduler"
# Progress events are journalled at most this often per job (the SSE stream reads them from the journal).
PROGRESS_INTERVAL_SECONDS = 1.0
# The message of a failure is kept short in the journal; details stay in the event.
_MESSAGE_CHARS = 500
# While the journal cannot record an attempt's step (a full disk), the attempt tries again this often.
JOURNAL_RETRY_SECONDS = 1.0

T = TypeVar("T")

ProgressReport = Callable[[Mapping[str, Any]], None]


class AttemptObserver(Protocol):
    """Told of each attempt that ended; e.g. for metrics."""

    def __call__(
        self, outcome: str, domain: str, seconds: float, *, kind: str, result: Mapping[str, Any] | None
    ) -> None:
        """``outcome`` completed/failed/cancelled, ``domain`` the failure domain or "", ``seconds`` the
        attempt's wall time, ``kind`` the job's kind, ``result`` the result document of a completed one."""


class Executor(Protocol):
    """Runs one attempt of one job and returns its result document (docs/protocol.md), or raises
    HearthError."""

    async def execute(
        self, job: JobRecord, report: ProgressReport, *, gpu_ids: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """``gpu_ids``: the devices this attempt is pinned to (as many as the job asked for)."""
        ...

    async def recover(self, running: list[JobRecord]) -> None:
        """Remove what attempts of these jobs (and any other orphan of this node) left behind."""
        ...


class Scheduler:
    """Owns the queue of accepted jobs and the tasks running them."""

    def __init__(
        self,
        journal: Journal,
        executor: Executor,
        ledger: CapacityLedger,
        capacity: Resources,
        *,
        retry_budget: int,
        gpu_ids: tuple[str, ...] = (),
        progress_interval: float = PROGRESS_INTERVAL_SECONDS,
        on_attempt: AttemptObserver | None = None,
        runnable: Callable[[str], bool] | None = None,
    ) -> None:
        self._journal = journal
        self._runnable = runnable
        self._executor = executor
        self._ledger = ledger
        self._capacity = capacity
        self._retry_budget = retry_budget
        self._progress_interval = progress_interval
        self._on_attempt = on_attempt
        # the devices jobs may be pinned to (capacity.gpus may offer fewer than the machine has), those
        # pinned to a running job, and those the GPU self-test has borrowed
        self._gpu_ids: tuple[str, ...] = gpu_ids[: capacity.gpus]
        self._pinned_gpus: set[str] = set()
        self._borrowed_gpus: set[str] = set()
        # requester DID -> its queued job ids; ordered by when the requester was last served
        self._queues: OrderedDict[str, deque[str]] = OrderedDict()
        self._queued: set[str] = set()
        self._running: dict[str, tuple[asyncio.Task[None], Resources]] = {}
        # capacity held by what is not a job (a warm engine), with the GPUs pinned to it
        self._reserved: dict[str, tuple[Resources, tuple[str, ...]]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    # -- lifetime -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover from a crash, load the queue from the journal, and start dispatching."""
        await self._recover()
        for job in sorted(self._journal.list_jobs(state="accepted", limit=1_000_000), key=_acceptance):
            if self._may_run(job.id):
                self._enqueue(job.id, job.iss)
        self._journal.add_listener(self._on_event)
        self._loop_task = asyncio.create_task(self._loop(), name="hearth-scheduler")
        self._wake.set()

    async def stop(self, grace: float = 0.0) -> None:
        """Stop dispatching; running jobs get ``grace`` seconds to finish, then are stopped.

        A stopped job stays ``running`` in the journal and is retried by the next start (see recovery).
        """
        self._journal.remove_listener(self._on_event)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        tasks = [task for task, _ in self._running.values()]
        if tasks and grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- views ----------------------------------------------------------------------------------------

    @property
    def running(self) -> list[str]:
        return list(self._running)

    @property
    def queue_depth(self) -> int:
        return len(self._queued)

    def grow(self, capacity: Resources) -> None:
        """The node's capacity grew (a cluster worker joined): larger jobs may start. It never shrinks here:
        a job waits for a lost worker's return (or its replacement) rather than failing as too large."""
        self._capacity = Resources(
            cpus=max(self._capacity.cpus, capacity.cpus),
            memory_mb=max(self._capacity.memory_mb, capacity.memory_mb),
            gpus=max(self._capacity.gpus, capacity.gpus),
        )
        self._wake.set()

    def set_gpus(self, gpu_ids: tuple[str, ...]) -> None:
        """The devices jobs may be pinned to from now on, and so the GPUs the node has: a GPU withheld by
        its health check is left out, one that passes again comes back. A job running on a device left out
        keeps it until it ends (counting against the GPUs left until then); a queued job that no longer
        fits fails as too large (admission already refuses new ones, the ledger having shrunk with the
        offer)."""
        self._gpu_ids = gpu_ids
        self._capacity = Resources(
            cpus=self._capacity.cpus, memory_mb=self._capacity.memory_mb, gpus=len(gpu_ids)
        )
        self._wake.set()

    def claim_gpu(self, gpu: str) -> bool:
        """Borrow ``gpu`` for the GPU self-test if no job is pinned to it; no job gets it until released."""
        if gpu in self._pinned_gpus or gpu in self._borrowed_gpus:
            return False
        self._borrowed_gpus.add(gpu)
        return True

    def release_gpu(self, gpu: str) -> None:
        """Give back a GPU borrowed with :meth:`claim_gpu`; a job waiting for it may start."""
        self._borrowed_gpus.discard(gpu)
        self._wake.set()

    def used(self) -> Resources:
        total = Resources(cpus=0.0, memory_mb=0, gpus=0)
        for _, need in self._running.values():
            total = total + need
        for need, _ in self._reserved.values():
            total = total + need
        return total

    def reserve(self, key: str, need: Resources) -> tuple[str, ...]:
        """Hold ``need`` for something that is not a job (a warm engine) until :meth:`unreserve`; the GPUs
        pinned to it. Refused (``CapacityError``) when it does not fit what running jobs leave free."""
        self.unreserve(key)
        if not need.fits(self._capacity - self.used()):
            raise CapacityError(
                "insufficient_capacity",
                f"{key} needs {need.to_dict()}; running jobs leave less free",
                details={"need": need.to_dict(), "free": (self._capacity - self.used()).to_dict()},
                retryable=True,
            )
        busy = self._pinned_gpus | self._borrowed_gpus
        pinned = tuple([gpu for gpu in self._gpu_ids if gpu not in busy][: need.gpus])
        self._pinned_gpus.update(pinned)
        self._reserved[key] = (need, pinned)
        return pinned

    def unreserve(self, key: str) -> None:
        held = self._reserved.pop(key, None)
        if held is not None:
            self._pinned_gpus.difference_update(held[1])
            self._wake.set()

    # -- queue ----------------------------------------------------------------------------------------

    def _enqueue(self, job: str, iss: str) -> None:
        # A job still in _running here is being retried by its own finishing task; queue it again.
        if job in self._queued:
            return
        self._queues.setdefault(iss, deque()).append(job)
        self._queued.add(job)
        self._wake.set()

    def _may_run(self, job: str) -> bool:
        return self._runnable is None or self._runnable(job)

    def admit(self, job: str) -> None:
        """Queue an accepted job that just became runnable (e.g. its escrow funding was confirmed)."""
        record = self._journal.get(job)
        if record is not None and record.state == "accepted" and self._may_run(job):
            self._enqueue(record.id, record.iss)

    def _on_event(self, event: Event) -> None:
        if event.type != "transition":
            return
        if event.to_state == "accepted":
            if self._may_run(event.job):
                record = self._journal.get(event.job)
                if record is not None:
                    self._enqueue(record.id, record.iss)
        elif event.to_state == "cancelled" and event.job in self._running:
            task, _ = self._running[event.job]
            task.cancel()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self._dispatch()
            except Exception:  # keep dispatching; the journal is the truth and the next wake retries
                log.exception("dispatch failed")

    def _dispatch(self) -> None:
        while self._queues:
            iss, queue = next(iter(self._queues.items()))
            job_id = queue[0]
            job = self._journal.get(job_id)
            if job is None or job.state != "accepted":  # cancelled or expired while queued
                self._pop(iss)
                continue
            need = Resources(cpus=job.cpus, memory_mb=job.memory_mb, gpus=job.gpus)
            if not need.fits(self._capacity):
                self._pop(iss)
                self._fail_unrunnable(job, need)
                continue
            borrowed = Resources(cpus=0.0, memory_mb=0, gpus=len(self._borrowed_gpus & set(self._gpu_ids)))
            if not need.fits(self._capacity - self.used() - borrowed):
                # wait for a running job to end (or the self-test to give its GPU back); nothing overtakes
                # the head of the line
                return
            self._pop(iss)
            if iss in self._queues:
                self._queues.move_to_end(iss)  # served now: the others go first next time
            busy = self._pinned_gpus | self._borrowed_gpus
            pinned = tuple([gpu for gpu in self._gpu_ids if gpu not in busy][: need.gpus])
            self._pinned_gpus.update(pinned)
            task = asyncio.create_task(self._run(job, pinned), name=f"hearth-job-{job.id}")
            self._running[job.id] = (task, need)

    def _pop(self, iss: str) -> None:
        queue = self._queues[iss]
        self._queued.discard(queue.popleft())
        if not queue:
            del self._queues[iss]

    def _fail_unrunnable(self, job: JobRecord, need: Resources) -> None:
        with contextlib.suppress(ConflictError, IllegalTransitionError):
            self._journal.transition(
                job.id,
                "failed",
                actor=ACTOR,
                reason=f"needs {need.to_dict()}, more than this node has ({self._capacity.to_dict()})",
                domain="scheduling",
                retryable=False,
                expect="accepted",
                fields={"failure_code": "exceeds_capacity", "failure_message": "the job can never fit"},
            )
        self._ledger.release(job.id)

    # -- one job --------------------------------------------------------------------------------------

    async def _run(self, job: JobRecord, gpu_ids: tuple[str, ...]) -> None:
        enter_job(job.id)  # this task is the attempt: every line it logs is about the job
        try:
            try:
                running, _ = await self._recorded(
                    job.id,
                    lambda: self._journal.transition(
                        job.id,
                        "running",
                        actor=ACTOR,
                        reason=f"attempt {job.attempts + 1}",
                        expect="accepted",
                    ),
                )
            except (ConflictError, IllegalTransitionError):
                return  # cancelled between dispatch and start
            started = time.monotonic()
            try:
                result = await self._executor.execute(running, self._reporter(job.id), gpu_ids=gpu_ids)
            except asyncio.CancelledError:
                self._after_cancel(job.id)
                self._observe(job, "cancelled", "", started)
                raise
            except HearthError as exc:
                await self._failed(running, exc)
                self._observe(job, "failed", exc.domain, started)
            except Exception as exc:  # a bug, not the job's fault: fail it visibly, retryable
                log.exception("job %s: executor crashed", job.id)
                await self._failed(
                    running,
                    HearthError(
                        "executor_crashed", f"the node failed running the job: {exc}", retryable=True
                    ),
                )
                self._observe(job, "failed", "internal", started)
            else:
                await self._completed(running, result)
                self._observe(job, "completed", "", started, result)
        finally:
            self._running.pop(job.id, None)
            self._pinned_gpus.difference_update(gpu_ids)
            self._wake.set()

    def _observe(
        self,
        job: JobRecord,
        outcome: str,
        domain: str,
        started: float,
        result: Mapping[str, Any] | None = None,
    ) -> None:
        if self._on_attempt is not None:
            seconds = time.monotonic() - started
            self._on_attempt(outcome, domain, seconds, kind=job.kind, result=result)

    def _reporter(self, job: str) -> ProgressReport:
        last: dict[str, Any] = {"at": 0.0, "stage": None}

        def report(data: Mapping[str, Any]) -> None:
            # A new stage is always recorded; within a stage, at most one report per interval.
            now = time.monotonic()
            same_stage = data.get("stage") == last["stage"]
            if same_stage and now - last["at"] < self._progress_interval and not data.get("done"):
                return
            last["at"], last["stage"] = now, data.get("stage")
            percent = data.get("percent")
            stage = str(data.get("stage") or "progress")
            reason = f"{stage} {percent:.0f}%" if isinstance(percent, int | float) else stage
            with contextlib.suppress(HearthError):
                self._journal.append_event(job, "progress", reason, dict(data), actor=ACTOR)

        return report

    async def _recorded(self, job: str, write: Callable[[], T]) -> T:
        """``write()`` (one step of an attempt), again every :data:`JOURNAL_RETRY_SECONDS` while the
        journal cannot record it.

        A step is a fact the node must not lose or skip: given up, the job would stay ``running`` (or
        ``accepted`` and out of the queue) with its capacity held until the next start. So the attempt
        waits, holding what it holds, until space returns; stopping the node cancels the wait and
        recovery at the next start takes over. Refusals (``ConflictError``, ``IllegalTransitionError``)
        are answers, not failures, and go to the caller.
        """
        warned = False
        while True:
            try:
                return write()
            except IllegalTransitionError:
                raise
            except JournalError as exc:
                if not exc.retryable:  # e.g. the journal closed: the node is stopping
                    raise
                if not warned:
                    log.warning(
                        "job %s: the journal cannot record the next step, retrying: %s", job, exc.message
                    )
                    warned = True
                try:
                    await asyncio.sleep(JOURNAL_RETRY_SECONDS)
                except asyncio.CancelledError:  # a requester's cancel (journalled) or the node stopping
                    self._after_cancel(job)
                    raise

    async def _completed(self, job: JobRecord, result: dict[str, Any]) -> None:
        try:
            await self._recorded(
                job.id,
                lambda: self._journal.transition(
                    job.id,
                    "completed",
                    actor=ACTOR,
                    reason=f"artifact {result.get('artifact_uri')}",
                    expect="running",
                    fields={"result_json": result},
                ),
            )
        except (ConflictError, IllegalTransitionError):
            log.info("job %s ended as %s; result dropped", job.id, self._state(job.id))
        self._ledger.release(job.id)

    async def _failed(self, job: JobRecord, exc: HearthError) -> None:
        try:
            await self._recorded(
                job.id,
                lambda: self._journal.transition(
                    job.id,
                    "failed",
                    actor=ACTOR,
                    reason=f"{exc.code}: {exc.message}"[:_MESSAGE_CHARS],
                    domain=exc.domain,
                    retryable=exc.retryable,
                    expect="running",
                    data={"code": exc.code, "details": exc.details},
                    fields={"failure_code": exc.code, "failure_message": exc.message[:_MESSAGE_CHARS]},
                ),
            )
        except (ConflictError, IllegalTransitionError):
            return  # cancelled meanwhile
        if not await self._recorded(job.id, lambda: self._retry(job.id, f"retry after {exc.code}")):
            self._ledger.release(job.id)

    def _retry(self, job: str, reason: str) -> bool:
        """``failed -> accepted`` while the failure is retryable and the budget lasts; True if retried."""
        try:
            self._journal.transition(
                job, "accepted", actor=ACTOR, reason=reason, retry_budget=self._retry_budget, expect="failed"
            )
        except (ConflictError, IllegalTransitionError):
            return False
        return True

    def _after_cancel(self, job: str) -> None:
        """The task was cancelled: by a requester's cancel (already journalled) or by the node stopping."""
        if self._state(job) == "cancelled":
            self._ledger.release(job)

    def _state(self, job: str) -> str | None:
        record = self._journal.get(job)
        return None if record is None else record.state

    # -- recovery -------------------------------------------------------------------------------------

    async def _recover(self) -> None:
        running = self._journal.list_jobs(state="running", limit=1_000_000)
        try:
            await self._executor.recover(running)
        except HearthError as exc:  # e.g. the engine is down: jobs still go back to the queue
            log.error("recovery could not clean up after the previous run: %s", exc.message)
        for job in running:
            try:
                self._journal.transition(
                    job.id,
                    "failed",
                    actor=ACTOR,
                    reason="node_restarted: the node stopped while the job ran; its container was removed",
                    domain="execution",
                    retryable=True,
                    expect="running",
                    fields={"failure_code": "node_restarted", "failure_message": "the node stopped mid-run"},
                )
            except (ConflictError, IllegalTransitionError):
                continue
            if not self._retry(job.id, "retry after node restart"):
                self._ledger.release(job.id)
            log.warning("job %s was running when the node stopped; recovered", job.id)
        self._finish_interrupted_retries()

    def _finish_interrupted_retries(self) -> None:
        """Take the retries a stop cut off: jobs ``failed``, retryable, with retries left.

        A failure and its retry are two journal writes. A node killed between them (in an attempt, or in
        the recovery above) leaves the job failed with its retries unspent, and nothing else ever picks
        it up again: the job would be lost (the kill -9 row of the fault scoreboard found one). The
        retry is what the node had decided; it is taken now, and the job's capacity held again (a failed
        job holds none when the ledger is loaded).
        """
        for job in self._journal.list_jobs(state="failed", limit=1_000_000):
            if not job.failure_retryable or job.attempts >= self._retry_budget:
                continue
            if self._retry(job.id, "retry after node restart"):
                need = Resources(cpus=job.cpus, memory_mb=job.memory_mb, gpus=job.gpus)
                self._ledger.commit(job.id, need, now=time.time(), must_fit=False)
                log.warning("job %s failed retryably and the node stopped before its retry; retried", job.id)


def _acceptance(job: JobRecord) -> tuple[float, str]:
    return (job.updated_at, job.id)
