"""The job journal: lifecycle enforcement (Python and SQLite), durability across restarts and kills, speed."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

import core.journal as journal_module
from core.errors import ConflictError, IllegalTransitionError, JournalError, NotFoundError
from core.journal import (
    JOB_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    Event,
    JobRecord,
    JobState,
    Journal,
    is_allowed,
)

REPO = Path(__file__).resolve().parents[2]
ISS = "did:key:z6MkRequesterAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
OTHER_ISS = "did:key:z6MkRequesterBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
T0 = 1_800_000_000.0
QUOTE_TTL = 300.0
RETRY_BUDGET = 2

ALLOWED = sorted((src, dst) for src, dsts in TRANSITIONS.items() for dst in dsts)
ILLEGAL = sorted((src, dst) for src in JOB_STATES for dst in JOB_STATES if not is_allowed(src, dst))

# The shortest legal route from 'priced' to each state; 'created' is reached by a raw insert instead.
ROUTES: dict[str, list[JobState]] = {
    "priced": [],
    "accepted": ["accepted"],
    "running": ["accepted", "running"],
    "completed": ["accepted", "running", "completed"],
    "validated": ["accepted", "running", "completed", "validated"],
    "settled": ["accepted", "running", "completed", "validated", "settled"],
    "disputed": ["accepted", "running", "completed", "disputed"],
    "refunded": ["accepted", "running", "completed", "disputed", "refunded"],
    "rejected": ["rejected"],
    "expired": ["expired"],
    "cancelled": ["cancelled"],
    "failed": ["accepted", "failed"],
}


class Clock:
    """A settable stand-in for ``time.time`` so quote expiry is deterministic."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite3"


@pytest.fixture
def journal(path: Path, clock: Clock) -> Any:
    with Journal.open(path, now=clock) as j:
        yield j


def node_id(n: int) -> str:
    return f"hj_{n:026d}"


def make_job(
    j: Journal,
    n: int = 0,
    *,
    iss: str = ISS,
    expires_at: float = T0 + QUOTE_TTL,
    cpus: float = 1.0,
    memory_mb: int = 512,
    gpus: int = 0,
) -> JobRecord:
    return j.create_priced(
        id=node_id(n),
        iss=iss,
        job_id=f"job-{n}",
        kind="ffmpeg_transcode",
        idem_key=f"{n:064x}",
        envelope_hash=f"{n + 1:064x}",
        envelope={"job_id": f"job-{n}", "kind": "ffmpeg_transcode", "limits": {"cpus": cpus}},
        price="1.25",
        quote_id=f"q-{n}",
        quote_jwt=f"eyJ.quote.{n}",
        quote_expires_at=expires_at,
        cpus=cpus,
        memory_mb=memory_mb,
        gpus=gpus,
        actor="node",
        reason="quoted",
    )


def step_kwargs(src: str, to: str) -> dict[str, Any]:
    """What a caller must pass for ``src -> to`` besides actor and reason."""
    kwargs: dict[str, Any] = {}
    if to == "failed":
        kwargs.update(domain="execution", retryable=True)
        kwargs["fields"] = {"failure_code": "oom_killed", "failure_message": "the job ran out of memory"}
    if to == "completed":
        kwargs["fields"] = {"result_json": {"cost": "1.00", "outputs": [{"cid": "bafy", "bytes": 12}]}}
    if src == "failed":
        kwargs["retry_budget"] = RETRY_BUDGET
    if src == "expired":
        kwargs["fields"] = {
            "price": "1.50",
            "quote_id": "q-requote",
            "quote_jwt": "eyJ.requote",
            "quote_expires_at": T0 + 2 * QUOTE_TTL,
        }
    return kwargs


def step(j: Journal, id: str, to: JobState) -> tuple[JobRecord, Event]:
    src = j.require(id).state
    return j.transition(id, to, actor="test", reason=f"to {to}", **step_kwargs(src, to))


def insert_created(path: Path, n: int) -> str:
    """A job left in 'created' (the API always records created+priced together), via raw SQL."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO jobs (id, iss, job_id, kind, idem_key, envelope_hash, envelope_json, state, cpus, "
            "memory_mb, gpus, attempts, created_at, updated_at) "
            "VALUES (?, ?, ?, 'ffmpeg_transcode', 'k', 'h', '{}', 'created', 1, 64, 0, 0, ?, ?)",
            (node_id(n), ISS, f"job-{n}", T0, T0),
        )
        conn.execute(
            "INSERT INTO events (job, at, type, from_state, to_state, actor, reason) "
            "VALUES (?, ?, 'transition', NULL, 'created', 'test', 'raw')",
            (node_id(n), T0),
        )
    conn.close()
    return node_id(n)


def drive(j: Journal, path: Path, state: str, n: int = 0) -> str:
    """Bring a fresh job to ``state`` along legal transitions; return its id."""
    if state == "created":
        return insert_created(path, n)
    id = make_job(j, n).id
    for to in ROUTES[state]:
        step(j, id, to)
    assert j.require(id).state == state
    return id


def replayed_state(events: list[Event]) -> str | None:
    """Fold a job's transition events, checking each links to the last and is allowed."""
    state: str | None = None
    for event in events:
        if event.type != "transition":
            continue
        assert event.from_state == state, f"event {event.seq} starts at {event.from_state}, not {state}"
        assert event.to_state is not None
        if state is None:
            assert event.to_state == "created"
        else:
            assert is_allowed(state, event.to_state)
        state = event.to_state
    return state


