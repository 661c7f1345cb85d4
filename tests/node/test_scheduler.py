"""Scheduling rules: capacity, FIFO with per-requester fairness, retries, cancel, crash recovery.

The workload here is a scripted executor so each rule can be driven step by step; the real executor
(Docker + ffmpeg + storage) runs through the same scheduler in tests/node/test_execution.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from core.errors import ExecutionError, StorageError
from core.journal import JobRecord, Journal
from node.scheduler import ProgressReport, Scheduler
from provider.capacity import CapacityLedger, Resources

A = "did:key:z6MkA"
B = "did:key:z6MkB"


class ScriptedExecutor:
    """Runs nothing: each attempt waits until the test releases it with a result or an error."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.recovered: list[str] = []
        self.pinned: dict[str, tuple[str, ...]] = {}
        self._gates: dict[str, asyncio.Future[Any]] = {}
        self.fail_with: dict[str, Exception] = {}

    async def execute(
        self, job: JobRecord, report: ProgressReport, *, gpu_ids: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        self.started.append(job.job_id)
        self.pinned[job.job_id] = gpu_ids
        if job.job_id in self.fail_with:
            raise self.fail_with[job.job_id]
        gate = self._gates.setdefault(job.job_id, asyncio.get_running_loop().create_future())
        report({"stage": "running", "percent": 10.0})
        try:
            outcome = await gate
        except asyncio.CancelledError:
            self.cancelled.append(job.job_id)
            raise
        finally:
            self._gates.pop(job.job_id, None)
        if isinstance(outcome, Exception):
            raise outcome
        result: dict[str, Any] = {"artifact_uri": f"ipfs://{job.job_id}", "status": "completed"}
        return result

    async def recover(self, running: list[JobRecord]) -> None:
        self.recovered.extend(job.job_id for job in running)

    def finish(self, job_id: str, outcome: Any = None) -> None:
        self._gates[job_id].set_result(outcome)

    def running_now(self) -> set[str]:
        return set(self._gates)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def until(predicate: Any, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


@pytest.fixture
def journal(tmp_path: Path) -> Any:
    with Journal.open(tmp_path / "journal.sqlite3") as j:
        yield j


_count = [0]


def accept(
    j: Journal, ledger: CapacityLedger, job_id: str, *, iss: str = A, cpus: float = 1.0, gpus: int = 0
) -> str:
    _count[0] += 1
    n = _count[0]
    key = f"hj_{n:026d}"
    j.create_priced(
        id=key,
        iss=iss,
        job_id=job_id,
        kind="ffmpeg_transcode",
        idem_key=f"{n:064x}",
        envelope_hash=f"{n:064x}",
        envelope={"job_id": job_id},
        price="1.00",
        quote_id=f"q-{n}",
        quote_jwt=f"eyJ.q.{n}",
        quote_expires_at=time.time() + 300,
        cpus=cpus,
        memory_mb=256,
        gpus=gpus,
        actor=iss,
        reason="quoted",
    )
    ledger.reserve(key, Resources(cpus=cpus, memory_mb=256, gpus=gpus), None)
    j.transition(key, "accepted", actor=iss, reason="accepted", expect="priced")
    return key


def make(
    journal: Journal, executor: ScriptedExecutor, *, cpus: float = 2.0, budget: int = 2
) -> tuple[Scheduler, CapacityLedger]:
    capacity = Resources(cpus=cpus, memory_mb=8192, gpus=0)
    ledger = CapacityLedger(Resources(cpus=100, memory_mb=100_000, gpus=0))
    return Scheduler(journal, executor, ledger, capacity, retry_budget=budget, progress_interval=0.0), ledger


async def test_runs_up_to_capacity_and_starts_the_next_when_one_ends(journal: Journal) -> None:
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex, cpus=2.0)
    keys = [accept(journal, ledger, f"j{i}") for i in range(3)]
    await sched.start()
    try:
        await until(lambda: ex.running_now() == {"j0", "j1"})
        await settle()
        assert ex.started == ["j0", "j1"] and sched.queue_depth == 1
        assert [journal.require(k).state for k in keys] == ["running", "running", "accepted"]
        ex.finish("j0")
        await until(lambda: "j2" in ex.running_now())
        done = journal.require(keys[0])
        assert done.state == "completed" and done.result == {
            "artifact_uri": "ipfs://j0",
            "status": "completed",
        }
        assert keys[0] not in ledger  # its capacity hold ended with it
        ex.finish("j1")
        ex.finish("j2")
        await until(lambda: all(journal.require(k).state == "completed" for k in keys))
    finally:
        await sched.stop()


async def test_requesters_take_turns_and_the_head_of_the_line_is_not_overtaken(journal: Journal) -> None:
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex, cpus=1.0)
    for i in range(3):
        accept(journal, ledger, f"a{i}", iss=A)
    accept(journal, ledger, "b0", iss=B)
    await sched.start()
    try:
        for expected in ["a0", "b0", "a1", "a2"]:
            await until(lambda e=expected: e in ex.running_now())  # type: ignore[misc]
            ex.finish(expected)
        await until(lambda: len(ex.started) == 4)
        assert ex.started == ["a0", "b0", "a1", "a2"]

        # a big job at the head waits for room; a small one queued behind it does not jump ahead
        big = accept(journal, ledger, "big", iss=A, cpus=1.0)
        accept(journal, ledger, "small", iss=B, cpus=0.5)
        await until(lambda: "big" in ex.running_now())
        await settle()
        assert "small" not in ex.running_now() and journal.require(big).state == "running"
        ex.finish("big")
        await until(lambda: "small" in ex.running_now())
        ex.finish("small")
    finally:
        await sched.stop()


