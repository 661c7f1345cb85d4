"""The journal keeps what it committed: across restarts, under SIGKILL mid-write, over random walks of the
lifecycle with restarts, and a large journal reopens without reading its jobs.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from core.errors import IllegalTransitionError, JournalError
from core.journal import JOB_STATES, TRANSITIONS, JobRecord, JobState, Journal, is_allowed, schema
from tests.core.journal_support import (
    ISS,
    QUOTE_TTL,
    REPO,
    RETRY_BUDGET,
    T0,
    Clock,
    drive,
    make_job,
    node_id,
    replayed_state,
    step,
    step_kwargs,
)

# --------------------------------------------------------------------------------------------- restart


def test_restart_keeps_jobs_quotes_events_and_nonces(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        a = drive(j, path, "running", n=1)
        clock.t += 5
        b = make_job(j, 2).id
        j.append_event(a, "progress", "half", {"percent": 50})
        j.transition(a, "failed", actor="sandbox", reason="timeout", domain="execution", retryable=True)
        j.check_and_record(ISS, "jti-1", T0 + 900)
        jobs = {id: j.require(id) for id in (a, b)}
        events = {id: j.events(id) for id in (a, b)}
        counts = j.count_by_state()
    with Journal.open(path, synchronous="full", now=clock) as j:
        assert {id: j.require(id) for id in (a, b)} == jobs
        assert {id: j.events(id) for id in (a, b)} == events
        assert j.count_by_state() == counts
        assert j.check_and_record(ISS, "jti-1", T0 + 900) is False
        assert j.require(b).quote_jwt == "eyJ.quote.2"
        record, _ = j.transition(a, "accepted", actor="scheduler", reason="retry", retry_budget=RETRY_BUDGET)
        assert record.attempts == 1
        assert replayed_state(j.events(a)) == "accepted"


def test_closed_and_broken_journals_raise_journal_errors(tmp_path: Path, clock: Clock) -> None:
    j = Journal.open(tmp_path / "j.sqlite3", now=clock)
    j.close()
    j.close()
    with pytest.raises(JournalError) as info:
        j.get("hj_1")
    assert info.value.code == "journal_closed"

    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError) as info:
        Journal.open(garbage)
    assert info.value.code == "journal_open_failed"

    newer = tmp_path / "newer.sqlite3"
    Journal.open(newer).close()
    with sqlite3.connect(newer) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(JournalError) as info:
        Journal.open(newer)
    assert info.value.code == "journal_schema_mismatch"


def test_a_locked_database_is_a_retryable_journal_error(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock, busy_timeout_ms=20) as j:
        id = make_job(j).id
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(JournalError) as info:
                j.transition(id, "accepted", actor="node", reason="funded")
            assert (info.value.code, info.value.retryable) == ("journal_write_failed", True)
            assert not isinstance(info.value, IllegalTransitionError)
            with pytest.raises(JournalError):
                j.check_and_record(ISS, "jti", T0)
            assert j.require(id).state == "priced"  # reads still work under a writer's lock
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert j.transition(id, "accepted", actor="node", reason="funded")[0].state == "accepted"


# --------------------------------------------------------------------------------------------- kills


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from core.journal import Journal

    j = Journal.open(Path(sys.argv[1]))
    for n in range(1_000_000):
        id = f"hj_{n:026d}"
        j.create_priced(
            id=id, iss="did:key:z6Mk", job_id=f"job-{n}", kind="ffmpeg_transcode", idem_key="k",
            envelope_hash="h", envelope={"n": n}, price="1", quote_id="q", quote_jwt="jwt",
            quote_expires_at=4e9, cpus=1.0, memory_mb=64, gpus=0, actor="node", reason="quoted",
        )
        print("priced", id, flush=True)
        j.transition(id, "accepted", actor="requester", reason="funded")
        print("accepted", id, flush=True)
        j.append_event(id, "note", "between")
        j.transition(id, "running", actor="node", reason="started")
        print("running", id, flush=True)
    """
)


def _spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _check_consistent(path: Path) -> dict[str, JobRecord]:
    """Every job in the journal is whole: its events replay to its state, which is a state the API writes."""
    with Journal.open(path) as j:
        jobs = {job.id: job for job in j.list_jobs(limit=1_000_000)}
        for job in jobs.values():
            assert job.state != "created", f"{job.id}: half of create_priced is visible"
            assert replayed_state(j.events(job.id)) == job.state
    return jobs


