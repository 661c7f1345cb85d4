"""The job journal: SQLite (WAL) record of every job and every state change; the lifecycle's source of truth.

Each fact is committed here *before* the node acts on it (DESIGN §4), so after a crash the journal says what
was decided and nothing more. Three rules hold by construction:

- The allowed transitions live in one mapping, :data:`TRANSITIONS`. Python checks it before writing, and the
  database checks it again: a ``transitions`` table is filled from the mapping and a trigger aborts any
  ``UPDATE`` of ``jobs.state`` whose (from, to) pair is absent, so not even raw SQL can write an illegal move.
- The ``events`` table is append-only (triggers abort ``UPDATE`` and ``DELETE``); replaying a job's
  ``transition`` events in ``seq`` order always ends at its current state.
- Every write is whole or absent after a crash: one short ``BEGIN IMMEDIATE ... COMMIT``, or a savepoint in a
  group transaction that concurrent requests share and that commits before any of them is answered
  (:meth:`Journal.batched`).

Capacity is not stored separately: a job holds its ``cpus``/``memory_mb``/``gpus`` while it is ``priced``
with a live quote, ``accepted`` or ``running``; :meth:`Journal.held_resources` derives the ledger from that.

The :class:`Journal` is synchronous and owns one connection; it is meant to be called from the event loop
thread, each call costing tens of microseconds. No ``sqlite3`` exception leaves this module: they become
:class:`~core.errors.JournalError` (``journal_write_failed``, retryable) at the boundary.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, TypedDict, cast, get_args

import orjson

from core.errors import DOMAINS, ConflictError, Domain, IllegalTransitionError, JournalError, NotFoundError

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS",
    "EVENT_TYPES",
    "HOLDING_STATES",
    "JOB_STATES",
    "SCHEMA_VERSION",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Event",
    "EventType",
    "HeldResources",
    "JobFields",
    "JobRecord",
    "JobState",
    "Journal",
    "Listener",
    "PaymentRecord",
    "TxPurpose",
    "TxRecord",
    "TxState",
    "is_allowed",
]

logger = logging.getLogger(__name__)

JobState = Literal[
    "created",
    "priced",
    "accepted",
    "running",
    "completed",
    "validated",
    "settled",
    "disputed",
    "refunded",
    "rejected",
    "expired",
    "cancelled",
    "failed",
]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)

EventType = Literal["transition", "progress", "note"]
MAX_EVENT_SEQ: Final = 2**63 - 1
"""The largest event position there can be (SQLite's largest integer); a position beyond names nothing."""
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)

TRANSITIONS: Mapping[JobState, frozenset[JobState]] = MappingProxyType(
    {
        "created": frozenset({"priced", "rejected"}),
        "priced": frozenset({"accepted", "expired", "rejected", "cancelled"}),
        "accepted": frozenset({"running", "cancelled", "failed", "expired"}),
        "running": frozenset({"completed", "failed", "cancelled"}),
        "completed": frozenset({"validated", "disputed"}),
        "validated": frozenset({"settled"}),
        "disputed": frozenset({"refunded"}),
        # A retry, only while the failure is retryable and attempts < the caller's retry budget.
        "failed": frozenset({"accepted"}),
        # A re-quote, only of a quote that expired before it was ever accepted.
        "expired": frozenset({"priced"}),
    }
)
"""Every allowed state change, and the only place they are defined. States absent here have no way out."""

TERMINAL_STATES: frozenset[JobState] = frozenset(s for s in JOB_STATES if not TRANSITIONS.get(s))
"""States no transition leaves. ``failed`` and ``expired`` are final too once no retry or re-quote remains."""

HOLDING_STATES: tuple[JobState, ...] = ("priced", "accepted", "running")
"""States in which a job holds its resources (``priced`` only while its quote is live)."""

SCHEMA_VERSION: Final = 3
DEFAULT_BUSY_TIMEOUT_MS: Final = 2000
# Keeps the WAL file from growing without bound after a burst of writes.
_JOURNAL_SIZE_LIMIT_BYTES: Final = 64 * 1024 * 1024
_PRICE_RE: Final = re.compile(r"^(0|[1-9][0-9]{0,17})(\.[0-9]{1,18})?$")
_FAILED: Final = "failed"


def is_allowed(src: str, dst: str) -> bool:
    """Whether the lifecycle connects ``src`` to ``dst`` (ignoring the retry and re-quote conditions)."""
    return dst in TRANSITIONS.get(cast(JobState, src), frozenset())


class JobFields(TypedDict, total=False):
    """The job columns a transition may change besides ``state``; anything else is fixed at creation."""

    price: str | None
    quote_id: str | None
    quote_jwt: str | None
    quote_expires_at: float | None
    attempts: int
    failure_domain: Domain | None
    failure_code: str | None
    failure_message: str | None
    failure_retryable: bool | None
    result_json: Mapping[str, Any] | str | None


_MUTABLE_FIELDS: Final = frozenset(JobFields.__annotations__)
_QUOTE_FIELDS: Final = ("price", "quote_id", "quote_jwt", "quote_expires_at")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One row of ``jobs`` as it was when read. Immutable; read again to see later changes."""

    id: str
    iss: str
    job_id: str
    kind: str
    idem_key: str
    envelope_hash: str
    envelope_json: str
    state: JobState
    price: str | None
    quote_id: str | None
    quote_jwt: str | None
    quote_expires_at: float | None
    cpus: float
    memory_mb: int
    gpus: int
    attempts: int
    failure_domain: str | None
    failure_code: str | None
    failure_message: str | None
    failure_retryable: bool | None
    result_json: str | None
    created_at: float
    updated_at: float

    @property
    def envelope(self) -> dict[str, Any]:
        """The recorded envelope, parsed afresh on each access (callers may mutate their copy)."""
        return cast(dict[str, Any], json.loads(self.envelope_json))

    @property
    def result(self) -> dict[str, Any] | None:
        """The recorded result document, if any, parsed afresh on each access."""
        return None if self.result_json is None else cast(dict[str, Any], json.loads(self.result_json))

    @property
    def failure(self) -> dict[str, Any] | None:
        """Why the job last failed (``domain``, ``code``, ``message``, ``retryable``), or None."""
        if self.failure_domain is None:
            return None
        return {
            "domain": self.failure_domain,
            "code": self.failure_code,
            "message": self.failure_message,
            "retryable": self.failure_retryable,
        }

    @property
    def resources(self) -> tuple[float, int, int]:
        """``(cpus, memory_mb, gpus)`` this job holds while it holds capacity."""
        return (self.cpus, self.memory_mb, self.gpus)

    def holds_capacity(self, now: float) -> bool:
        """Whether this job counts against capacity at ``now`` (live quote, accepted or running)."""
        if self.state == "priced":
            return self.quote_expires_at is not None and self.quote_expires_at > now
        return self.state in ("accepted", "running")


@dataclass(frozen=True, slots=True)
class Event:
    """One row of the append-only ``events`` log: a transition, or a progress/note entry (no state change)."""

    seq: int
    job: str
    at: float
    type: EventType
    from_state: JobState | None
    to_state: JobState | None
    actor: str
    reason: str
    domain: str | None
    retryable: bool | None
    data_json: str | None

    @property
    def data(self) -> dict[str, Any] | None:
        return None if self.data_json is None else cast(dict[str, Any], json.loads(self.data_json))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view, e.g. for the SSE stream of ``GET /v1/jobs/{id}/events``."""
        return {
            "seq": self.seq,
            "job": self.job,
            "at": self.at,
            "type": self.type,
            "from": self.from_state,
            "to": self.to_state,
            "actor": self.actor,
            "reason": self.reason,
            "domain": self.domain,
            "retryable": self.retryable,
            "data": self.data,
        }


Listener = Callable[[Event], None]

FundingState = Literal["awaiting", "funded", "refused"]
TxPurpose = Literal["fund", "release", "refund"]
TxState = Literal["signed", "sent", "mined", "confirmed", "reverted", "dropped"]
TX_OPEN_STATES: Final[tuple[TxState, ...]] = ("signed", "sent", "mined")
"""A transaction in one of these may still land: it is resolved by hash before anything else is sent."""