# --------------------------------------------------------------------------------------------- the table


def test_transition_table_is_the_designed_lifecycle() -> None:
    assert {src: set(dsts) for src, dsts in TRANSITIONS.items()} == {
        "created": {"priced", "rejected"},
        "priced": {"accepted", "expired", "rejected", "cancelled"},
        "accepted": {"running", "cancelled", "failed", "expired"},
        "running": {"completed", "failed", "cancelled"},
        "completed": {"validated", "disputed"},
        "validated": {"settled"},
        "disputed": {"refunded"},
        "failed": {"accepted"},
        "expired": {"priced"},
    }
    assert {"settled", "refunded", "rejected", "cancelled"} == TERMINAL_STATES
    assert len(ALLOWED) == 19


def test_database_table_is_filled_from_the_python_mapping(journal: Journal, path: Path) -> None:
    with sqlite3.connect(path) as conn:
        stored = set(conn.execute("SELECT from_state, to_state FROM transitions").fetchall())
    conn.close()
    assert stored == set(ALLOWED)


def test_reopen_rederives_a_tampered_transitions_table(path: Path, clock: Clock) -> None:
    Journal.open(path, now=clock).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO transitions VALUES ('settled', 'running')")
        conn.execute("DELETE FROM transitions WHERE from_state = 'priced' AND to_state = 'accepted'")
    conn.close()
    with Journal.open(path, now=clock) as j:
        id = make_job(j).id
        assert step(j, id, "accepted")[0].state == "accepted"
    with sqlite3.connect(path) as conn:
        assert set(conn.execute("SELECT from_state, to_state FROM transitions").fetchall()) == set(ALLOWED)
    conn.close()


# --------------------------------------------------------------------------------------------- transitions


def test_create_priced_records_created_then_priced(journal: Journal, clock: Clock) -> None:
    job = make_job(journal, cpus=2.5, memory_mb=4096, gpus=1)
    assert job.state == "priced"
    assert (job.price, job.quote_id, job.quote_jwt, job.quote_expires_at) == (
        "1.25",
        "q-0",
        "eyJ.quote.0",
        T0 + QUOTE_TTL,
    )
    assert job.resources == (2.5, 4096, 1)
    assert job.envelope == {"job_id": "job-0", "kind": "ffmpeg_transcode", "limits": {"cpus": 2.5}}
    assert job.attempts == 0 and job.created_at == job.updated_at == T0
    events = journal.events(job.id)
    assert [(e.type, e.from_state, e.to_state, e.actor) for e in events] == [
        ("transition", None, "created", "node"),
        ("transition", "created", "priced", "node"),
    ]
    assert events[0].seq < events[1].seq
    assert journal.find(ISS, "job-0") == job == journal.get(job.id) == journal.require(job.id)


@pytest.mark.parametrize(("src", "dst"), ALLOWED, ids=[f"{a}->{b}" for a, b in ALLOWED])
def test_every_allowed_transition_is_recorded(journal: Journal, path: Path, src: str, dst: JobState) -> None:
    id = drive(journal, path, src)
    before = journal.events(id)
    record, event = journal.transition(
        id, dst, actor="tester", reason="because", data={"k": 1}, **step_kwargs(src, dst)
    )
    assert record.state == dst == journal.require(id).state
    assert (event.type, event.from_state, event.to_state, event.actor, event.reason, event.data) == (
        "transition",
        src,
        dst,
        "tester",
        "because",
        {"k": 1},
    )
    assert journal.events(id) == [*before, event]
    assert replayed_state(journal.events(id)) == dst


@pytest.mark.parametrize(("src", "dst"), ILLEGAL, ids=[f"{a}->{b}" for a, b in ILLEGAL])
def test_illegal_transition_raises_and_writes_nothing(
    journal: Journal, path: Path, src: str, dst: JobState
) -> None:
    id = drive(journal, path, src)
    before_job, before_events = journal.require(id), journal.events(id)
    with pytest.raises(IllegalTransitionError) as info:
        journal.transition(id, dst, actor="tester", reason="nope", domain="execution", retryable=True)
    assert info.value.code == "illegal_transition"
    assert info.value.details == {"id": id, "from": src, "to": dst}
    assert info.value.retryable is False
    assert journal.require(id) == before_job
    assert journal.events(id) == before_events


