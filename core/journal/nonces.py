"""The replay cache: each signed request's nonce ``(iss, jti)``, kept until the token expires."""

from __future__ import annotations

from core.journal.engine import JournalEngine
from core.journal.records import _check_time
from core.journal.schema import _SQL_NONCE_INSERT, _SQL_NONCE_PRUNE, _SQL_NONCE_SEEN

__all__ = ["NonceStore"]


class NonceStore(JournalEngine):
    """The ``nonces`` table: a replay is a nonce already recorded, across restarts too."""

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