@dataclass(frozen=True, slots=True)
class WebhookDue:
    """A job's webhook with a transition the requester has not acknowledged yet: the next to deliver."""

    job: str
    url: str
    attempts: int
    event: Event


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """One job's escrow terms and where its funding and settlement stand (``payments`` table)."""

    job: str
    escrow_job_id: str
    terms_json: str
    authorization_json: str | None
    funding: FundingState
    wait_until: float
    receipt_json: str | None
    created_at: float
    updated_at: float

    @property
    def terms(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(self.terms_json))

    @property
    def authorization(self) -> dict[str, Any] | None:
        return (
            None
            if self.authorization_json is None
            else cast(dict[str, Any], json.loads(self.authorization_json))
        )

    @property
    def receipt(self) -> dict[str, Any] | None:
        return None if self.receipt_json is None else cast(dict[str, Any], json.loads(self.receipt_json))


@dataclass(frozen=True, slots=True)
class TxRecord:
    """One transaction the node signed (``chain_txs``): recorded before broadcast, resolved by hash after."""

    id: int
    job: str
    purpose: TxPurpose
    sender: str
    nonce: int
    hash: str
    raw: str
    state: TxState
    block_number: int | None
    block_hash: str | None
    gas_used: int | None
    gas_price: int | None
    error: str | None
    created_at: float
    updated_at: float

    def as_dict(self) -> dict[str, Any]:
        """The public view (no raw bytes)."""
        return {
            "purpose": self.purpose,
            "hash": self.hash,
            "nonce": self.nonce,
            "state": self.state,
            "block_number": self.block_number,
            "gas_used": self.gas_used,
            "gas_price": self.gas_price,
            "error": self.error,
            "created_at": self.created_at,
        }


HeldResources = tuple[str, float, int, int, float | None, str]
"""``(job id, cpus, memory_mb, gpus, expires_at, iss)``: one hold of the capacity ledger and its requester."""

# --------------------------------------------------------------------------------------------- schema

_JOB_COLUMNS: Final = (
    "id, iss, job_id, kind, idem_key, envelope_hash, envelope_json, state, price, quote_id, quote_jwt, "
    "quote_expires_at, cpus, memory_mb, gpus, attempts, failure_domain, failure_code, failure_message, "
    "failure_retryable, result_json, created_at, updated_at"
)
_EVENT_COLUMNS: Final = (
    "seq, job, at, type, from_state, to_state, actor, reason, domain, retryable, data_json"
)


def _sql_list(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


_SCHEMA: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    """CREATE TABLE transitions (
        from_state TEXT NOT NULL,
        to_state TEXT NOT NULL,
        PRIMARY KEY (from_state, to_state)
    ) WITHOUT ROWID""",
    f"""CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        iss TEXT NOT NULL,
        job_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        envelope_hash TEXT NOT NULL,
        envelope_json TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ({_sql_list(JOB_STATES)})),
        price TEXT,
        quote_id TEXT,
        quote_jwt TEXT,
        quote_expires_at REAL,
        cpus REAL NOT NULL CHECK (cpus >= 0),
        memory_mb INTEGER NOT NULL CHECK (memory_mb >= 0),
        gpus INTEGER NOT NULL CHECK (gpus >= 0),
        attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        failure_domain TEXT,
        failure_code TEXT,
        failure_message TEXT,
        failure_retryable INTEGER CHECK (failure_retryable IN (0, 1)),
        result_json TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (iss, job_id)
    )""",
    # (state, quote_expires_at) serves every lookup by state and the live-quote range of held_resources.
    "CREATE INDEX jobs_state ON jobs (state, quote_expires_at)",
    "CREATE INDEX jobs_iss_state ON jobs (iss, state, quote_expires_at)",
    # No AUTOINCREMENT: rows are never deleted (see the triggers), so the rowid already only grows, and
    # AUTOINCREMENT would add a write to sqlite_sequence to every transaction.
    f"""CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        job TEXT NOT NULL REFERENCES jobs (id),
        at REAL NOT NULL,
        type TEXT NOT NULL CHECK (type IN ({_sql_list(EVENT_TYPES)})),
        from_state TEXT,
        to_state TEXT,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        domain TEXT,
        retryable INTEGER CHECK (retryable IN (0, 1)),
        data_json TEXT
    )""",
    "CREATE INDEX events_job ON events (job, seq)",
    """CREATE TABLE nonces (
        iss TEXT NOT NULL,
        jti TEXT NOT NULL,
        exp REAL NOT NULL,
        PRIMARY KEY (iss, jti)
    ) WITHOUT ROWID""",
    "CREATE INDEX nonces_exp ON nonces (exp)",
    """CREATE TRIGGER jobs_insert_created BEFORE INSERT ON jobs
    WHEN NEW.state IS NOT 'created'
    BEGIN SELECT RAISE(ABORT, 'illegal_transition: a job starts as created'); END""",
    """CREATE TRIGGER jobs_transition_guard BEFORE UPDATE OF state ON jobs
    WHEN NEW.state IS NOT OLD.state AND NOT EXISTS (
        SELECT 1 FROM transitions WHERE from_state = OLD.state AND to_state = NEW.state
    )
    BEGIN SELECT RAISE(ABORT, 'illegal_transition'); END""",
    """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events_append_only'); END""",
    """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events_append_only'); END""",
)

