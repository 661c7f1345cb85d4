"""The requester home: what a requester (a person, a script, an agent) keeps so that a restart resets nothing.

One SQLite file in WAL mode, ``HOME/requester/home.sqlite3`` (:func:`default_path`), three tables:

- ``submissions``: an idempotency key -> the envelope's hash and ``job_id``, the workflow it is spent under,
  the node chosen (DID, endpoint, the node's job id), its state (``routing`` / ``submitted`` / ``failed``),
  how many times it was routed, when it was created and last changed;
- ``decisions``: every routing decision (the JSON of :class:`requester.routing_decision.RoutingDecision`)
  per key and attempt;
- ``reservations``: one per key, the USDC base units ``held`` for its job (before anything is signed),
  ``committed`` at the job's charge, or ``released`` (refused, refunded), with the workflow and UTC day it
  counts against.

Every decision is one ``BEGIN IMMEDIATE`` transaction, so it is all there or not at all after a crash, and
two processes sharing the file are serialised: a reservation reads what is spent and held, checks every
budget (:mod:`requester.budgets`) and writes its hold in the same transaction, so concurrent reservations
never overspend. A refusal (:class:`~core.errors.BudgetError` ``budget_exceeded``, with what is left of
each budget in ``details``) rolls back and leaves no trace.

The key's life (``requester.home_route`` drives it around :func:`requester.routing.route`):

1. :meth:`RequesterHome.claim` records the key as ``routing`` before any network call. The same key with
   the same envelope returns what is recorded (``replay`` of a submitted job, ``in_flight``, ``failed``);
   with another envelope it is a :class:`~core.errors.ConflictError` ``idempotency_key_conflict``.
2. :meth:`RequesterHome.take` routes an ``in_flight`` or ``failed`` key again, within the retry budget
   (``attempts_per_key``); an in-flight key keeps its node, so a crash never leads to a second node.
3. :meth:`RequesterHome.hold`, before a node is asked to take the job: the node is pinned and the quote's
   amount reserved against the budgets, together.
4. :meth:`RequesterHome.finish` records the decision: ``submitted`` commits the reservation at the charge,
   an unknown outcome keeps it held (the key stays in flight at its node), anything else releases it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, cast

from core.errors import BudgetError, ConflictError, HearthError, RequestError
from core.sqlitefile import open_wal
from payments.receipts import usdc_str
from requester.budgets import MAX_AMOUNT, Budgets, check_workflow

SCHEMA_VERSION: Final = 1
MAX_KEY_LENGTH: Final = 256

KeyState = Literal["routing", "submitted", "failed"]
ClaimKind = Literal["new", "replay", "in_flight", "failed"]

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS submissions (
    key TEXT PRIMARY KEY,
    envelope_hash TEXT NOT NULL,
    job_id TEXT NOT NULL,
    workflow TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('routing', 'submitted', 'failed')),
    node TEXT, endpoint TEXT, job TEXT,
    quote_json TEXT,
    sticky INTEGER NOT NULL DEFAULT 0 CHECK (sticky IN (0, 1)),
    attempts INTEGER NOT NULL CHECK (attempts >= 1),
    created REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS decisions (
    key TEXT NOT NULL REFERENCES submissions (key),
    attempt INTEGER NOT NULL,
    at REAL NOT NULL,
    outcome TEXT NOT NULL,
    decision_json TEXT NOT NULL,
    PRIMARY KEY (key, attempt)
);
CREATE TABLE IF NOT EXISTS reservations (
    key TEXT PRIMARY KEY REFERENCES submissions (key),
    workflow TEXT NOT NULL,
    day TEXT NOT NULL,
    amount INTEGER NOT NULL CHECK (amount >= 0),
    state TEXT NOT NULL CHECK (state IN ('held', 'committed', 'released')),
    created REAL NOT NULL, updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_day ON reservations (day, state);
CREATE INDEX IF NOT EXISTS reservations_by_workflow ON reservations (workflow, state);
"""
_COLS: Final = (
    "key, envelope_hash, job_id, workflow, state, node, endpoint, job, quote_json, sticky, attempts, "
    "created, updated"
)
_SPENDING: Final = "('held', 'committed')"