async def test_retryable_failures_retry_within_the_budget_then_fail(journal: Journal) -> None:
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex, budget=2)
    key = accept(journal, ledger, "flaky")
    ex.fail_with["flaky"] = StorageError("gateway_unreachable", "no gateway answered", retryable=True)
    await sched.start()
    try:
        await until(lambda: journal.require(key).state == "failed" and key not in ledger)
        job = journal.require(key)
        assert ex.started == ["flaky"] * 3  # the first attempt and two retries
        assert (job.attempts, job.failure_domain, job.failure_code, job.failure_retryable) == (
            2,
            "storage",
            "gateway_unreachable",
            True,
        )
        moves = [(e.from_state, e.to_state) for e in journal.events(key) if e.type == "transition"]
        assert moves.count(("failed", "accepted")) == 2
    finally:
        await sched.stop()


async def test_a_permanent_failure_fails_once_with_its_domain(journal: Journal) -> None:
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex)
    key = accept(journal, ledger, "oom")
    ex.fail_with["oom"] = ExecutionError("oom_killed", "the job ran out of memory", retryable=False)
    await sched.start()
    try:
        await until(lambda: journal.require(key).state == "failed")
        await settle()
        job = journal.require(key)
        assert ex.started == ["oom"]
        assert (job.failure_domain, job.failure_code, job.failure_retryable) == (
            "execution",
            "oom_killed",
            False,
        )
        failed = next(e for e in journal.events(key) if e.to_state == "failed")
        assert failed.domain == "execution" and failed.data == {"code": "oom_killed", "details": {}}
    finally:
        await sched.stop()


async def test_cancel_stops_a_running_job_and_frees_its_capacity(journal: Journal) -> None:
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex, cpus=1.0)
    key = accept(journal, ledger, "long")
    queued = accept(journal, ledger, "next")
    await sched.start()
    try:
        await until(lambda: "long" in ex.running_now())
        journal.transition(key, "cancelled", actor=A, reason="cancelled by requester", expect="running")
        ledger.release(key)  # as admission.cancel does
        await until(lambda: ex.cancelled == ["long"])
        await until(lambda: "next" in ex.running_now())  # its room went to the next job
        assert journal.require(key).state == "cancelled"
        ex.finish("next")
        await until(lambda: journal.require(queued).state == "completed")
    finally:
        await sched.stop()


async def test_a_job_cancelled_while_queued_never_starts(journal: Journal) -> None:
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex, cpus=1.0)
    accept(journal, ledger, "first")
    second = accept(journal, ledger, "second")
    await sched.start()
    try:
        await until(lambda: "first" in ex.running_now())
        journal.transition(second, "cancelled", actor=A, reason="cancelled", expect="accepted")
        ex.finish("first")
        await settle()
        await asyncio.sleep(0.05)
        assert ex.started == ["first"] and sched.queue_depth == 0
    finally:
        await sched.stop()