def test_raw_sql_cannot_write_an_illegal_transition(journal: Journal, path: Path) -> None:
    id = make_job(journal).id
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="illegal_transition"):
            conn.execute("UPDATE jobs SET state = 'settled' WHERE id = ?", (id,))
        with pytest.raises(sqlite3.IntegrityError, match="illegal_transition"):
            conn.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (id,))
        with pytest.raises(sqlite3.IntegrityError, match="a job starts as created"):
            conn.execute(
                "INSERT INTO jobs (id, iss, job_id, kind, idem_key, envelope_hash, envelope_json, state, "
                "cpus, memory_mb, gpus, created_at, updated_at) "
                "VALUES ('hj_x', 'i', 'j', 'k', 'k', 'h', '{}', 'settled', 1, 1, 0, 0, 0)"
            )
        with pytest.raises(sqlite3.IntegrityError, match="illegal_transition"):  # not even a state
            conn.execute("UPDATE jobs SET state = 'bogus' WHERE id = ?", (id,))
        conn.rollback()
        # The guard is precise: a legal move passes through it.
        conn.execute("UPDATE jobs SET state = 'accepted' WHERE id = ?", (id,))
        conn.commit()
    finally:
        conn.close()
    assert journal.require(id).state == "accepted"


def test_events_are_append_only(journal: Journal, path: Path) -> None:
    id = make_job(journal).id
    before = journal.events(id)
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="events_append_only"):
            conn.execute("UPDATE events SET reason = 'rewritten' WHERE job = ?", (id,))
        with pytest.raises(sqlite3.IntegrityError, match="events_append_only"):
            conn.execute("DELETE FROM events WHERE job = ?", (id,))
        conn.rollback()
    finally:
        conn.close()
    assert journal.events(id) == before


def test_failed_requires_domain_and_retryable(journal: Journal, path: Path) -> None:
    id = drive(journal, path, "running")
    before = journal.events(id)
    with pytest.raises(ValueError, match="domain"):
        journal.transition(id, "failed", actor="node", reason="boom", retryable=True)
    with pytest.raises(ValueError, match="domain"):
        journal.transition(id, "failed", actor="node", reason="boom", domain="execution")
    with pytest.raises(ValueError, match="unknown failure domain"):
        journal.transition(
            id,
            "failed",
            actor="node",
            reason="boom",
            domain="weather",  # type: ignore[arg-type]
            retryable=True,
        )
    assert journal.events(id) == before and journal.require(id).state == "running"

    record, event = journal.transition(
        id,
        "failed",
        actor="sandbox",
        reason="container exited 137",
        domain="execution",
        retryable=False,
        fields={"failure_code": "oom_killed", "failure_message": "memory limit reached"},
    )
    assert (record.failure_domain, record.failure_retryable) == ("execution", False)
    assert (record.failure_code, record.failure_message) == ("oom_killed", "memory limit reached")
    assert (event.domain, event.retryable) == ("execution", False)


def test_retry_increments_attempts_within_the_budget(journal: Journal, path: Path) -> None:
    id = drive(journal, path, "failed")
    with pytest.raises(ValueError, match="retry_budget"):
        journal.transition(id, "accepted", actor="scheduler", reason="retry")
    record, _ = journal.transition(
        id, "accepted", actor="scheduler", reason="retry", retry_budget=2, fields={"attempts": 1}
    )
    assert (record.state, record.attempts) == ("accepted", 1)
    step(journal, id, "failed")
    # Without an explicit attempts field the journal counts the retry itself.
    record, _ = journal.transition(id, "accepted", actor="scheduler", reason="retry", retry_budget=2)
    assert record.attempts == 2
    step(journal, id, "running")
    step(journal, id, "failed")
    before = journal.events(id)
    with pytest.raises(IllegalTransitionError) as info:
        journal.transition(id, "accepted", actor="scheduler", reason="retry", retry_budget=2)
    assert info.value.code == "retry_budget_exhausted"
    assert info.value.details["attempts"] == 2
    assert journal.events(id) == before and journal.require(id).state == "failed"


def test_a_non_retryable_failure_is_never_retried(journal: Journal, path: Path) -> None:
    id = drive(journal, path, "accepted")
    journal.transition(id, "failed", actor="node", reason="unfunded", domain="funding", retryable=False)
    with pytest.raises(IllegalTransitionError) as info:
        journal.transition(id, "accepted", actor="scheduler", reason="retry", retry_budget=5)
    assert info.value.code == "failure_not_retryable"
    assert journal.require(id).state == "failed"