# Schema 2: escrow terms and funding per job, and every transaction the node signs. Applied on creation
# and as the migration from schema 1.
_SCHEMA_PAYMENTS: Final = (
    """CREATE TABLE payments (
        job TEXT PRIMARY KEY REFERENCES jobs (id),
        escrow_job_id TEXT NOT NULL UNIQUE,
        terms_json TEXT NOT NULL,
        authorization_json TEXT,
        funding TEXT NOT NULL CHECK (funding IN ('awaiting', 'funded', 'refused')),
        wait_until REAL NOT NULL,
        receipt_json TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX payments_funding ON payments (funding)",
    """CREATE TABLE chain_txs (
        id INTEGER PRIMARY KEY,
        job TEXT NOT NULL REFERENCES jobs (id),
        purpose TEXT NOT NULL CHECK (purpose IN ('fund', 'release', 'refund')),
        sender TEXT NOT NULL,
        nonce INTEGER NOT NULL CHECK (nonce >= 0),
        hash TEXT NOT NULL UNIQUE,
        raw TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('signed', 'sent', 'mined', 'confirmed', 'reverted', 'dropped')),
        block_number INTEGER,
        block_hash TEXT,
        gas_used INTEGER,
        gas_price INTEGER,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    )""",
    # One nonce, one transaction (a dropped one gave its nonce back); one live transaction per job and
    # purpose: the database itself refuses a second release while the first may still land.
    "CREATE UNIQUE INDEX chain_txs_nonce ON chain_txs (sender, nonce) WHERE state != 'dropped'",
    "CREATE UNIQUE INDEX chain_txs_purpose ON chain_txs (job, purpose) "
    "WHERE state NOT IN ('dropped', 'reverted')",
    "CREATE INDEX chain_txs_state ON chain_txs (state)",
    """CREATE TRIGGER chain_txs_no_delete BEFORE DELETE ON chain_txs
    BEGIN SELECT RAISE(ABORT, 'chain_txs_append_only'); END""",
)
# Webhook delivery: per job with a callback URL, the last transition event the requester has acknowledged.
# The events table is the outbox; this row is the cursor, advanced only after a 2xx (at least once).
_SCHEMA_WEBHOOKS: Final = (
    """CREATE TABLE webhooks (
        job TEXT PRIMARY KEY REFERENCES jobs (id),
        url TEXT NOT NULL,
        delivered_seq INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        next_at REAL NOT NULL,
        last_error TEXT,
        gave_up INTEGER NOT NULL DEFAULT 0 CHECK (gave_up IN (0, 1))
    ) WITHOUT ROWID""",
    "CREATE INDEX webhooks_due ON webhooks (gave_up, next_at)",
)
_PAYMENT_COLUMNS: Final = (
    "job, escrow_job_id, terms_json, authorization_json, funding, wait_until, receipt_json, "
    "created_at, updated_at"
)
_TX_COLUMNS: Final = (
    "id, job, purpose, sender, nonce, hash, raw, state, block_number, block_hash, gas_used, gas_price, "
    "error, created_at, updated_at"
)
_TX_FIELDS: Final = frozenset({"state", "block_number", "block_hash", "gas_used", "gas_price", "error"})

_SQL_GET: Final = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?"
_SQL_FIND: Final = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE iss = ? AND job_id = ?"
_SQL_STATE: Final = "SELECT state FROM jobs WHERE id = ?"
_SQL_INSERT_JOB: Final = (
    "INSERT INTO jobs (id, iss, job_id, kind, idem_key, envelope_hash, envelope_json, state, "
    "cpus, memory_mb, gpus, attempts, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 'created', ?, ?, ?, 0, ?, ?)"
)
_SQL_INSERT_EVENT: Final = (
    "INSERT INTO events (job, at, type, from_state, to_state, actor, reason, domain, retryable, data_json) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_EVENTS: Final = f"SELECT {_EVENT_COLUMNS} FROM events WHERE job = ? AND seq > ? ORDER BY seq LIMIT ?"
_SQL_LAST_EXPIRY_SOURCE: Final = (
    "SELECT from_state FROM events WHERE job = ? AND type = 'transition' AND to_state = 'expired' "
    "ORDER BY seq DESC LIMIT 1"
)
_SQL_DUE_QUOTES: Final = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'priced' AND quote_expires_at <= ?"
# Two indexed ranges joined, rather than one OR that could fall back to scanning every job.
_SQL_HELD: Final = (
    "SELECT id, cpus, memory_mb, gpus, NULL, iss FROM jobs WHERE state IN ('accepted', 'running') "
    "UNION ALL SELECT id, cpus, memory_mb, gpus, quote_expires_at, iss FROM jobs "
    "WHERE state = 'priced' AND quote_expires_at > ?"
)
_SQL_HOLDING: Final = (
    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ('accepted', 'running') "
    f"UNION ALL SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'priced' AND quote_expires_at > ?"
)
# Counting stops at ?3: the concurrency policy only asks whether a requester reached its limit, and a
# requester with thousands of queued jobs must not make every one of its requests scan them all.
_SQL_ACTIVE_COUNT: Final = (
    "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE iss = ?1 AND ("
    "state IN ('accepted', 'running') OR (state = 'priced' AND quote_expires_at > ?2)) LIMIT ?3)"
)
_SQL_COUNT_BY_STATE: Final = "SELECT state, COUNT(*) FROM jobs GROUP BY state"
_SQL_FAILED_BY_DOMAIN: Final = "SELECT failure_domain, COUNT(*) FROM jobs WHERE state = 'failed' GROUP BY 1"
_SQL_NONCE_INSERT: Final = "INSERT OR IGNORE INTO nonces (iss, jti, exp) VALUES (?, ?, ?)"
_SQL_NONCE_PRUNE: Final = "DELETE FROM nonces WHERE exp < ?"
_SQL_NONCE_SEEN: Final = "SELECT 1 FROM nonces WHERE iss = ? AND jti = ?"


# --------------------------------------------------------------------------------------------- helpers


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()


def _with_flag(row: tuple[Any, ...], at: int) -> list[Any]:
    """``row`` with the 0/1 column at index ``at`` turned into a bool (NULL stays None)."""
    values = list(row)
    if values[at] is not None:
        values[at] = bool(values[at])
    return values


def _job(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(*_with_flag(row, -4))  # failure_retryable


def _event(row: tuple[Any, ...]) -> Event:
    return Event(*_with_flag(row, -2))  # retryable


def _check_state(state: str) -> None:
    if state not in JOB_STATES:
        raise ValueError(f"unknown job state {state!r}")


def _check_price(price: str | None) -> None:
    if price is not None and not (isinstance(price, str) and _PRICE_RE.match(price)):
        raise ValueError(f"price must be a plain decimal string, not {price!r}")


def _check_time(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")


def _check_domain(domain: str | None) -> None:
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"unknown failure domain {domain!r}; one of {', '.join(DOMAINS)}")


def _column_values(fields: JobFields) -> dict[str, Any]:
    """Validate ``fields`` and turn them into column values (JSON text, 0/1 flags)."""
    unknown = set(fields) - _MUTABLE_FIELDS
    if unknown:
        raise ValueError(f"fields not changeable by a transition: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = dict(fields)
    if "price" in fields:
        _check_price(fields["price"])
    if "quote_expires_at" in fields:
        _check_time("quote_expires_at", fields["quote_expires_at"])
    if "attempts" in fields:
        attempts = fields["attempts"]
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            raise ValueError(f"attempts must be a non-negative int, not {attempts!r}")
    if "failure_domain" in fields:
        _check_domain(fields["failure_domain"])
    if "failure_retryable" in fields:
        flag = fields["failure_retryable"]
        values["failure_retryable"] = None if flag is None else int(bool(flag))
    if "result_json" in fields:
        result = fields["result_json"]
        if isinstance(result, str):
            json.loads(result)  # refuse text that is not JSON before it is recorded
        elif result is not None:
            values["result_json"] = _dumps(result)
    return values


def _write_error(exc: sqlite3.Error) -> JournalError:
    message = str(exc)
    if message.startswith("illegal_transition"):
        return IllegalTransitionError("illegal_transition", f"the database refused the change: {message}")
    if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL:
        # the operator's problem, not a bug: say so (storage, 507) so clients retry and alerts name the disk
        return JournalError(
            "journal_write_failed",
            "the journal could not record the change: the disk holding it is full",
            domain="storage",
            details={"cause": "disk_full"},
        )
    return JournalError("journal_write_failed", f"the journal could not record the change: {message}")


@dataclass(slots=True)
class _Txn:
    conn: sqlite3.Connection
    events: list[Event] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Group:
    """Writes of concurrent requests sharing one open transaction, committed once (:meth:`Journal.batched`).

    Each write is a savepoint inside it, so a write that fails is undone alone. ``done`` resolves, on the
    event loop, when the commit has happened or failed.
    """

    loop: asyncio.AbstractEventLoop
    thread: int
    done: asyncio.Future[None]
    events: list[Event] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Batch:
    """One task's share in group commits: the journal, its thread and the groups it wrote into."""

    journal: Journal
    thread: int
    groups: list[_Group] = field(default_factory=list)


_BATCH: ContextVar[_Batch | None] = ContextVar("hearth_journal_batch", default=None)
# The open group a task last read from: those rows were not committed yet (see Journal.settled).
_READ_IN_GROUP: ContextVar[_Group | None] = ContextVar("hearth_journal_read_in_group", default=None)