def default_path(home: Path) -> Path:
    """Where a requester home keeps its state: ``HOME/requester/home.sqlite3``."""
    return home / "requester" / "home.sqlite3"


def utc_day(at: float) -> str:
    """The UTC day of a Unix time, ``YYYY-MM-DD``: the window of the per-day budget."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


def _day_ends(day: str) -> str:
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    return (start + timedelta(days=1)).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the home holds for one idempotency key."""

    key: str
    envelope_hash: str
    job_id: str
    workflow: str
    state: KeyState
    node: str | None
    endpoint: str | None
    job: str | None
    quote: dict[str, Any] | None  # the node's quote it was sent with: {"jwt", "ask", "terms"}
    sticky: bool  # the node may hold the job: the key never goes to another
    attempts: int
    created: float
    updated: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Claim:
    """What :meth:`RequesterHome.claim` found: a ``new`` key (now ``routing``), a ``replay`` of a submitted
    job, a key ``in_flight`` (routing recorded, no decision since: resume it on its node), or one whose
    last routing ``failed``; ``decision`` is the last routing decision recorded for it."""

    kind: ClaimKind
    record: KeyRecord
    decision: dict[str, Any] | None


def _home_error(message: str) -> HearthError:
    return HearthError("requester_home_failed", message, domain="storage", retryable=True)