async def test_a_job_running_when_the_node_died_is_cleaned_up_and_retried(journal: Journal) -> None:
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex)
    key = accept(journal, ledger, "orphan")
    journal.transition(key, "running", actor="scheduler", reason="attempt 1", expect="accepted")
    await sched.start()  # as after kill -9: the journal says running, no task runs it
    try:
        assert ex.recovered == ["orphan"]
        await until(lambda: "orphan" in ex.running_now())
        ex.finish("orphan")
        await until(lambda: journal.require(key).state == "completed")
        job = journal.require(key)
        assert job.attempts == 1
        assert journal.events(key)[-1].to_state == "completed"
        failed = next(e for e in journal.events(key) if e.to_state == "failed")
        assert failed.reason.startswith("node_restarted") and failed.retryable is True
    finally:
        await sched.stop()


async def test_a_retry_cut_off_by_a_crash_is_taken_at_the_next_start(journal: Journal) -> None:
    """A kill -9 between a retryable failure and its retry (two journal writes) must not lose the job;
    failures that rest (not retryable, or retries spent) stay as they are."""
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex, budget=2)

    def fail(key: str, *, retryable: bool = True) -> None:
        journal.transition(key, "running", actor="scheduler", reason="attempt", expect="accepted")
        journal.transition(
            key,
            "failed",
            actor="scheduler",
            reason="x",
            domain="execution",
            retryable=retryable,
            expect="running",
        )

    cut, spent, permanent = (accept(journal, ledger, name) for name in ("cut", "spent", "permanent"))
    fail(cut)  # ... and the node died before the retry
    for _ in range(2):
        fail(spent)
        journal.transition(
            spent, "accepted", actor="scheduler", reason="retry", retry_budget=2, expect="failed"
        )
    fail(spent)
    fail(permanent, retryable=False)
    for key in (cut, spent, permanent):
        ledger.release(key)  # a failed job holds nothing when the ledger is loaded at start
    await sched.start()
    try:
        await until(lambda: "cut" in ex.running_now())
        assert cut in ledger  # its capacity is held again while it runs
        ex.finish("cut")
        await until(lambda: journal.require(cut).state == "completed")
        assert journal.require(cut).attempts == 1
        assert [journal.require(k).state for k in (spent, permanent)] == ["failed", "failed"]
        assert ex.started == ["cut"]
    finally:
        await sched.stop()


async def test_a_job_larger_than_the_node_fails_in_scheduling(journal: Journal) -> None:
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex, cpus=1.0)
    key = accept(journal, ledger, "huge", cpus=4.0)
    small = accept(journal, ledger, "small", cpus=0.5)
    await sched.start()
    try:
        await until(lambda: journal.require(key).state == "failed")
        job = journal.require(key)
        assert (job.failure_domain, job.failure_code, job.failure_retryable) == (
            "scheduling",
            "exceeds_capacity",
            False,
        )
        await until(lambda: "small" in ex.running_now())
        ex.finish("small")
        await until(lambda: journal.require(small).state == "completed")
    finally:
        await sched.stop()


async def test_progress_reports_become_journal_events(journal: Journal) -> None:
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex)
    key = accept(journal, ledger, "p")
    await sched.start()
    try:
        await until(lambda: "p" in ex.running_now())
        progress = [e for e in journal.events(key) if e.type == "progress"]
        assert progress and progress[0].data == {"stage": "running", "percent": 10.0}
        assert progress[0].reason == "running 10%"
        ex.finish("p")
    finally:
        await sched.stop()


async def test_stop_leaves_running_jobs_for_the_next_start(journal: Journal) -> None:
    ex = ScriptedExecutor()
    sched, ledger = make(journal, ex)
    key = accept(journal, ledger, "halted")
    await sched.start()
    await until(lambda: "halted" in ex.running_now())
    await sched.stop()
    assert ex.cancelled == ["halted"] and journal.require(key).state == "running"
    ex2 = ScriptedExecutor()
    sched2 = Scheduler(journal, ex2, ledger, Resources(cpus=2, memory_mb=8192, gpus=0), retry_budget=2)
    await sched2.start()
    try:
        assert ex2.recovered == ["halted"]
        await until(lambda: "halted" in ex2.running_now())
        ex2.finish("halted")
        await until(lambda: journal.require(key).state == "completed")
    finally:
        await sched2.stop()