class _Checkpointer:
    """A thread that checkpoints the WAL through its own connection (``PASSIVE``: it never blocks a writer).

    SQLite releases the GIL while it copies pages and syncs the database file, so this runs beside the
    event loop rather than inside the commit that happens to cross the autocheckpoint threshold.
    """

    def __init__(self, path: Path, interval_seconds: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(path, interval_seconds), name="hearth-journal-checkpoint", daemon=True
        )
        self._thread.start()

    def _run(self, path: Path, interval_seconds: float) -> None:
        try:
            conn = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            logger.warning("journal checkpoints: cannot open %s: %s", path, exc)
            return
        try:
            while not self._stop.wait(interval_seconds):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # e.g. a full disk: the WAL keeps the data; try again later
                    logger.warning("journal checkpoint failed: %s", exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------------------------- journal


class Journal:
    """The durable job journal. Open with :meth:`open`; close with :meth:`close` or a ``with`` block.

    All methods are synchronous and short (one indexed query or one small transaction). They are safe to
    call from several threads, but are designed for the event loop thread.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, now: Callable[[], float]) -> None:
        """Use :meth:`open`; this wraps an already configured connection."""
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._now = now
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._group: _Group | None = None  # the open group commit (see batched())
        self._checkpointer: _Checkpointer | None = None

    # ----------------------------------------------------------------------------------------- lifetime

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        synchronous: Literal["normal", "full"] = "normal",
        now: Callable[[], float] = time.time,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> Journal:
        """Open (creating if needed) the journal at ``path``.

        ``synchronous="normal"`` survives a crash of the daemon; ``"full"`` also survives a power cut, at the
        cost of an fsync per commit. ``busy_timeout_ms`` bounds how long a write waits for another process
        holding the database (e.g. an operator's sqlite3 shell) before it fails as ``journal_write_failed``;
        the wait blocks the calling thread. Opening reads no job rows, so it stays fast however large the
        journal. Raises :class:`JournalError`: ``journal_open_failed`` when the file is not a usable SQLite
        database, ``journal_schema_mismatch`` when it was written by another schema version.
        """
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        conn: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                path,
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,
                cached_statements=256,
            )
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise JournalError("journal_open_failed", f"{path}: cannot use WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT_BYTES}")
            _prepare_schema(conn, path)
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            raise JournalError(
                "journal_open_failed", f"cannot open the journal at {path}: {exc}", retryable=False
            ) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return cls(conn, path, now)

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Commit a pending group, then close; later calls raise ``journal_closed``; twice is harmless."""
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()
        with self._lock:
            group = self._group
            if group is not None:
                with suppress(JournalError):
                    self._commit_group(group)
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- listeners

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(event)`` after each commit, once per new event, in ``seq`` order.

        A listener runs on the writer's thread and must be quick; an exception it raises is logged and
        swallowed so that a broken subscriber can never undo or block a recorded fact.
        """
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        with suppress(ValueError):
            self._listeners.remove(callback)

    def _notify(self, events: list[Event]) -> None:
        for event in events:
            for listener in tuple(self._listeners):
                try:
                    listener(event)
                except Exception:
                    logger.exception("journal listener %r failed on event %d", listener, event.seq)

    # ----------------------------------------------------------------------------------------- plumbing

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError("journal_closed", "the journal is closed", retryable=False)
        return self._conn

    @contextmanager
    def _write(self, *, one_statement: bool = False) -> Iterator[_Txn]:
        """One write, whole or not at all; listeners are told after it is committed.

        Alone, a write is one ``BEGIN IMMEDIATE ... COMMIT``. Inside :meth:`batched` (on the loop's thread) it
        joins the open group transaction as a savepoint and is committed with the group. Any other write
        while a group is open joins it too and commits the whole group at once, so that a caller outside
        a batch still finds its write durable when the call returns. ``one_statement``: the write is a
        single statement, which SQLite already applies whole or not at all; in a group it needs no
        savepoint of its own.
        """
        batch = _BATCH.get()
        deferred = batch is not None and batch.journal is self and batch.thread == threading.get_ident()
        with self._lock:
            conn = self._connection()
            if deferred or self._group is not None:
                group = self._group if self._group is not None else self._open_group(conn)
                txn = _Txn(conn)
                savepoint = not one_statement
                try:
                    if savepoint:
                        conn.execute("SAVEPOINT hearth_write")
                    yield txn
                    if savepoint:
                        conn.execute("RELEASE hearth_write")
                except BaseException as exc:
                    self._undo_savepoint(conn, group, exc, savepoint)
                    if isinstance(exc, sqlite3.Error):
                        raise _write_error(exc) from exc
                    raise
                group.events.extend(txn.events)
                if deferred:
                    assert batch is not None
                    if not batch.groups or batch.groups[-1] is not group:
                        batch.groups.append(group)
                    return
                events = self._commit_group(group)
            else:
                txn = _Txn(conn)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise _write_error(exc) from exc
                try:
                    yield txn
                    conn.execute("COMMIT")
                except BaseException as exc:
                    if conn.in_transaction:
                        with suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.Error):
                        raise _write_error(exc) from exc
                    raise
                events = txn.events
        self._notify(events)

    # ----------------------------------------------------------------------------------------- group commit

    @asynccontextmanager
    async def batched(self) -> AsyncIterator[None]:
        """Let this task's writes share one commit with those of other tasks in the same loop iteration.

        Within the block, a write returns once it is written into the open group transaction; the group
        commits from the event loop right after the tasks that are ready have run (one ``COMMIT`` for
        many requests, not one each). On the way out the block waits until everything the task wrote is
        committed, so nothing is answered before it is durable; a failed commit raises ``JournalError``
        (``journal_write_failed``) here or from :meth:`committed`. Only writes made on the loop's thread
        are deferred; any other write commits the open group at once.
        """
        batch = _Batch(self, threading.get_ident())
        token = _BATCH.set(batch)
        try:
            yield
        finally:
            _BATCH.reset(token)
            await self._wait(batch)

    async def committed(self) -> None:
        """Inside :meth:`batched`: wait until this task's writes so far are committed (raises if not)."""
        batch = _BATCH.get()
        if batch is not None and batch.journal is self:
            await self._wait(batch)

    async def settled(self) -> None:
        """Wait for the open group commit, if any (a reader about to answer with what it read).

        A failed commit is raised only to a task that read while that group was open, since what it read
        may have been rolled back. Any other task (a health check, a reader of committed rows) is not
        failed by writes that were not its own, e.g. other requests' writes on a full disk.
        """
        group = self._group
        if group is not None and group.thread == threading.get_ident():
            with suppress(JournalError):
                await asyncio.shield(group.done)
        seen = _READ_IN_GROUP.get()
        if seen is not None and seen.thread == threading.get_ident():
            await asyncio.shield(seen.done)

    @staticmethod
    async def _wait(batch: _Batch) -> None:
        groups, batch.groups = batch.groups, []
        for group in groups:
            # shielded: a cancelled request still leaves its writes to the group, which commits anyway
            await asyncio.shield(group.done)

    def _open_group(self, conn: sqlite3.Connection) -> _Group:
        loop = asyncio.get_running_loop()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _write_error(exc) from exc
        group = _Group(loop, threading.get_ident(), loop.create_future())
        self._group = group
        loop.call_soon(self._commit_scheduled, group)
        return group

    def _commit_scheduled(self, group: _Group) -> None:
        with suppress(JournalError):  # the members get the error from their future
            with self._lock:
                events = self._commit_group(group)
            self._notify(events)

    def _commit_group(self, group: _Group) -> list[Event]:
        """Commit ``group`` (lock held) if it is still open; returns its events for the listeners."""
        if self._group is not group:
            return []
        self._group = None
        conn = self._connection()
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = _write_error(exc)
            self._resolve(group, error)
            raise error from exc
        self._resolve(group, None)
        return group.events

    def _undo_savepoint(
        self, conn: sqlite3.Connection, group: _Group, exc: BaseException, savepoint: bool
    ) -> None:
        """Undo one failed write of ``group``; should SQLite have dropped the whole transaction, fail it."""
        if conn.in_transaction and not savepoint:
            return  # one statement: SQLite undid it alone
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK TO hearth_write")
                conn.execute("RELEASE hearth_write")
                return
            except sqlite3.Error:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
        if self._group is group:
            self._group = None
            full = _write_error(exc) if isinstance(exc, sqlite3.Error) else None
            if isinstance(exc, JournalError):
                error: BaseException = exc
            elif full is not None and full.domain == "storage":
                error = full  # a full disk: every writer of the group is told so, not of a bug
            else:
                error = JournalError("journal_write_failed", f"the journal dropped a transaction: {exc}")
            self._resolve(group, error)

    @staticmethod
    def _resolve(group: _Group, error: BaseException | None) -> None:
        def settle() -> None:
            if group.done.done():
                return
            if error is None:
                group.done.set_result(None)
            else:
                group.done.set_exception(error)

        if threading.get_ident() == group.thread:
            settle()
        else:
            with suppress(RuntimeError):  # the loop is gone: nobody is waiting
                group.loop.call_soon_threadsafe(settle)

    # ----------------------------------------------------------------------------------------- checkpoints

    def checkpoint_in_background(self, interval_seconds: float = 0.5) -> None:
        """Move WAL checkpoints off the writers: a thread with its own connection copies committed pages
        into the database every ``interval_seconds``; commits then only append to the WAL."""
        if self._checkpointer is None:
            with self._lock:
                self._connection().execute("PRAGMA wal_autocheckpoint = 0")
            self._checkpointer = _Checkpointer(self._path, interval_seconds)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            if self._group is not None:
                _READ_IN_GROUP.set(self._group)
            try:
                yield conn
            except sqlite3.Error as exc:
                raise JournalError("journal_read_failed", f"the journal could not be read: {exc}") from exc

    def _append(
        self,
        txn: _Txn,
        job: str,
        at: float,
        type: EventType,
        from_state: JobState | None,
        to_state: JobState | None,
        actor: str,
        reason: str,
        domain: str | None = None,
        retryable: bool | None = None,
        data_json: str | None = None,
    ) -> Event:
        flag = None if retryable is None else int(retryable)
        cur = txn.conn.execute(
            _SQL_INSERT_EVENT, (job, at, type, from_state, to_state, actor, reason, domain, flag, data_json)
        )
        seq = cur.lastrowid
        assert seq is not None
        event = Event(seq, job, at, type, from_state, to_state, actor, reason, domain, retryable, data_json)
        txn.events.append(event)
        return event

    @staticmethod
    def _fetch_job(conn: sqlite3.Connection, id: str) -> JobRecord | None:
        row = conn.execute(_SQL_GET, (id,)).fetchone()
        return None if row is None else _job(row)

    # ----------------------------------------------------------------------------------------- replay cache

    def nonce_seen(self, iss: str, jti: str) -> bool:
        """True if the nonce ``(iss, jti)`` is recorded (a write of the open group commit included)."""
        with self._read() as conn:
            return conn.execute(_SQL_NONCE_SEEN, (iss, jti)).fetchone() is not None

    def check_and_record(self, iss: str, jti: str, exp: float) -> bool:
        """Record the nonce ``(iss, jti)`` until ``exp``; ``False`` if it was already recorded (a replay).

        Committed before returning (inside :meth:`batched`: before the batch ends), so a replay is refused
        even across a restart.
        """
        _check_time("exp", exp)
        with self._write(one_statement=True) as txn:
            return txn.conn.execute(_SQL_NONCE_INSERT, (iss, jti, exp)).rowcount == 1

    def prune_nonces(self, now: float | None = None) -> int:
        """Forget nonces whose ``exp`` is before ``now`` (their tokens are refused as expired anyway)."""
        cutoff = self._now() if now is None else now
        with self._write() as txn:
            return txn.conn.execute(_SQL_NONCE_PRUNE, (cutoff,)).rowcount

    # ----------------------------------------------------------------------------------------- writes

    def create_priced(
        self,
        *,
        id: str,
        iss: str,
        job_id: str,
        kind: str,
        idem_key: str,
        envelope_hash: str,
        envelope: Mapping[str, Any],
        price: str,
        quote_id: str,
        quote_jwt: str,
        quote_expires_at: float,
        cpus: float,
        memory_mb: int,
        gpus: int,
        actor: str,
        reason: str,
        callback_url: str | None = None,
    ) -> JobRecord:
        """Record a new job and its quote: ``created`` then ``priced``, two events, one transaction.

        With ``callback_url`` the job's webhook cursor is recorded in the same transaction, so every
        transition from the first on is delivered (see :meth:`webhooks_due`).

        Raises :class:`ConflictError` (``job_exists``) if the id or ``(iss, job_id)`` is already recorded;
        then nothing is written. Looking the job up first (:meth:`find`) is the caller's idempotency path.
        """
        _check_price(price)
        _check_time("quote_expires_at", quote_expires_at)
        if cpus < 0 or memory_mb < 0 or gpus < 0:
            raise ValueError("resources must be non-negative")
        envelope_json = _dumps(envelope)
        try:
            with self._write() as txn:
                at = self._now()
                txn.conn.execute(
                    _SQL_INSERT_JOB,
                    (
                        id,
                        iss,
                        job_id,
                        kind,
                        idem_key,
                        envelope_hash,
                        envelope_json,
                        cpus,
                        memory_mb,
                        gpus,
                        at,
                        at,
                    ),
                )
                self._append(txn, id, at, "transition", None, "created", actor, reason)
                txn.conn.execute(
                    "UPDATE jobs SET state = 'priced', price = ?, quote_id = ?, quote_jwt = ?, "
                    "quote_expires_at = ?, updated_at = ? WHERE id = ?",
                    (price, quote_id, quote_jwt, quote_expires_at, at, id),
                )
                self._append(txn, id, at, "transition", "created", "priced", actor, reason)
                if callback_url is not None:
                    txn.conn.execute(
                        "INSERT INTO webhooks (job, url, next_at) VALUES (?, ?, ?)", (id, callback_url, at)
                    )
                # the row as written (what a read would return), without reading it back
                record = JobRecord(
                    id, iss, job_id, kind, idem_key, envelope_hash, envelope_json, "priced", price, quote_id,
                    quote_jwt, float(quote_expires_at), float(cpus), memory_mb, gpus, 0, None, None, None,
                    None, None, float(at), float(at),
                )  # fmt: skip
        except JournalError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError) and "UNIQUE" in str(exc.__cause__):
                raise ConflictError(
                    "job_exists",
                    f"job {job_id!r} of {iss} is already recorded",
                    details={"id": id, "iss": iss, "job_id": job_id},
                ) from None
            raise
        assert record is not None
        return record

    def transition(
        self,
        id: str,
        to: JobState,
        *,
        actor: str,
        reason: str,
        domain: Domain | None = None,
        retryable: bool | None = None,
        data: Mapping[str, Any] | None = None,
        expect: JobState | Iterable[JobState] | None = None,
        fields: JobFields | None = None,
        retry_budget: int | None = None,
    ) -> tuple[JobRecord, Event]:
        """Move job ``id`` to ``to`` and append the event, in one transaction; return the new row and event.

        - ``expect``: the state(s) the caller believes the job is in; otherwise :class:`ConflictError`
          (``state_changed``), nothing written. Use it to make check-then-act sequences race-free.
        - ``to="failed"`` requires ``domain`` and ``retryable`` (``ValueError`` otherwise); they are stored
          on the job (``failure_domain``/``failure_retryable``) as well as on the event.
        - ``failed -> accepted`` (a retry) requires ``retry_budget``; it is refused unless the failure was
          retryable and ``attempts < retry_budget``. ``attempts`` becomes ``attempts + 1`` unless ``fields``
          sets it.
        - ``expired -> priced`` (a re-quote) requires the new ``price``/``quote_id``/``quote_jwt``/
          ``quote_expires_at`` in ``fields`` and is refused if the job had ever been accepted.
        - ``fields`` may change only the columns of :class:`JobFields`.

        Raises :class:`NotFoundError` (``job_not_found``) and :class:`IllegalTransitionError`
        (``illegal_transition``, ``retry_budget_exhausted``, ``failure_not_retryable``,
        ``requote_after_accept``) with ``details["from"]``/``["to"]``; in every such case nothing is written.
        """
        _check_state(to)
        _check_domain(domain)
        if to == _FAILED and (domain is None or retryable is None):
            raise ValueError("a transition to 'failed' needs a failure domain and a retryable flag")
        values = _column_values(fields or {})
        if to == _FAILED:
            values["failure_domain"] = domain
            values["failure_retryable"] = int(bool(retryable))
        expected = None if expect is None else {expect} if isinstance(expect, str) else set(expect)
        data_json = None if data is None else _dumps(data)
        with self._write() as txn:
            current = self._fetch_job(txn.conn, id)
            if current is None:
                raise NotFoundError("job_not_found", f"no job {id!r}", details={"id": id})
            if expected is not None and current.state not in expected:
                raise ConflictError(
                    "state_changed",
                    f"job {id} is {current.state}, not {' or '.join(sorted(expected))}",
                    details={"id": id, "state": current.state, "expected": sorted(expected)},
                )
            self._check_move(txn.conn, current, to, values, retry_budget)
            return self._move(txn, current, to, values, actor, reason, domain, retryable, data_json)

    def _check_move(
        self,
        conn: sqlite3.Connection,
        current: JobRecord,
        to: JobState,
        values: dict[str, Any],
        retry_budget: int | None,
    ) -> None:
        """Refuse a move the lifecycle forbids, including the conditions on retries and re-quotes."""
        src = current.state
        details = {"id": current.id, "from": src, "to": to}
        if not is_allowed(src, to):
            raise IllegalTransitionError(
                "illegal_transition", f"a job cannot go from {src} to {to}", details=details
            )
        if src == _FAILED:
            if retry_budget is None:
                raise ValueError("a retry (failed -> accepted) needs the retry_budget")
            if not current.failure_retryable:
                raise IllegalTransitionError(
                    "failure_not_retryable", f"job {current.id} failed for good; no retry", details=details
                )
            if current.attempts >= retry_budget:
                raise IllegalTransitionError(
                    "retry_budget_exhausted",
                    f"job {current.id} has used {current.attempts} of {retry_budget} retries",
                    details={**details, "attempts": current.attempts, "retry_budget": retry_budget},
                )
            values.setdefault("attempts", current.attempts + 1)
        elif src == "expired":
            missing = [name for name in _QUOTE_FIELDS if values.get(name) is None]
            if missing:
                raise ValueError(f"a re-quote needs new {', '.join(missing)} in fields")
            row = conn.execute(_SQL_LAST_EXPIRY_SOURCE, (current.id,)).fetchone()
            if row is None or row[0] != "priced":
                raise IllegalTransitionError(
                    "requote_after_accept",
                    f"job {current.id} expired after it was accepted; it cannot be re-quoted",
                    details=details,
                )

    def _move(
        self,
        txn: _Txn,
        current: JobRecord,
        to: JobState,
        values: Mapping[str, Any],
        actor: str,
        reason: str,
        domain: str | None,
        retryable: bool | None,
        data_json: str | None,
    ) -> tuple[JobRecord, Event]:
        at = self._now()
        names = sorted(values)  # a stable column order keeps the statement cache small
        assignments = "".join(f", {name} = ?" for name in names)
        txn.conn.execute(
            f"UPDATE jobs SET state = ?, updated_at = ?{assignments} WHERE id = ?",
            (to, at, *(values[name] for name in names), current.id),
        )
        event = self._append(
            txn, current.id, at, "transition", current.state, to, actor, reason, domain, retryable, data_json
        )
        changed = dict(values)
        if changed.get("failure_retryable") is not None:
            changed["failure_retryable"] = bool(changed["failure_retryable"])
        if changed.get("quote_expires_at") is not None:
            changed["quote_expires_at"] = float(changed["quote_expires_at"])  # a REAL column
        # the row as updated (what a read would return), without reading it back
        return replace(current, state=to, updated_at=float(at), **changed), event

    def append_event(
        self,
        id: str,
        type: Literal["progress", "note"],
        reason: str,
        data: Mapping[str, Any] | None = None,
        *,
        actor: str = "node",
    ) -> Event:
        """Append a progress or note event to job ``id`` without changing its state."""
        if type not in ("progress", "note"):
            raise ValueError(f"append_event records progress or note events, not {type!r}")
        data_json = None if data is None else _dumps(data)
        with self._write() as txn:
            if txn.conn.execute(_SQL_STATE, (id,)).fetchone() is None:
                raise NotFoundError("job_not_found", f"no job {id!r}", details={"id": id})
            return self._append(txn, id, self._now(), type, None, None, actor, reason, data_json=data_json)

    def expire_quotes(self, now: float | None = None) -> list[JobRecord]:
        """Move every ``priced`` job whose quote expired by ``now`` to ``expired``, in one transaction."""
        cutoff = self._now() if now is None else now
        with self._write() as txn:
            due = [_job(row) for row in txn.conn.execute(_SQL_DUE_QUOTES, (cutoff,)).fetchall()]
            return [
                self._move(txn, job, "expired", {}, "node", "quote expired", None, None, None)[0]
                for job in due
            ]

    # ----------------------------------------------------------------------------------------- reads

    def get(self, id: str) -> JobRecord | None:
        with self._read() as conn:
            return self._fetch_job(conn, id)

    def require(self, id: str) -> JobRecord:
        """Like :meth:`get`, but raises :class:`NotFoundError` (``job_not_found``) for an unknown id."""
        record = self.get(id)
        if record is None:
            raise NotFoundError("job_not_found", f"no job {id!r}", details={"id": id})
        return record

    def find(self, iss: str, job_id: str) -> JobRecord | None:
        """The job the requester ``iss`` named ``job_id``, if recorded."""
        with self._read() as conn:
            row = conn.execute(_SQL_FIND, (iss, job_id)).fetchone()
            return None if row is None else _job(row)

    def events(self, id: str, after_seq: int = 0, limit: int = 1000) -> list[Event]:
        """Job ``id``'s events with ``seq > after_seq``, oldest first, at most ``limit``."""
        with self._read() as conn:
            return [_event(row) for row in conn.execute(_SQL_EVENTS, (id, after_seq, limit)).fetchall()]

    def holding(self, now: float | None = None) -> list[JobRecord]:
        """The jobs holding resources at ``now``: live quotes, accepted and running jobs."""
        cutoff = self._now() if now is None else now
        with self._read() as conn:
            return [_job(row) for row in conn.execute(_SQL_HOLDING, (cutoff,)).fetchall()]

    def held_resources(self, now: float | None = None) -> list[HeldResources]:
        """``(id, cpus, memory_mb, gpus, expires_at, iss)`` of each job holding resources at ``now``.

        This is the capacity ledger, rebuilt at start. ``expires_at`` is when the hold lapses by itself: the
        quote's expiry for a ``priced`` job, ``None`` for an accepted or running one (held until it moves);
        ``iss`` is the requester whose share of unfunded holds a quote counts against.
        """
        cutoff = self._now() if now is None else now
        with self._read() as conn:
            rows = conn.execute(_SQL_HELD, (cutoff,)).fetchall()
        return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def active_count(self, iss: str, now: float | None = None, *, limit: int = -1) -> int:
        """How many of ``iss``'s jobs hold resources at ``now`` (for the per-DID concurrency policy).

        With ``limit`` >= 0 counting stops there: the answer is ``min(count, limit)``.
        """
        cutoff = self._now() if now is None else now
        with self._read() as conn:
            return int(conn.execute(_SQL_ACTIVE_COUNT, (iss, cutoff, limit)).fetchone()[0])

    def count_by_state(self) -> dict[str, int]:
        """The number of jobs in every state (zero included), e.g. for metrics."""
        counts: dict[str, int] = dict.fromkeys(JOB_STATES, 0)
        with self._read() as conn:
            for state, count in conn.execute(_SQL_COUNT_BY_STATE).fetchall():
                counts[state] = count
        return counts

    def failed_by_domain(self) -> dict[str, int]:
        """Jobs resting in ``failed`` (no retry left) by failure domain, every domain included, for metrics.

        A failure recorded without a domain counts under ``internal``.
        """
        counts: dict[str, int] = dict.fromkeys(DOMAINS, 0)
        with self._read() as conn:
            for domain, count in conn.execute(_SQL_FAILED_BY_DOMAIN).fetchall():
                key = domain or "internal"
                counts[key] = counts.get(key, 0) + count
        return counts

    def list_jobs(
        self,
        *,
        state: JobState | None = None,
        iss: str | None = None,
        limit: int = 100,
        after_id: str | None = None,
    ) -> list[JobRecord]:
        """Jobs ordered by id, optionally filtered; to page, pass the last id of the previous page."""
        clauses: list[str] = []
        params: list[Any] = []
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        if iss is not None:
            clauses.append("iss = ?")
            params.append(iss)
        if after_id is not None:
            clauses.append("id > ?")
            params.append(after_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs{where} ORDER BY id LIMIT ?"
        with self._read() as conn:
            return [_job(row) for row in conn.execute(sql, (*params, limit)).fetchall()]

    # ----------------------------------------------------------------------------------------- payments

    def open_payment(
        self,
        job: str,
        *,
        escrow_job_id: str,
        terms: Mapping[str, Any],
        wait_until: float,
        authorization: Mapping[str, Any] | None = None,
    ) -> PaymentRecord:
        """Record job ``job``'s escrow terms (awaiting funding until ``wait_until``); idempotent.

        A second call keeps the first terms and deadline; it only adds an ``authorization`` the row lacks.
        """
        _check_time("wait_until", wait_until)
        auth_json = None if authorization is None else _dumps(authorization)
        with self._write() as txn:
            at = self._now()
            txn.conn.execute(
                f"INSERT INTO payments ({_PAYMENT_COLUMNS}) VALUES (?, ?, ?, ?, 'awaiting', ?, NULL, ?, ?) "
                "ON CONFLICT (job) DO UPDATE SET "
                "authorization_json = coalesce(payments.authorization_json, excluded.authorization_json), "
                "updated_at = CASE WHEN payments.authorization_json IS NULL AND excluded.authorization_json "
                "IS NOT NULL THEN excluded.updated_at ELSE payments.updated_at END",
                (job, escrow_job_id, _dumps(terms), auth_json, wait_until, at, at),
            )
            record = self._fetch_payment(txn.conn, job)
        assert record is not None
        return record

    def payment(self, job: str) -> PaymentRecord | None:
        with self._read() as conn:
            return self._fetch_payment(conn, job)

    def payments_awaiting(self) -> list[PaymentRecord]:
        """Payments still waiting for funding, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE funding = 'awaiting' ORDER BY created_at"
            ).fetchall()
        return [PaymentRecord(*row) for row in rows]

    def set_funding(
        self, job: str, funding: FundingState, *, reason: str, data: Mapping[str, Any] | None = None
    ) -> PaymentRecord:
        """Move job ``job``'s funding out of ``awaiting`` and note why, in one transaction.

        Raises :class:`ConflictError` (``funding_decided``) if it is no longer awaiting.
        """
        if funding not in ("funded", "refused"):
            raise ValueError(f"funding moves to funded or refused, not {funding!r}")
        with self._write() as txn:
            at = self._now()
            changed = txn.conn.execute(
                "UPDATE payments SET funding = ?, updated_at = ? WHERE job = ? AND funding = 'awaiting'",
                (funding, at, job),
            ).rowcount
            if changed != 1:
                raise ConflictError(
                    "funding_decided", f"job {job}'s funding is not awaiting", details={"id": job}
                )
            self._append(
                txn,
                job,
                at,
                "note",
                None,
                None,
                "settlement",
                reason,
                data_json=_dumps({"funding": funding, **(data or {})}),
            )
            record = self._fetch_payment(txn.conn, job)
        assert record is not None
        return record

    def record_verdict(
        self,
        job: str,
        to: Literal["validated", "disputed"],
        receipt: Mapping[str, Any],
        *,
        actor: str,
        reason: str,
    ) -> tuple[JobRecord, Event]:
        """``completed -> validated | disputed`` and the validator's receipt, in one transaction.

        Raises like :meth:`transition` (``state_changed`` unless the job is ``completed``; nothing written).
        """
        receipt_json = _dumps(receipt)
        with self._write() as txn:
            current = self._fetch_job(txn.conn, job)
            if current is None:
                raise NotFoundError("job_not_found", f"no job {job!r}", details={"id": job})
            if current.state != "completed":
                raise ConflictError(
                    "state_changed",
                    f"job {job} is {current.state}, not completed",
                    details={"id": job, "state": current.state, "expected": ["completed"]},
                )
            changed = txn.conn.execute(
                "UPDATE payments SET receipt_json = ?, updated_at = ? WHERE job = ? AND receipt_json IS NULL",
                (receipt_json, self._now(), job),
            ).rowcount
            if changed != 1:
                raise ConflictError(
                    "receipt_recorded", f"job {job} has a receipt already", details={"id": job}
                )
            self._check_move(txn.conn, current, to, {}, None)
            return self._move(txn, current, to, {}, actor, reason, None, None, None)

    def payment_totals(self) -> dict[str, int]:
        """Base units earned (receipt amounts of settled jobs) and wei of gas spent per tx purpose."""
        totals: dict[str, int] = {"earned": 0, "gas_fund": 0, "gas_release": 0, "gas_refund": 0}
        with self._read() as conn:
            for (amount,) in conn.execute(
                "SELECT json_extract(p.receipt_json, '$.receipt.amount') FROM payments p "
                "JOIN jobs j ON j.id = p.job WHERE j.state = 'settled'"
            ):
                totals["earned"] += int(amount or 0)
            for purpose, gas in conn.execute(
                "SELECT purpose, SUM(gas_used * gas_price) FROM chain_txs "
                "WHERE gas_used IS NOT NULL AND gas_price IS NOT NULL GROUP BY purpose"
            ):
                totals[f"gas_{purpose}"] = int(gas or 0)
        return totals

    # ------------------------------------------------------------------------------------------ webhooks

    def webhooks_due(self, now: float, limit: int = 100) -> list[WebhookDue]:
        """Webhooks whose retry time has come and that have an undelivered transition: the oldest one each."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT w.job, w.url, w.attempts, (SELECT MIN(e.seq) FROM events e WHERE e.job = w.job "
                "AND e.type = 'transition' AND e.seq > w.delivered_seq) AS next_seq FROM webhooks w "
                "WHERE w.gave_up = 0 AND w.next_at <= ? AND next_seq IS NOT NULL ORDER BY w.next_at LIMIT ?",
                (now, limit),
            ).fetchall()
            due = []
            for job, url, attempts, seq in rows:
                row = conn.execute(_SQL_EVENTS, (job, seq - 1, 1)).fetchone()
                due.append(WebhookDue(job=job, url=url, attempts=attempts, event=_event(row)))
        return due

    def webhook_delivered(self, job: str, seq: int) -> None:
        """The requester acknowledged event ``seq`` (a 2xx): the cursor moves past it, attempts reset."""
        with self._write() as txn:
            txn.conn.execute(
                "UPDATE webhooks SET delivered_seq = MAX(delivered_seq, ?), attempts = 0, last_error = NULL, "
                "next_at = ? WHERE job = ?",
                (seq, self._now(), job),
            )

    def webhook_failed(self, job: str, error: str, *, retry_at: float | None) -> None:
        """A delivery failed: try again at ``retry_at``, or never (``None``: the node gave up on this URL)."""
        with self._write() as txn:
            txn.conn.execute(
                "UPDATE webhooks SET attempts = attempts + 1, last_error = ?, next_at = ?, gave_up = ? "
                "WHERE job = ?",
                (error[:500], retry_at if retry_at is not None else self._now(), int(retry_at is None), job),
            )

    def webhook(self, job: str) -> dict[str, Any] | None:
        """A job's webhook state, for its status view."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT url, delivered_seq, attempts, last_error, gave_up FROM webhooks WHERE job = ?", (job,)
            ).fetchone()
        if row is None:
            return None
        url, seq, attempts, error, gave_up = row
        return {
            "url": url,
            "delivered_seq": seq,
            "attempts": attempts,
            "last_error": error,
            "gave_up": bool(gave_up),
        }

    # ----------------------------------------------------------------------------------------- chain txs

    def record_tx(
        self, job: str, purpose: TxPurpose, *, sender: str, nonce: int, hash: str, raw: str
    ) -> TxRecord:
        """Record a signed transaction *before* it is broadcast, so a crash after sending still knows it.

        Raises :class:`ConflictError` (``tx_exists``) if the nonce is taken or the job already has a live
        transaction for ``purpose``: the database refuses to let one payment be sent twice.
        """
        with self._write() as txn:
            at = self._now()
            try:
                cur = txn.conn.execute(
                    "INSERT INTO chain_txs (job, purpose, sender, nonce, hash, raw, state, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, 'signed', ?, ?)",
                    (job, purpose, sender, nonce, hash, raw, at, at),
                )
            except sqlite3.IntegrityError as exc:
                raise ConflictError(
                    "tx_exists",
                    f"job {job} already has a live {purpose} transaction, or nonce {nonce} is taken",
                    details={"id": job, "purpose": purpose, "nonce": nonce},
                ) from exc
            self._append(
                txn,
                job,
                at,
                "note",
                None,
                None,
                "settlement",
                f"{purpose} transaction signed",
                data_json=_dumps({"tx": hash, "purpose": purpose, "nonce": nonce}),
            )
            row = txn.conn.execute(
                f"SELECT {_TX_COLUMNS} FROM chain_txs WHERE id = ?", (cur.lastrowid,)
            ).fetchone()
        return TxRecord(*row)

    def update_tx(self, hash: str, *, note: str | None = None, **fields: Any) -> TxRecord:
        """Change a recorded transaction's state and block/gas facts; ``note`` also logs it on the job."""
        unknown = set(fields) - _TX_FIELDS
        if unknown:
            raise ValueError(f"not transaction fields: {', '.join(sorted(unknown))}")
        names = sorted(fields)
        with self._write() as txn:
            at = self._now()
            assignments = "".join(f", {name} = ?" for name in names)
            txn.conn.execute(
                f"UPDATE chain_txs SET updated_at = ?{assignments} WHERE hash = ?",
                (at, *(fields[n] for n in names), hash),
            )
            row = txn.conn.execute(f"SELECT {_TX_COLUMNS} FROM chain_txs WHERE hash = ?", (hash,)).fetchone()
            if row is None:
                raise NotFoundError("tx_not_found", f"no transaction {hash}", details={"hash": hash})
            record = TxRecord(*row)
            if note is not None:
                self._append(
                    txn,
                    record.job,
                    at,
                    "note",
                    None,
                    None,
                    "settlement",
                    note,
                    data_json=_dumps({"tx": hash, "purpose": record.purpose, "state": record.state}),
                )
        return record

    def txs(self, job: str | None = None, *, states: Iterable[TxState] | None = None) -> list[TxRecord]:
        """Recorded transactions, oldest first: of one job and/or in the given states."""
        clauses: list[str] = []
        params: list[Any] = []
        if job is not None:
            clauses.append("job = ?")
            params.append(job)
        if states is not None:
            wanted = list(states)
            clauses.append(f"state IN ({', '.join('?' for _ in wanted)})")
            params.extend(wanted)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_TX_COLUMNS} FROM chain_txs{where} ORDER BY id", params).fetchall()
        return [TxRecord(*row) for row in rows]

    def next_nonce(self, sender: str) -> int:
        """One past the highest nonce ``sender`` holds in a recorded, not dropped, transaction (0 if none)."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT MAX(nonce) FROM chain_txs WHERE sender = ? AND state != 'dropped'", (sender,)
            ).fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def txs_from_nonce(self, sender: str, nonce: int) -> list[TxRecord]:
        """``sender``'s recorded, not dropped, transactions with a nonce of ``nonce`` or more, by nonce.

        Few in practice (those still in flight), found through the ``(sender, nonce)`` index.
        """
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_TX_COLUMNS} FROM chain_txs WHERE sender = ? AND nonce >= ? AND state != 'dropped' "
                "ORDER BY nonce",
                (sender, nonce),
            ).fetchall()
        return [TxRecord(*row) for row in rows]

    @staticmethod
    def _fetch_payment(conn: sqlite3.Connection, job: str) -> PaymentRecord | None:
        row = conn.execute(f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE job = ?", (job,)).fetchone()
        return None if row is None else PaymentRecord(*row)

    # ----------------------------------------------------------------------------------------- operator views
    # Read by the overview (GET /v1/overview, the dashboard, `hearth status`), which is polled every second
    # or two: each reads a handful of rows through an index, or only the failed or settled jobs.

    def recent_jobs(self, limit: int = 20, *, state: JobState | None = None) -> list[JobRecord]:
        """The ``limit`` jobs recorded last, newest first; with ``state``, only those now in it.

        Rows are never deleted, so the rowid is the order of creation and the newest ``limit`` rows are read
        from its end, whatever the journal's size.
        """
        where = "" if state is None else " WHERE state = ?"
        params: tuple[Any, ...] = (limit,) if state is None else (state, limit)
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs{where} ORDER BY rowid DESC LIMIT ?", params
            ).fetchall()
        return [_job(row) for row in rows]

    def attempt_progress(self, job: str) -> Event | None:
        """The latest progress event of job ``job``'s current attempt; None before the attempt reports any.

        Reads the job's events backwards to its latest progress event or ``running`` transition, whichever
        comes first: the first, usually, since a running attempt reports about once a second.
        """
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE job = ? AND (type = 'progress' OR "
                "(type = 'transition' AND to_state = 'running')) ORDER BY seq DESC LIMIT 1",
                (job,),
            ).fetchone()
        return None if row is None or row[3] != "progress" else _event(row)

    def failure_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs rest in ``failed``, by ``(failure domain, failure code)`` ("" for a missing code)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT failure_domain, coalesce(failure_code, ''), COUNT(*) FROM jobs "
                "WHERE state = 'failed' GROUP BY 1, 2"
            ).fetchall()
        return {(str(domain), str(code)): int(n) for domain, code, n in rows}

    def settled_earnings(self, since: float, period_seconds: int) -> dict[float, tuple[int, int]]:
        """Base units earned and jobs settled per period since ``since``: ``{period start: (units, jobs)}``.

        Periods are multiples of ``period_seconds`` since the epoch (UTC hours or days); only periods with a
        settled job appear. A job counts, with its receipt's amount as in :meth:`payment_totals`, in the
        period it settled: ``settled`` is terminal, so the row's ``updated_at`` is that moment.
        """
        if period_seconds <= 0:
            raise ValueError(f"period_seconds must be positive, not {period_seconds}")
        periods: dict[float, tuple[int, int]] = {}
        with self._read() as conn:
            rows = conn.execute(
                "SELECT j.updated_at, json_extract(p.receipt_json, '$.receipt.amount') FROM jobs j "
                "JOIN payments p ON p.job = j.id WHERE j.state = 'settled' AND j.updated_at >= ?",
                (since,),
            ).fetchall()
        for at, amount in rows:
            start = float(math.floor(at / period_seconds) * period_seconds)
            units, jobs = periods.get(start, (0, 0))
            periods[start] = (units + int(amount or 0), jobs + 1)
        return periods


def _prepare_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema on first open; check its version and re-derive the transitions table otherwise.

    The ``transitions`` table is a copy of :data:`TRANSITIONS` (the one definition), refreshed on every open
    so the database guard and the Python check can never disagree. Reads a handful of rows, never the jobs.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if exists is None:
            for statement in (*_SCHEMA, *_SCHEMA_PAYMENTS, *_SCHEMA_WEBHOOKS):
                conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        else:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = None if row is None else int(row[0])
            # each schema adds tables to the one before: 1 lacks the payment tables, 2 the webhook cursor
            missing = {1: (*_SCHEMA_PAYMENTS, *_SCHEMA_WEBHOOKS), 2: _SCHEMA_WEBHOOKS}.get(version or 0)
            if missing is not None:
                for statement in missing:
                    conn.execute(statement)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                version = SCHEMA_VERSION
            if version != SCHEMA_VERSION:
                raise JournalError(
                    "journal_schema_mismatch",
                    f"{path} has journal schema {version}, this node reads {SCHEMA_VERSION}",
                    retryable=False,
                )
        wanted = {(src, dst) for src, dsts in TRANSITIONS.items() for dst in dsts}
        stored = set(conn.execute("SELECT from_state, to_state FROM transitions").fetchall())
        if stored != wanted:
            conn.execute("DELETE FROM transitions")
            conn.executemany("INSERT INTO transitions (from_state, to_state) VALUES (?, ?)", sorted(wanted))
        conn.execute("COMMIT")
    except BaseException:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