def test_requote_only_of_a_never_accepted_quote(journal: Journal, path: Path, clock: Clock) -> None:
    fresh = drive(journal, path, "expired", n=1)
    with pytest.raises(ValueError, match="re-quote"):
        journal.transition(fresh, "priced", actor="node", reason="requote", fields={"price": "2"})
    record, _ = step(journal, fresh, "priced")
    assert (record.state, record.price, record.quote_id, record.quote_expires_at) == (
        "priced",
        "1.50",
        "q-requote",
        T0 + 2 * QUOTE_TTL,
    )

    lapsed = drive(journal, path, "accepted", n=2)
    step(journal, lapsed, "expired")  # funding never arrived
    with pytest.raises(IllegalTransitionError) as info:
        step(journal, lapsed, "priced")
    assert info.value.code == "requote_after_accept"
    assert journal.require(lapsed).state == "expired"


def test_expect_guards_against_a_changed_state(journal: Journal) -> None:
    id = make_job(journal).id
    with pytest.raises(ConflictError) as info:
        journal.transition(id, "cancelled", actor="requester", reason="cancel", expect="accepted")
    assert info.value.code == "state_changed" and info.value.details["state"] == "priced"
    record, _ = journal.transition(
        id, "cancelled", actor="requester", reason="cancel", expect=("priced", "accepted")
    )
    assert record.state == "cancelled"


def test_fields_are_whitelisted_and_validated(journal: Journal, path: Path) -> None:
    id = drive(journal, path, "running")
    with pytest.raises(ValueError, match="cpus"):
        journal.transition(
            id,
            "completed",
            actor="node",
            reason="done",
            fields={"cpus": 64},  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="price"):
        journal.transition(id, "completed", actor="node", reason="done", fields={"price": "1e3"})
    with pytest.raises(ValueError, match="unknown job state"):
        journal.transition(id, "done", actor="node", reason="done")  # type: ignore[arg-type]
    assert journal.require(id).state == "running"
    result = {"job_id": "job-0", "status": "completed", "cost": "1.10"}
    record, _ = journal.transition(
        id, "completed", actor="node", reason="done", fields={"result_json": result, "price": "1.10"}
    )
    assert record.result == result and record.price == "1.10"


def test_missing_jobs(journal: Journal) -> None:
    assert journal.get("hj_missing") is None and journal.find(ISS, "nope") is None
    for call in (
        lambda: journal.require("hj_missing"),
        lambda: journal.transition("hj_missing", "accepted", actor="x", reason="y"),
        lambda: journal.append_event("hj_missing", "progress", "50%"),
    ):
        with pytest.raises(NotFoundError) as info:
            call()
        assert info.value.code == "job_not_found"


def test_duplicate_job_is_a_conflict_and_writes_nothing(journal: Journal) -> None:
    first = make_job(journal)
    seq_before = journal.events(first.id)[-1].seq
    with pytest.raises(ConflictError) as info:
        make_job(journal)  # same id, same (iss, job_id)
    assert info.value.code == "job_exists"
    with pytest.raises(ConflictError, match="already recorded"):
        journal.create_priced(
            **{**_create_args(7), "job_id": "job-0"}  # a new node id, but (iss, job_id) is taken
        )
    assert journal.get(node_id(7)) is None
    assert journal.require(first.id) == first
    make_job(journal, 1)  # the journal still works, and no sequence number was spent on the failures
    assert journal.events(node_id(1))[0].seq == seq_before + 1
    # job_id is unique per requester only: another DID may use the same name.
    other = journal.create_priced(**{**_create_args(8), "iss": OTHER_ISS, "job_id": "job-0"})
    assert journal.find(OTHER_ISS, "job-0") == other


def _create_args(n: int) -> dict[str, Any]:
    return {
        "id": node_id(n),
        "iss": ISS,
        "job_id": f"job-{n}",
        "kind": "ffmpeg_transcode",
        "idem_key": "k",
        "envelope_hash": "h",
        "envelope": {},
        "price": "1",
        "quote_id": "q",
        "quote_jwt": "jwt",
        "quote_expires_at": T0 + QUOTE_TTL,
        "cpus": 1.0,
        "memory_mb": 64,
        "gpus": 0,
        "actor": "node",
        "reason": "quoted",
    }


# --------------------------------------------------------------------------------------------- events


def test_progress_events_and_paging(journal: Journal) -> None:
    id = make_job(journal).id
    step(journal, id, "accepted")
    step(journal, id, "running")
    progress = [journal.append_event(id, "progress", f"{p}%", {"percent": p}) for p in (25, 50, 75)]
    note = journal.append_event(id, "note", "input fetched", actor="storage")
    assert journal.require(id).state == "running"
    assert [(e.type, e.from_state, e.to_state) for e in progress] == [("progress", None, None)] * 3
    assert note.actor == "storage" and note.data is None
    all_events = journal.events(id)
    assert len(all_events) == 8 and all_events[-4:] == [*progress, note]
    assert journal.events(id, after_seq=all_events[3].seq) == all_events[4:]
    assert journal.events(id, after_seq=all_events[3].seq, limit=2) == all_events[4:6]
    assert progress[0].as_dict()["data"] == {"percent": 25} and progress[0].as_dict()["from"] is None
    with pytest.raises(ValueError):
        journal.append_event(id, "transition", "sneaky")  # type: ignore[arg-type]


