"""The webhook outbox: the ``events`` table is the outbox, and one cursor per job says what was delivered.

The cursor moves only after the requester answered with a 2xx, so each transition is delivered at least once.
"""

from __future__ import annotations

from typing import Any

from core.journal.engine import JournalEngine
from core.journal.records import WebhookDue, _event
from core.journal.schema import _SQL_EVENTS

__all__ = ["WebhookStore"]


class WebhookStore(JournalEngine):
    """The ``webhooks`` table: per job with a callback URL, its cursor, attempts and next try."""

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
