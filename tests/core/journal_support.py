"""Helpers shared by the journal's tests: a settable clock, jobs made and driven along the lifecycle."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from core.journal import TRANSITIONS, Event, JobRecord, JobState, Journal, is_allowed
from core.lifecycle import JOB_STATES

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
