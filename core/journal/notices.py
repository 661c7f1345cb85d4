"""The validation notices a node owes: one per job whose envelope names ``validation.validator_url``.

A notice falls due once its job is ``completed`` (it has a result, and no receipt yet); it is marked
delivered only after the validator answered with a 2xx, so it is sent at least once. The webhook dispatcher
(:mod:`node.webhooks`) sends it, with the webhooks' backoff and attempt limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.journal.engine import JournalEngine

__all__ = ["NoticeDue", "NoticeStore"]


@dataclass(frozen=True, slots=True)
class NoticeDue:
    """A completed job's validation notice, not yet acknowledged by its validator."""

    job: str
    url: str
    attempts: int


class NoticeStore(JournalEngine):
    """The ``validation_notices`` table: per job with a validator URL, whether its notice was delivered."""

    def notices_due(self, now: float, limit: int = 100) -> list[NoticeDue]:
        """Undelivered notices of completed jobs whose retry time has come, the longest-waiting first."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT n.job, n.url, n.attempts FROM validation_notices n JOIN jobs j ON j.id = n.job "
                "WHERE n.delivered = 0 AND n.gave_up = 0 AND n.next_at <= ? AND j.state = 'completed' "
                "ORDER BY n.next_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [NoticeDue(job=job, url=url, attempts=attempts) for job, url, attempts in rows]

    def notice_delivered(self, job: str) -> None:
        """The validator acknowledged the notice (a 2xx): it is not sent again."""
        with self._write() as txn:
            txn.conn.execute(
                "UPDATE validation_notices SET delivered = 1, last_error = NULL WHERE job = ?", (job,)
            )

    def notice_failed(self, job: str, error: str, *, retry_at: float | None) -> None:
        """A send failed: try again at ``retry_at``, or never (``None``: the node gave up on it)."""
        with self._write() as txn:
            txn.conn.execute(
                "UPDATE validation_notices SET attempts = attempts + 1, last_error = ?, next_at = ?, "
                "gave_up = ? WHERE job = ?",
                (error[:500], retry_at if retry_at is not None else self._now(), int(retry_at is None), job),
            )

    def notice(self, job: str) -> dict[str, Any] | None:
        """A job's validation notice, for its status view."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT url, delivered, attempts, last_error, gave_up FROM validation_notices WHERE job = ?",
                (job,),
            ).fetchone()
        if row is None:
            return None
        url, delivered, attempts, error, gave_up = row
        return {
            "url": url,
            "delivered": bool(delivered),
            "attempts": attempts,
            "last_error": error,
            "gave_up": bool(gave_up),
        }
