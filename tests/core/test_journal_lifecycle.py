"""The journal enforces the lifecycle: the transition table in Python and in SQLite, each move's conditions,
and the append-only event log its listeners hear.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConflictError, IllegalTransitionError, NotFoundError
from core.journal import TERMINAL_STATES, TRANSITIONS, Event, JobState, Journal
from tests.core.journal_support import (
    ALLOWED,
    ILLEGAL,
    ISS,
    OTHER_ISS,
    QUOTE_TTL,
    T0,
    Clock,
    drive,
    make_job,
    node_id,
    replayed_state,
    step,
    step_kwargs,
)

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
    with caplog.at_level(logging.ERROR, logger="hearth.journal"):
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