def test_sigkill_mid_write_loses_no_committed_fact(path: Path) -> None:
    proc = _spawn(_WRITER, str(path))
    assert proc.stdout is not None
    committed: dict[str, str] = {}
    try:
        for _ in range(150):
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "writer died"
            state, id = line.split()
            committed[id] = state
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    jobs = _check_consistent(path)
    order = ["priced", "accepted", "running"]
    for id, state in committed.items():
        # The writer may have committed one more step after its last report, never fewer.
        assert order.index(jobs[id].state) >= order.index(state)
    assert len(jobs) >= len(committed)


_HALF_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from core.journal import Journal

    j = Journal.open(Path(sys.argv[1]), now=lambda: 1_800_000_000.0)
    def create(n, expires):
        j.create_priced(
            id=f"hj_{n:026d}", iss="did:key:z6Mk", job_id=f"job-{n}", kind="ffmpeg_transcode",
            idem_key="k", envelope_hash="h", envelope={}, price="1", quote_id="q", quote_jwt="jwt",
            quote_expires_at=expires, cpus=1.0, memory_mb=64, gpus=0, actor="node", reason="quoted",
        )
    for n in range(5):
        create(n, 1_800_000_000.0)  # all already due
    kill_on, kill_at, seen = sys.argv[2], int(sys.argv[3]), [0]
    def die_inside_the_transaction(sql):
        if sql.startswith(kill_on):
            seen[0] += 1
            if seen[0] == kill_at:
                os._exit(9)
    j._conn.set_trace_callback(die_inside_the_transaction)
    if kill_on.endswith("'priced'"):
        create(5, 4e9)  # dies after the insert and the 'created' event, before 'priced'
    else:
        j.expire_quotes()  # dies after moving two of five jobs
    """
)


@pytest.mark.parametrize(
    ("kill_on", "kill_at"),
    [("UPDATE jobs SET state = 'priced'", 1), ("UPDATE jobs SET state =", 3)],
    ids=["inside-create_priced", "inside-expire_quotes"],
)
def test_a_half_done_transaction_is_never_visible(path: Path, kill_on: str, kill_at: int) -> None:
    proc = _spawn(_HALF_WRITER, str(path), kill_on, str(kill_at))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 9, stderr
    jobs = _check_consistent(path)
    assert [job.state for job in jobs.values()] == ["priced"] * 5
    assert node_id(5) not in jobs
    with sqlite3.connect(path) as conn:
        orphans = conn.execute(
            "SELECT COUNT(*) FROM events WHERE job NOT IN (SELECT id FROM jobs)"
        ).fetchone()
    conn.close()
    assert orphans == (0,)


# --------------------------------------------------------------------------------------------- property


@dataclass
class ModelJob:
    state: str = "priced"
    attempts: int = 0
    retryable: bool = False
    expired_from: str | None = None


class JournalMachine(RuleBasedStateMachine):
    """Random walks over the lifecycle, with restarts, against a tiny model of what must be allowed."""

    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="journal-"))
        self.clock = Clock()
        self.journal = Journal.open(self.dir / "j.sqlite3", now=self.clock)
        self.model: dict[str, ModelJob] = {}

    def _new_job(self) -> str:
        n = len(self.model)
        job = make_job(self.journal, n, expires_at=self.clock.t + QUOTE_TTL)
        assert job == self.journal.require(job.id)  # the record a write returns is the row as read
        self.model[job.id] = ModelJob()
        return job.id

    @initialize(target=jobs)
    def first(self) -> str:
        return self._new_job()

    @rule(target=jobs)
    def create(self) -> str:
        return self._new_job()

    @rule(job=jobs, data=st.data(), retryable=st.booleans())
    def move(self, job: str, data: st.DataObject, retryable: bool) -> None:
        m = self.model[job]
        # Half the moves follow an edge of the table, so walks get deep; the rest are any state at all.
        edges: list[JobState] = sorted(TRANSITIONS.get(m.state, ()))  # type: ignore[call-overload]
        follow_edge = bool(edges) and data.draw(st.booleans())
        to = data.draw(st.sampled_from(edges if follow_edge else JOB_STATES))
        allowed = is_allowed(m.state, to)
        if m.state == "failed":
            allowed = allowed and m.retryable and m.attempts < RETRY_BUDGET
        if m.state == "expired":
            allowed = allowed and m.expired_from == "priced"
        kwargs = step_kwargs(m.state, to)
        if to == "failed":
            kwargs["retryable"] = retryable
        self.clock.t += 1
        try:
            record, event = self.journal.transition(job, to, actor="fuzz", reason="walk", **kwargs)
        except IllegalTransitionError:
            assert not allowed, f"{m.state} -> {to} was refused"
            return
        assert allowed, f"{m.state} -> {to} was written"
        assert (event.from_state, event.to_state, record.state) == (m.state, to, to)
        assert record == self.journal.require(job)  # the record a write returns is the row as read
        if to == "failed":
            m.retryable = retryable
        if m.state == "failed":
            m.attempts += 1
        if to == "expired":
            m.expired_from = m.state
        m.state = to

    @rule()
    def expire(self) -> None:
        self.clock.t += QUOTE_TTL / 2
        for record in self.journal.expire_quotes():
            assert self.model[record.id].state == "priced"
            self.model[record.id].state = "expired"
            self.model[record.id].expired_from = "priced"

    @rule()
    def restart(self) -> None:
        self.journal.close()
        self.journal = Journal.open(self.dir / "j.sqlite3", now=self.clock)

    @invariant()
    def journal_matches_model_and_replays(self) -> None:
        for id, m in self.model.items():
            record = self.journal.require(id)
            assert record.state == m.state and record.state in JOB_STATES
            assert record.attempts == m.attempts
            assert replayed_state(self.journal.events(id)) == record.state
        counts = self.journal.count_by_state()
        assert sum(counts.values()) == len(self.model)

    def teardown(self) -> None:
        self.journal.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestJournalMachine = JournalMachine.TestCase
TestJournalMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------------------------------- restart cost


def test_reopening_ten_thousand_jobs_reads_no_job_rows_and_the_ledger_uses_the_state_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restart-to-ready regression guard, by the work done rather than the seconds taken (the time itself,
    with 10k jobs, is bench/admission.py's restart-to-ready target): opening runs the same SQLite
    instructions whatever the journal holds, and the capacity ledger and the counts read an index."""
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    connect = sqlite3.connect

    def counted(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        conn.set_progress_handler(tick, 1)  # called for every instruction of SQLite's VM
        return conn

    def steps_to_open(path: Path) -> int:
        nonlocal steps
        with monkeypatch.context() as patch:
            patch.setattr(sqlite3, "connect", counted)  # meanwhile only the journal opens one
            steps = 0
            Journal.open(path).close()
            return steps

    empty, path, n_jobs = tmp_path / "empty.sqlite3", tmp_path / "full.sqlite3", 10_000
    Journal.open(empty).close()
    with Journal.open(path, now=Clock()) as j:
        for n in range(n_jobs):
            make_job(j, n, iss=f"did:key:z6Mk{n % 50}", expires_at=T0 + (QUOTE_TTL if n % 4 else -1))
        for n in range(0, n_jobs, 10):
            step(j, node_id(n), "accepted")
    assert steps_to_open(path) == steps_to_open(empty) > 0

    with Journal.open(path, now=Clock()) as j:
        held = j.held_resources(T0)
        counts = j.count_by_state()
        plans = {
            sql: [row[3] for row in j._connection().execute(f"EXPLAIN QUERY PLAN {sql}", args)]
            for sql, args in ((schema._SQL_HELD, (T0,)), (schema._SQL_COUNT_BY_STATE, ()))
        }
    assert counts["priced"] == n_jobs - n_jobs // 10 and counts["accepted"] == n_jobs // 10
    # 3 in 4 quotes are live, plus every accepted job.
    assert len(held) == sum(1 for n in range(n_jobs) if n % 10 == 0 or n % 4)
    reads = [detail for details in plans.values() for detail in details if " jobs" in detail]
    assert len(reads) == 3 and all("INDEX jobs_state" in detail for detail in reads), plans  # no row scan
