"""The validator service's durable record: one row per job it was told about, and the notices' ``jti``.

SQLite in WAL mode under the validator's home (``verdicts.sqlite``). A job is ``(node DID, job id)``; its
row moves ``accepted -> validating -> judged -> posted``, or ends ``refused`` (the result could not be
judged: no receipt is ever signed for it). The signed receipt is written with the move to ``judged``,
before it is sent anywhere, and is never replaced: a restart re-posts exactly the stored bytes, so the
validator never signs two different receipts for one job, even across crashes.

A notice's ``(iss, jti)`` is recorded in the same transaction as the row it creates or finds
(:class:`~payments.jwt.ReplayCache`), so a refused notice leaves no trace and a replayed one is refused.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from core.errors import JournalError
from core.sqlitefile import open_wal

__all__ = ["FILENAME", "NoticeRow", "NoticeState", "VerdictStore"]

FILENAME: Final = "verdicts.sqlite"
NoticeState = Literal["accepted", "validating", "judged", "posted", "refused"]
OPEN_STATES: Final[tuple[NoticeState, ...]] = ("accepted", "validating", "judged")
"""Work a restart resumes: validation not done (accepted, validating) or its receipt not yet posted."""

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS notices (
        node_did TEXT NOT NULL,
        job TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('accepted', 'validating', 'judged', 'posted', 'refused')),
        receipt_json TEXT,
        report_json TEXT,
        error_json TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (node_did, job),
        CHECK (state NOT IN ('judged', 'posted') OR receipt_json IS NOT NULL)
    ) WITHOUT ROWID""",
    # a stored receipt is never replaced by another (a bug that tried would abort, not sign twice)
    """CREATE TRIGGER IF NOT EXISTS notices_receipt_once BEFORE UPDATE OF receipt_json ON notices
    WHEN OLD.receipt_json IS NOT NULL AND NEW.receipt_json IS NOT OLD.receipt_json
    BEGIN SELECT RAISE(ABORT, 'receipt_already_signed'); END""",
    "CREATE TABLE IF NOT EXISTS jtis (iss TEXT NOT NULL, jti TEXT NOT NULL, exp INTEGER NOT NULL, "
    "PRIMARY KEY (iss, jti)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS jtis_exp ON jtis (exp)",
)
_COLUMNS: Final = (
    "node_did, job, endpoint, state, receipt_json, report_json, error_json, attempts, next_at, "
    "created_at, updated_at"
)


@dataclass(frozen=True, slots=True)
class NoticeRow:
    """One job the validator was told about, and how far its validation got."""

    node_did: str
    job: str
    endpoint: str
    state: NoticeState
    receipt_json: str | None
    report_json: str | None
    error_json: str | None
    attempts: int
    next_at: float
    created_at: float
    updated_at: float

    @property
    def receipt(self) -> dict[str, Any] | None:
        """The stored body of ``POST /v1/jobs/{id}/receipt`` (receipt and signature), as signed."""
        return None if self.receipt_json is None else dict(json.loads(self.receipt_json))

    def view(self) -> dict[str, Any]:
        """What a notice for this job is answered with: its state and, once judged, the verdict."""
        doc: dict[str, Any] = {"node": self.node_did, "job": self.job, "state": self.state}
        if self.report_json is not None:
            doc["verdict"] = json.loads(self.report_json)
        if self.error_json is not None:
            doc["error"] = json.loads(self.error_json)
        if self.state in OPEN_STATES and self.attempts:
            doc["attempts"] = self.attempts
        return doc