async def test_the_gpu_selftest_borrows_a_free_gpu_and_a_job_waits_for_it(journal: Journal) -> None:
    ex = ScriptedExecutor()
    ledger = CapacityLedger(Resources(cpus=100, memory_mb=100_000, gpus=8))
    capacity = Resources(cpus=8, memory_mb=8192, gpus=2)
    sched = Scheduler(journal, ex, ledger, capacity, retry_budget=0, gpu_ids=("0", "1"))
    await sched.start()
    try:
        assert sched.claim_gpu("0") and not sched.claim_gpu("0")  # borrowed once, not twice
        accept(journal, ledger, "g1", gpus=1)
        await until(lambda: "g1" in ex.running_now())
        assert ex.pinned["g1"] == ("1",)  # the borrowed GPU is not given to a job
        assert not sched.claim_gpu("1")  # nor is a job's GPU lent to the self-test
        accept(journal, ledger, "g2", gpus=1)
        await settle()
        assert (
            "g2" not in ex.running_now()
        )  # both GPUs busy: it waits (it fits the node, so it is not failed)
        sched.release_gpu("0")
        await until(lambda: "g2" in ex.running_now())
        assert ex.pinned["g2"] == ("0",)
        ex.finish("g1")
        ex.finish("g2")
        await until(lambda: not ex.running_now())
        assert sched.claim_gpu("1")
        sched.release_gpu("1")
    finally:
        await sched.stop()


async def test_withheld_gpus_are_pinned_to_no_job_until_they_come_back(journal: Journal) -> None:
    ex = ScriptedExecutor()
    ledger = CapacityLedger(Resources(cpus=100, memory_mb=100_000, gpus=8))
    capacity = Resources(cpus=8, memory_mb=8192, gpus=2)
    sched = Scheduler(journal, ex, ledger, capacity, retry_budget=0, gpu_ids=("0", "1"))
    await sched.start()
    try:
        sched.set_gpus(("1",))  # GPU 0 failed its health check
        accept(journal, ledger, "g1", gpus=1)
        await until(lambda: "g1" in ex.running_now())
        assert ex.pinned["g1"] == ("1",)
        too_big = accept(journal, ledger, "g2", gpus=2)  # more GPUs than the node has now
        await until(lambda: journal.require(too_big).state == "failed")
        assert journal.require(too_big).failure_code == "exceeds_capacity"
        sched.set_gpus(("0", "1"))  # it passed again
        accept(journal, ledger, "g3", gpus=1)
        await until(lambda: "g3" in ex.running_now())
        assert ex.pinned["g3"] == ("0",)
        ex.finish("g1")
        ex.finish("g3")
    finally:
        await sched.stop()


async def test_gpu_jobs_are_pinned_to_distinct_devices_and_wait_for_a_free_one(journal: Journal) -> None:
    ex = ScriptedExecutor()
    ledger = CapacityLedger(Resources(cpus=100, memory_mb=100_000, gpus=8))
    capacity = Resources(cpus=8, memory_mb=8192, gpus=2)
    sched = Scheduler(journal, ex, ledger, capacity, retry_budget=0, gpu_ids=("0", "1", "2"))
    accept(journal, ledger, "g1", gpus=1)
    accept(journal, ledger, "g2", gpus=1)
    accept(journal, ledger, "g3", gpus=1)
    accept(journal, ledger, "cpu", gpus=0)
    await sched.start()
    try:
        await until(lambda: {"g1", "g2"} <= ex.running_now())
        await settle()
        # two GPUs offered (the third device is not): g3 waits, and holds the line
        assert ex.pinned["g1"] != ex.pinned["g2"] and {*ex.pinned["g1"], *ex.pinned["g2"]} == {"0", "1"}
        assert "g3" not in ex.running_now()
        ex.finish("g1")
        await until(lambda: "g3" in ex.running_now())
        assert ex.pinned["g3"] == ex.pinned["g1"]  # the device g1 gave back
        await until(lambda: "cpu" in ex.running_now())
        assert ex.pinned["cpu"] == ()
        for job in ("g2", "g3", "cpu"):
            ex.finish(job)
    finally:
        await sched.stop()