class RequesterHome:
    """The requester home's SQLite file. Safe to share between threads (one lock) and processes (SQLite's
    write lock, waited for up to ``busy_timeout_ms``). ``now`` is the clock (Unix seconds), for the day."""

    def __init__(self, conn: sqlite3.Connection, path: Path, budgets: Budgets, now: Callable[[], float]):
        self._conn = conn
        self.path = path
        self.budgets = budgets
        self._now = now
        self._lock = threading.RLock()

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        budgets: Budgets | None = None,
        now: Callable[[], float] = time.time,
        busy_timeout_ms: int = 10_000,
    ) -> RequesterHome:
        """Open (or create) the home's file at ``path``; ``requester_home_failed`` if it is not usable (not
        SQLite, no WAL, another schema version)."""
        conn: sqlite3.Connection | None = None
        try:
            conn = open_wal(path, busy_timeout_ms=busy_timeout_ms)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            conn.execute("COMMIT")
            if version != str(SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, this Hearth reads {SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            raise _home_error(f"cannot open the requester home at {path}: {exc}") from None
        return cls(conn, path, budgets or Budgets(), now)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RequesterHome:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        """One decision: ``BEGIN IMMEDIATE`` (the write lock first, so what is read cannot change before the
        write), committed when the block ends, rolled back when it raises."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _home_error(f"{self.path}: {exc}") from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise _home_error(f"{self.path}: {exc}") from None
                raise

    # -- reading --------------------------------------------------------------------------------------

    def record(self, key: str) -> KeyRecord | None:
        """What is recorded for ``key`` (None: nothing)."""
        with self._txn() as conn:
            return _record(conn, key)

    def decision(self, key: str) -> dict[str, Any] | None:
        """The last routing decision recorded for ``key``."""
        with self._txn() as conn:
            return _last_decision(conn, key)

    def decisions(self, key: str) -> list[dict[str, Any]]:
        """Every routing decision recorded for ``key``, oldest first (``attempt``, ``at``, ``outcome``)."""
        with self._txn() as conn:
            rows = conn.execute(
                "SELECT attempt, at, outcome, decision_json FROM decisions WHERE key = ? ORDER BY attempt",
                (key,),
            ).fetchall()
        return [{"attempt": a, "at": at, "outcome": o, "decision": json.loads(d)} for a, at, o, d in rows]

    def left(self, workflow: str | None = None) -> dict[str, Any]:
        """What is left today and of ``workflow``'s budget (base units and USDC), as in a refusal."""
        with self._txn() as conn:
            return self._left(conn, workflow, None, utc_day(self._now()))

    def reservation(self, key: str) -> tuple[str, int] | None:
        """``(state, amount)`` of ``key``'s reservation (None: none was made)."""
        with self._txn() as conn:
            row = conn.execute("SELECT state, amount FROM reservations WHERE key = ?", (key,)).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    # -- the key's life -------------------------------------------------------------------------------

    def claim(self, key: str, *, envelope_hash: str, job_id: str, workflow: str) -> Claim:
        """Record ``key`` as ``routing`` for this envelope, or say what it already is (see the module)."""
        _check_key(key)
        try:
            check_workflow(workflow)
        except ValueError as exc:
            raise RequestError("invalid_workflow", str(exc)) from None
        with self._txn() as conn:
            rec = _record(conn, key)
            if rec is None:
                at = self._now()
                conn.execute(
                    f"INSERT INTO submissions ({_COLS}) "
                    "VALUES (?, ?, ?, ?, 'routing', NULL, NULL, NULL, NULL, 0, 1, ?, ?)",
                    (key, envelope_hash, job_id, workflow, at, at),
                )
                rec = _record(conn, key)
                assert rec is not None
                return Claim("new", rec, None)
            if rec.envelope_hash != envelope_hash:
                raise ConflictError(
                    "idempotency_key_conflict",
                    f"the idempotency key {key!r} was used for another envelope (job_id {rec.job_id!r}); "
                    "use a new key for a different job",
                    details={
                        "key": key,
                        "job_id": rec.job_id,
                        "recorded_envelope_hash": rec.envelope_hash,
                        "envelope_hash": envelope_hash,
                        "state": rec.state,
                    },
                )
            kinds: dict[KeyState, ClaimKind] = {
                "submitted": "replay",
                "routing": "in_flight",
                "failed": "failed",
            }
            kind = kinds[rec.state]
            return Claim(kind, rec, _last_decision(conn, key))

    def take(self, key: str) -> KeyRecord:
        """Route an ``in_flight`` or ``failed`` key once more: one more attempt, within ``attempts_per_key``.

        An in-flight key keeps its node, and from now on never leaves it (the cut-off routing may have
        reached it); a failed one goes to any node unless its node may hold the job (``sticky``).
        Raises ``budget_exceeded`` (budget ``attempts``) when its attempts are spent.
        """
        with self._txn() as conn:
            rec = _record(conn, key)
            if rec is None or rec.state == "submitted":
                raise ConflictError(
                    "idempotency_key_state",
                    f"the idempotency key {key!r} is "
                    + ("unknown" if rec is None else "submitted: its job is recorded"),
                    details={"key": key, "state": None if rec is None else rec.state},
                )
            limit = self.budgets.attempts_per_key
            if rec.attempts >= limit:
                left = self._left(conn, rec.workflow, key, utc_day(self._now()))
                left["attempts"] = {"key": key, "limit": limit, "used": rec.attempts, "left": 0}
                raise BudgetError(
                    "budget_exceeded",
                    f"the idempotency key {key!r} was routed {rec.attempts} times, the most its retry "
                    f"budget allows ({limit}); use a new key to route the job again",
                    details={"budget": "attempts", "key": key, "left": left},
                )
            if rec.state == "failed" and not rec.sticky:
                cols = ", node = NULL, endpoint = NULL, job = NULL, quote_json = NULL"
            else:
                cols = ", sticky = 1" if rec.node is not None else ""
            conn.execute(
                f"UPDATE submissions SET state = 'routing', attempts = attempts + 1, updated = ?{cols} "
                "WHERE key = ?",
                (self._now(), key),
            )
            taken = _record(conn, key)
            assert taken is not None
            return taken

    def hold(
        self,
        key: str,
        *,
        amount: int,
        node: str,
        endpoint: str,
        job: str,
        quote: dict[str, Any] | None = None,
    ) -> None:
        """Before ``node`` is asked to take ``key``'s job: pin the node (with ``quote``, the node's quote it
        is sent: ``{"jwt", "ask", "terms"}``, to resume with) and reserve ``amount`` base units against the
        key's workflow and today's budget, in one transaction.

        Raises ``idempotency_key_pinned`` when the key is already at another node, ``budget_exceeded``
        (with what is left of each budget) when a budget would be overspent; either way nothing changes.
        """
        if not 0 <= amount <= MAX_AMOUNT:
            raise RequestError("invalid_amount", f"an amount of {amount} base units cannot be reserved")
        with self._txn() as conn:
            rec = _record(conn, key)
            if rec is None or rec.state != "routing":
                raise ConflictError(
                    "idempotency_key_state",
                    f"the idempotency key {key!r} is not being routed",
                    details={"key": key, "state": None if rec is None else rec.state},
                )
            if rec.node is not None and rec.node != node:
                raise ConflictError(
                    "idempotency_key_pinned",
                    f"the job of idempotency key {key!r} may be at {rec.node}; it is never sent to a second "
                    f"node ({node})",
                    details={"key": key, "node": rec.node, "endpoint": rec.endpoint, "job": rec.job},
                )
            now = self._now()
            day = utc_day(now)
            left = self._left(conn, rec.workflow, key, day)
            over = [name for name in ("per_day", "workflow") if name in left and left[name]["left"] < amount]
            if over:
                raise BudgetError(
                    "budget_exceeded",
                    f"{usdc_str(amount)} USDC for {key!r} is over the {_label(over[0], rec.workflow)}: "
                    f"{left[over[0]]['left_usdc']} USDC left; nothing was signed",
                    details={
                        "budget": over[0],
                        "key": key,
                        "asked": amount,
                        "asked_usdc": usdc_str(amount),
                        "left": left,
                    },
                )
            conn.execute(
                "INSERT INTO reservations (key, workflow, day, amount, state, created, updated) "
                "VALUES (?, ?, ?, ?, 'held', ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "workflow = excluded.workflow, day = excluded.day, amount = excluded.amount, state = 'held', "
                "updated = excluded.updated",
                (key, rec.workflow, day, amount, now, now),
            )
            conn.execute(
                "UPDATE submissions SET node = ?, endpoint = ?, job = ?, quote_json = ?, updated = ? "
                "WHERE key = ?",
                (node, endpoint, job, None if quote is None else json.dumps(quote), now, key),
            )

    def finish(
        self,
        key: str,
        decision: dict[str, Any],
        *,
        charge: int = 0,
    ) -> KeyRecord:
        """Record a routing decision (its JSON) for ``key`` and what follows from its ``outcome``:
        ``submitted`` -> the key is submitted and its reservation committed at ``charge`` base units (what the
        job was funded with; 0 when unpaid); ``outcome_unknown`` -> the key stays in flight at its node, the
        reservation held; anything else -> failed, the reservation released. A node that accepted the job
        or may have (an attempt ``ok`` or ``unknown``) stays the key's node for good (``sticky``)."""
        outcome = str(decision.get("outcome"))
        job = decision.get("job") if isinstance(decision.get("job"), dict) else None
        with self._txn() as conn:
            rec = _record(conn, key)
            if rec is None:
                raise ConflictError("idempotency_key_state", f"the idempotency key {key!r} is unknown")
            now = self._now()
            conn.execute(
                "INSERT OR REPLACE INTO decisions (key, attempt, at, outcome, decision_json) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, rec.attempts, now, outcome, json.dumps(decision, sort_keys=True)),
            )
            state: KeyState = (
                "submitted"
                if outcome == "submitted"
                else "routing"
                if outcome == "outcome_unknown"
                else "failed"
            )
            attempts = decision.get("attempts")
            reached = isinstance(attempts, list) and any(
                isinstance(a, dict) and a.get("outcome") in ("ok", "unknown") for a in attempts
            )
            if job is not None and (state != "failed" or reached):
                conn.execute(
                    "UPDATE submissions SET node = ?, endpoint = ?, job = ?, sticky = 1 WHERE key = ?",
                    (job.get("node"), job.get("endpoint"), job.get("id"), key),
                )
            conn.execute("UPDATE submissions SET state = ?, updated = ? WHERE key = ?", (state, now, key))
            if state == "submitted":
                self._settle(conn, key, "committed", charge, now)
            elif state == "failed":
                self._settle(conn, key, "released", None, now)
            done = _record(conn, key)
            assert done is not None
            return done

    def commit(self, key: str, charge: int) -> None:
        """The job's actual charge is known (e.g. paid less than funded): the reservation becomes it."""
        with self._txn() as conn:
            self._settle(conn, key, "committed", charge, self._now())

    def release(self, key: str) -> None:
        """The job was refused or refunded: what was held or committed for it counts no more."""
        with self._txn() as conn:
            self._settle(conn, key, "released", None, self._now())

    # -- inside a transaction -------------------------------------------------------------------------

    def _settle(self, conn: sqlite3.Connection, key: str, state: str, amount: int | None, now: float) -> None:
        if amount is not None and not 0 <= amount <= MAX_AMOUNT:
            raise RequestError("invalid_amount", f"an amount of {amount} base units cannot be recorded")
        conn.execute(
            "UPDATE reservations SET state = ?, amount = COALESCE(?, amount), updated = ? WHERE key = ?",
            (state, amount, now, key),
        )

    def _left(
        self, conn: sqlite3.Connection, workflow: str | None, but: str | None, day: str
    ) -> dict[str, Any]:
        """What is left of each configured budget, not counting key ``but``'s own reservation."""
        left: dict[str, Any] = {}
        if self.budgets.per_day is not None:
            used = _sum(conn, "day = ?", day, but)
            left["per_day"] = {
                "day": day,
                "resets_at": _day_ends(day),
                **_amounts(self.budgets.per_day, used),
            }
        if workflow is not None and workflow in self.budgets.workflows:
            used = _sum(conn, "workflow = ?", workflow, but)
            left["workflow"] = {"name": workflow, **_amounts(self.budgets.workflows[workflow], used)}
        return left


def _label(budget: str, workflow: str) -> str:
    return "per-day budget" if budget == "per_day" else f"budget of workflow {workflow!r}"


def _amounts(limit: int, used: int) -> dict[str, Any]:
    rest = max(limit - used, 0)
    return {
        "limit": limit,
        "used": used,
        "left": rest,
        "limit_usdc": usdc_str(limit),
        "used_usdc": usdc_str(used),
        "left_usdc": usdc_str(rest),
    }


def _sum(conn: sqlite3.Connection, where: str, value: str, but: str | None) -> int:
    row = conn.execute(
        f"SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE {where} AND state IN {_SPENDING} "
        "AND key IS NOT ?",
        (value, but),
    ).fetchone()
    return int(row[0])


def _record(conn: sqlite3.Connection, key: str) -> KeyRecord | None:
    row = conn.execute(f"SELECT {_COLS} FROM submissions WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    k, h, j, w, s, n, e, job, q, sticky, a, c, u = row
    quote = None if q is None else cast(dict[str, Any], json.loads(q))
    return KeyRecord(
        k, h, j, w, cast(KeyState, s), n, e, job, quote, bool(sticky), int(a), float(c), float(u)
    )


def _last_decision(conn: sqlite3.Connection, key: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT decision_json FROM decisions WHERE key = ? ORDER BY attempt DESC LIMIT 1", (key,)
    ).fetchone()
    return None if row is None else cast(dict[str, Any], json.loads(row[0]))


def _check_key(key: str) -> None:
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise RequestError(
            "invalid_idempotency_key",
            f"an idempotency key is 1 to {MAX_KEY_LENGTH} printable characters",
            details={"length": len(key)},
        )


__all__ = ["Claim", "KeyRecord", "RequesterHome", "default_path", "utc_day"]