def test_listeners_see_each_committed_event_once(journal: Journal, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("subscriber went away")

    journal.add_listener(broken)
    journal.add_listener(seen.append)
    with caplog.at_level(logging.ERROR, logger="core.journal"):
        id = make_job(journal).id
        step(journal, id, "accepted")
    assert [(e.from_state, e.to_state) for e in seen] == [
        (None, "created"),
        ("created", "priced"),
        ("priced", "accepted"),
    ]
    assert seen == journal.events(id)
    assert "subscriber went away" in caplog.text
    with pytest.raises(IllegalTransitionError):
        journal.transition(id, "settled", actor="x", reason="y")
    assert len(seen) == 3  # nothing is announced for a write that did not happen
    journal.remove_listener(seen.append)
    journal.append_event(id, "note", "quiet")
    assert len(seen) == 3


# --------------------------------------------------------------------------------------------- capacity


def test_held_resources_and_active_count(journal: Journal, path: Path, clock: Clock) -> None:
    live = make_job(journal, 1, cpus=1, memory_mb=100, gpus=0).id
    lapsing = make_job(journal, 2, expires_at=T0 + 10, cpus=2, memory_mb=200).id
    accepted = make_job(journal, 3, cpus=4, memory_mb=400, gpus=1).id
    step(journal, accepted, "accepted")
    running = make_job(journal, 4, iss=OTHER_ISS, cpus=8, memory_mb=800).id
    step(journal, running, "accepted")
    step(journal, running, "running")
    done = make_job(journal, 5).id
    for to in ROUTES["completed"]:
        step(journal, done, to)
    cancelled = make_job(journal, 6).id
    step(journal, cancelled, "cancelled")

    held = sorted(journal.held_resources(T0))
    assert held == sorted(
        [
            (live, 1.0, 100, 0, T0 + QUOTE_TTL, ISS),
            (lapsing, 2.0, 200, 0, T0 + 10, ISS),
            (accepted, 4.0, 400, 1, None, ISS),  # held until it moves on, not until its old quote's expiry
            (running, 8.0, 800, 0, None, OTHER_ISS),
        ]
    )
    # A quote stops holding the moment it expires, before expire_quotes has even run.
    assert lapsing not in {h[0] for h in journal.held_resources(T0 + 10)}
    assert sorted(j.id for j in journal.holding(T0 + 10)) == [live, accepted, running]
    assert all(j.holds_capacity(T0 + 10) for j in journal.holding(T0 + 10))
    assert journal.active_count(ISS, T0) == 3
    assert journal.active_count(ISS, T0 + 10) == 2
    assert journal.active_count(OTHER_ISS, T0) == 1
    assert journal.active_count("did:key:z6MkNobody", T0) == 0
    clock.t = T0 + 10
    assert journal.active_count(ISS) == 2  # defaults to the journal's clock


def test_expire_quotes(journal: Journal, clock: Clock) -> None:
    soon = make_job(journal, 1, expires_at=T0 + 10).id
    exact = make_job(journal, 2, expires_at=T0 + 20).id
    later = make_job(journal, 3, expires_at=T0 + 30).id
    accepted = make_job(journal, 4, expires_at=T0 + 5).id
    step(journal, accepted, "accepted")
    seen: list[Event] = []
    journal.add_listener(seen.append)

    clock.t = T0 + 20
    expired = journal.expire_quotes(T0 + 20)
    assert sorted(j.id for j in expired) == [soon, exact]
    assert all(j.state == "expired" and j.updated_at == T0 + 20 for j in expired)
    assert {(e.job, e.actor, e.reason, e.from_state, e.to_state) for e in seen} == {
        (soon, "node", "quote expired", "priced", "expired"),
        (exact, "node", "quote expired", "priced", "expired"),
    }
    assert journal.require(later).state == "priced" and journal.require(accepted).state == "accepted"
    assert journal.expire_quotes(T0 + 20) == []
    assert journal.count_by_state()["expired"] == 2


def test_count_by_state_and_list_jobs(journal: Journal) -> None:
    ids = [make_job(journal, n, iss=ISS if n % 2 else OTHER_ISS).id for n in range(6)]
    step(journal, ids[0], "accepted")
    step(journal, ids[1], "rejected")
    counts = journal.count_by_state()
    assert set(counts) == set(JOB_STATES)
    assert (counts["priced"], counts["accepted"], counts["rejected"], counts["settled"]) == (4, 1, 1, 0)
    assert [j.id for j in journal.list_jobs()] == ids
    assert [j.id for j in journal.list_jobs(limit=2)] == ids[:2]
    assert [j.id for j in journal.list_jobs(limit=2, after_id=ids[1])] == ids[2:4]
    assert [j.id for j in journal.list_jobs(state="priced", iss=ISS)] == [ids[3], ids[5]]
    assert [j.id for j in journal.list_jobs(iss=OTHER_ISS, after_id=ids[0])] == [ids[2], ids[4]]


def test_hot_queries_use_indexes(journal: Journal, path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        for sql, params in (
            (journal_module._SQL_HELD, (T0,)),
            (journal_module._SQL_HOLDING, (T0,)),
            (journal_module._SQL_ACTIVE_COUNT, (ISS, T0, 4)),
            (journal_module._SQL_DUE_QUOTES, (T0,)),
            (journal_module._SQL_FIND, (ISS, "job-1")),
            (journal_module._SQL_EVENTS, ("hj_1", 0, 10)),
            (journal_module._SQL_LAST_EXPIRY_SOURCE, ("hj_1",)),
            (journal_module._SQL_COUNT_BY_STATE, ()),
        ):
            plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            for detail in plan.split(" | "):
                # scanning a subquery's own (bounded) result is not a table scan
                if detail.startswith("SCAN") and detail != "SCAN CONSTANT ROW" and "(subquery-" not in detail:
                    assert "COVERING INDEX" in detail, f"{sql!r} scans a table: {plan}"
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------- replay cache


def test_replay_cache_survives_restart_and_prunes(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        assert j.check_and_record(ISS, "nonce-1", T0 + 60) is True
        assert j.check_and_record(ISS, "nonce-1", T0 + 60) is False
        assert j.check_and_record(OTHER_ISS, "nonce-1", T0 + 60) is True
        assert j.check_and_record(ISS, "nonce-2", T0 + 600) is True
    with Journal.open(path, now=clock) as j:
        assert j.check_and_record(ISS, "nonce-1", T0 + 60) is False
        assert j.prune_nonces(T0 + 60) == 0  # exp == now is still live
        assert j.prune_nonces(T0 + 61) == 2
        assert j.check_and_record(ISS, "nonce-2", T0 + 600) is False
        assert j.check_and_record(ISS, "nonce-1", T0 + 60) is True  # forgotten, as its token is expired
        with pytest.raises(ValueError):
            j.check_and_record(ISS, "nonce-3", float("nan"))


def _nonce_rows(path: Path, jti: str) -> int:
    """Nonce rows as another connection sees them: only what is committed."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM nonces WHERE jti = ?", (jti,)).fetchone()[0])
    finally:
        conn.close()


def _count_commits(j: Journal) -> list[str]:
    """The COMMITs the journal's connection runs from now on."""
    seen: list[str] = []
    j._connection().set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


async def test_batched_writes_of_concurrent_tasks_share_one_commit(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        commits = _count_commits(j)
        answered: list[int] = []

        async def request(n: int) -> None:
            async with j.batched():
                assert j.check_and_record(ISS, f"jti-b{n}", T0 + 60) is True
                make_job(j, n)
                # written into the open group: this connection sees it, another does not yet
                assert j.get(node_id(n)) is not None
                assert _nonce_rows(path, f"jti-b{n}") == 0
            # the block ended: committed, so the answer may leave
            assert _nonce_rows(path, f"jti-b{n}") == 1
            answered.append(n)

        await asyncio.gather(*(request(n) for n in range(1, 6)))
        assert sorted(answered) == [1, 2, 3, 4, 5]
        assert commits == ["COMMIT"]  # five requests, one commit
        assert j.check_and_record(ISS, "jti-b1", T0 + 60) is False  # a replay, also after the group


async def test_a_failed_write_in_a_group_is_undone_alone(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        make_job(j, 1)
        outcomes: dict[str, object] = {}

        async def duplicate() -> None:
            async with j.batched():
                j.check_and_record(ISS, "jti-dup", T0 + 60)
                try:
                    make_job(j, 1)  # job-1 exists: this write is rolled back, its savepoint alone
                except ConflictError as exc:
                    outcomes["dup"] = exc.code

        async def fresh() -> None:
            async with j.batched():
                make_job(j, 2)
            outcomes["fresh"] = "ok"

        await asyncio.gather(duplicate(), fresh())
        assert outcomes == {"dup": "job_exists", "fresh": "ok"}
        assert _nonce_rows(path, "jti-dup") == 1  # the nonce written before the failed write stays
        assert [e.to_state for e in j.events(node_id(2))] == ["created", "priced"]
        assert [e.to_state for e in j.events(node_id(1))] == ["created", "priced"]  # nothing doubled


async def test_a_write_outside_a_batch_commits_the_open_group_at_once(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        seen: list[int] = []
        j.add_listener(lambda event: seen.append(event.seq))
        async with j.batched():
            make_job(j, 1)
            assert seen == [] and _nonce_rows(path, "jti-x") == 0
            # e.g. the scheduler, in a task of its own: its write must be durable when it returns
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: j.check_and_record(ISS, "jti-x", T0 + 60)
            )
            assert _nonce_rows(path, "jti-x") == 1
            assert len(j.events(node_id(1))) == 2
            conn = sqlite3.connect(path)
            assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2  # the group went too
            conn.close()
            assert seen == [1, 2]  # listeners heard the group's events once it committed


async def test_a_failed_group_commit_fails_every_member_and_keeps_nothing(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        errors: list[str] = []

        async def request(n: int, orphan: bool) -> None:
            try:
                async with j.batched():
                    make_job(j, n)
                    if orphan:  # a constraint checked only at COMMIT makes the whole group fail there
                        j._connection().execute("PRAGMA defer_foreign_keys = ON")
                        with j._write() as txn:
                            txn.conn.execute(
                                "INSERT INTO events (job, at, type, actor, reason) "
                                "VALUES ('hj_missing', 0, 'note', 'test', 'orphan')"
                            )
            except JournalError as exc:
                errors.append(exc.code)

        await asyncio.gather(request(1, False), request(2, True))
        assert errors == ["journal_write_failed", "journal_write_failed"]
        assert j.get(node_id(1)) is None and j.get(node_id(2)) is None
        make_job(j, 3)  # the journal takes writes again
        assert j.get(node_id(3)) is not None


def _wal_bytes_after_writes(path: Path, clock: Clock, *, background: bool) -> int:
    with Journal.open(path, now=clock) as j:
        if background:
            j.checkpoint_in_background(interval_seconds=0.02)
            assert "hearth-journal-checkpoint" in {t.name for t in threading.enumerate()}
        else:
            j._connection().execute("PRAGMA wal_autocheckpoint = 0")  # what the thread replaces
        for n in range(1, 301):
            make_job(j, n)
            if n % 50 == 0:
                time.sleep(0.1)  # room for a checkpoint between bursts
        return path.with_name(path.name + "-wal").stat().st_size


def test_background_checkpoints_keep_the_wal_small_and_stop_on_close(tmp_path: Path, clock: Clock) -> None:
    unchecked = _wal_bytes_after_writes(tmp_path / "a.sqlite3", clock, background=False)
    checked = _wal_bytes_after_writes(tmp_path / "b.sqlite3", clock, background=True)
    # without checkpoints every write appends; with them the WAL restarts from its start after each one
    assert checked * 3 < unchecked
    assert "hearth-journal-checkpoint" not in {t.name for t in threading.enumerate()}  # close() stopped it


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


# --------------------------------------------------------------------------------------------- speed


def test_ten_thousand_jobs_reopen_fast(path: Path) -> None:
    """Restart-to-ready regression guard: reopen + capacity ledger + counts with 10k jobs in under 1 s."""
    n_jobs = 10_000
    clock = Clock()
    with Journal.open(path, now=clock) as j:
        started = time.perf_counter()
        for n in range(n_jobs):
            make_job(j, n, iss=f"did:key:z6Mk{n % 50}", expires_at=T0 + (QUOTE_TTL if n % 4 else -1))
        per_create = (time.perf_counter() - started) / n_jobs
        for n in range(0, n_jobs, 10):
            step(j, node_id(n), "accepted")
    started = time.perf_counter()
    with Journal.open(path, now=clock) as j:
        held = j.held_resources(T0)
        counts = j.count_by_state()
        elapsed = time.perf_counter() - started
    assert counts["priced"] == n_jobs - n_jobs // 10 and counts["accepted"] == n_jobs // 10
    # 3 in 4 quotes are live, plus every accepted job.
    assert len(held) == sum(1 for n in range(n_jobs) if n % 10 == 0 or n % 4)
    assert elapsed < 1.0, f"reopen + held_resources + count_by_state took {elapsed:.3f}s"
    assert per_create < 0.002, f"create_priced took {per_create * 1e6:.0f} us per job"
    print(f"\n10k jobs: create {per_create * 1e6:.0f} us/job; reopen+held+counts {elapsed * 1e3:.1f} ms")


def test_active_count_stops_at_the_limit(journal: Journal) -> None:
    for i in range(5):
        make_job(journal, i)
    assert journal.active_count(ISS) == 5
    assert journal.active_count(ISS, limit=3) == 3
    assert journal.active_count(ISS, limit=10) == 5


# -- payments and chain transactions (schema 2) ------------------------------------------------------------


def _accepted_with_payment(j: Journal, n: int = 0) -> JobRecord:
    job = make_job(j, n)
    j.transition(job.id, "accepted", actor="node", reason="accepted")
    j.open_payment(job.id, escrow_job_id=f"0x{n:064x}", terms={"amount": "1250000"}, wait_until=T0 + 600)
    return job


def test_open_payment_is_idempotent_and_only_adds_a_missing_authorization(journal: Journal) -> None:
    job = _accepted_with_payment(journal)
    again = journal.open_payment(job.id, escrow_job_id="0x" + "f" * 64, terms={"other": 1}, wait_until=T0 + 1)
    assert (
        again.terms == {"amount": "1250000"} and again.wait_until == T0 + 600 and again.authorization is None
    )
    auth = {"from": "0xpayer", "signature": "0x01"}
    with_auth = journal.open_payment(job.id, escrow_job_id="x", terms={}, wait_until=0, authorization=auth)
    assert with_auth.authorization == auth
    other = journal.open_payment(job.id, escrow_job_id="x", terms={}, wait_until=0, authorization={"b": 2})
    assert other.authorization == auth  # the first authorization stays


def test_funding_is_decided_once_and_noted_on_the_job(journal: Journal) -> None:
    job = _accepted_with_payment(journal)
    assert [p.job for p in journal.payments_awaiting()] == [job.id]
    journal.set_funding(job.id, "funded", reason="escrow funded", data={"amount": "1250000"})
    assert journal.payments_awaiting() == []
    with pytest.raises(ConflictError) as info:
        journal.set_funding(job.id, "refused", reason="late")
    assert info.value.code == "funding_decided"
    note = journal.events(job.id)[-1]
    assert note.type == "note" and note.data == {"funding": "funded", "amount": "1250000"}


def test_the_database_refuses_a_second_live_transaction_for_one_payment_or_nonce(journal: Journal) -> None:
    job = _accepted_with_payment(journal)
    journal.record_tx(job.id, "release", sender="0xnode", nonce=0, hash="0xa", raw="0x01")
    with pytest.raises(ConflictError) as info:  # same job and purpose while the first may still land
        journal.record_tx(job.id, "release", sender="0xnode", nonce=1, hash="0xb", raw="0x02")
    assert info.value.code == "tx_exists"
    other = _accepted_with_payment(journal, 1)
    with pytest.raises(ConflictError):  # the nonce is taken
        journal.record_tx(other.id, "release", sender="0xnode", nonce=0, hash="0xc", raw="0x03")
    # once the first is known dead (dropped), a new one may be sent, and its nonce is free again
    journal.update_tx("0xa", state="dropped", note="dropped")
    assert journal.next_nonce("0xnode") == 0
    journal.record_tx(job.id, "release", sender="0xnode", nonce=0, hash="0xd", raw="0x04")
    assert journal.next_nonce("0xnode") == 1
    assert [t.state for t in journal.txs(job.id)] == ["dropped", "signed"]
    with pytest.raises(sqlite3.IntegrityError):  # the record is append-only, even to raw SQL
        raw = sqlite3.connect(journal.path)
        with raw:
            raw.execute("DELETE FROM chain_txs")


def test_a_verdict_moves_the_job_and_stores_the_receipt_together_or_not_at_all(journal: Journal) -> None:
    job = _accepted_with_payment(journal)
    with pytest.raises(ConflictError) as info:  # not completed yet: nothing is written
        journal.record_verdict(job.id, "validated", {"receipt": 1}, actor="v", reason="r")
    payment = journal.payment(job.id)
    assert info.value.code == "state_changed" and payment is not None and payment.receipt is None
    journal.transition(job.id, "running", actor="node", reason="run")
    journal.transition(job.id, "completed", actor="node", reason="done", fields={"result_json": {"ok": 1}})
    receipt = {"receipt": {"amount": "1000000"}, "signature": "0x01"}
    record, event = journal.record_verdict(job.id, "validated", receipt, actor="validator", reason="passed")
    assert record.state == "validated" and event.from_state == "completed"
    payment = journal.payment(job.id)
    assert payment is not None and payment.receipt == receipt
    with pytest.raises(ConflictError):
        journal.record_verdict(job.id, "disputed", receipt, actor="validator", reason="again")
    assert journal.payment_totals()["earned"] == 0  # earned once settled, not before
    journal.record_tx(job.id, "release", sender="0xnode", nonce=0, hash="0xa", raw="0x01")
    journal.update_tx("0xa", state="confirmed", gas_used=80_000, gas_price=2)
    journal.transition(job.id, "settled", actor="settlement", reason="released")
    assert journal.payment_totals() == {
        "earned": 1_000_000,
        "gas_fund": 0,
        "gas_release": 160_000,
        "gas_refund": 0,
    }