class VerdictStore:
    """The validator's SQLite record. Every method is one short transaction; safe across threads."""

    def __init__(self, conn: sqlite3.Connection, *, now: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._now = now

    @classmethod
    def open(cls, home: Path, *, now: Callable[[], float] = time.time) -> VerdictStore:
        """Open (creating) ``home/verdicts.sqlite`` in WAL mode with synchronous=FULL."""
        try:
            conn = open_wal(home / FILENAME, synchronous="full", busy_timeout_ms=5000)
            for statement in _SCHEMA:
                conn.execute(statement)
        except (sqlite3.Error, OSError) as exc:
            raise JournalError("verdicts_unreadable", f"{home / FILENAME}: {exc}", retryable=False) from None
        return cls(conn, now=now)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise JournalError("verdicts_write_failed", f"the verdict store failed: {exc}") from None

    # -- replay (payments.jwt.ReplayCache) ---------------------------------------------------------------

    def nonce_seen(self, iss: str, jti: str) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM jtis WHERE iss = ? AND jti = ?", (iss, jti)).fetchone()
        return row is not None

    def check_and_record(self, iss: str, jti: str, exp: int) -> bool:
        with self._txn() as conn:
            conn.execute("DELETE FROM jtis WHERE exp < ?", (int(self._now()),))
            cur = conn.execute("INSERT OR IGNORE INTO jtis (iss, jti, exp) VALUES (?, ?, ?)", (iss, jti, exp))
            return cur.rowcount == 1

    # -- notices -----------------------------------------------------------------------------------------

    def admit(self, node_did: str, job: str, endpoint: str) -> tuple[NoticeRow, bool]:
        """The job's row, created ``accepted`` if it is new; and whether this call created it."""
        at = self._now()
        with self._txn() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO notices (node_did, job, endpoint, state, next_at, created_at, "
                "updated_at) VALUES (?, ?, ?, 'accepted', ?, ?, ?)",
                (node_did, job, endpoint, at, at, at),
            )
            created = cur.rowcount == 1
            row = self._get(conn, node_did, job)
        assert row is not None
        return row, created

    def get(self, node_did: str, job: str) -> NoticeRow | None:
        with self._lock:
            return self._get(self._conn, node_did, job)

    def open_rows(self) -> list[NoticeRow]:
        """Every job whose work is not finished (a restart resumes them), oldest first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM notices WHERE state IN ('accepted', 'validating', 'judged') "
                "ORDER BY created_at"
            ).fetchall()
        return [NoticeRow(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per state, for /metrics."""
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM notices GROUP BY state").fetchall()
        return {str(state): int(n) for state, n in rows}

    def validating(self, node_did: str, job: str) -> None:
        """accepted -> validating: the judging starts (a crash now means it starts again)."""
        self._move(node_did, job, "validating", expect=("accepted", "validating"))

    def judged(self, node_did: str, job: str, receipt: dict[str, Any], report: dict[str, Any]) -> NoticeRow:
        """validating -> judged, with the signed receipt and the report: written before any post."""
        return self._move(
            node_did,
            job,
            "judged",
            expect=("validating",),
            receipt_json=json.dumps(receipt, sort_keys=True),
            report_json=json.dumps(report, sort_keys=True),
        )

    def posted(self, node_did: str, job: str) -> NoticeRow:
        """judged -> posted: the node took the receipt (a 2xx: recorded now, or the same one before)."""
        return self._move(node_did, job, "posted", expect=("judged", "posted"), error_json=None)

    def refused(self, node_did: str, job: str, error: dict[str, Any]) -> NoticeRow:
        """The job cannot be validated, or the node refused its receipt for good: the row ends here."""
        return self._move(
            node_did, job, "refused", expect=OPEN_STATES, error_json=json.dumps(error, sort_keys=True)
        )

    def retry_later(self, node_did: str, job: str, error: dict[str, Any], delay: float) -> NoticeRow:
        """A try failed for a passing reason (the node unreachable): same state, next try after ``delay``."""
        at = self._now()
        with self._txn() as conn:
            conn.execute(
                "UPDATE notices SET attempts = attempts + 1, next_at = ?, error_json = ?, updated_at = ? "
                "WHERE node_did = ? AND job = ?",
                (at + delay, json.dumps(error, sort_keys=True), at, node_did, job),
            )
            row = self._get(conn, node_did, job)
        assert row is not None
        return row

    def _move(
        self, node_did: str, job: str, state: NoticeState, *, expect: tuple[str, ...], **fields: Any
    ) -> NoticeRow:
        at = self._now()
        sets = ", ".join(f"{name} = ?" for name in fields)
        with self._txn() as conn:
            row = self._get(conn, node_did, job)
            if row is None or row.state not in expect:
                raise JournalError(
                    "verdict_state_conflict",
                    f"job {job} of {node_did} is {row.state if row else 'unknown'}, not one of {expect}",
                    retryable=False,
                )
            conn.execute(
                f"UPDATE notices SET state = ?, attempts = 0, next_at = ?, updated_at = ?"
                f"{', ' + sets if sets else ''} WHERE node_did = ? AND job = ?",
                (state, at, at, *fields.values(), node_did, job),
            )
            moved = self._get(conn, node_did, job)
        assert moved is not None
        return moved

    @staticmethod
    def _get(conn: sqlite3.Connection, node_did: str, job: str) -> NoticeRow | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM notices WHERE node_did = ? AND job = ?", (node_did, job)
        ).fetchone()
        return None if row is None else NoticeRow(*row)
