"""Jobs and their events: creation with a quote, transitions the lifecycle allows, progress, and job reads.

Every move is checked against :data:`~core.lifecycle.TRANSITIONS` here, including the conditions on a retry
(``failed -> accepted``) and a re-quote (``expired -> priced``), before the database's trigger checks it
again.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, Final, Literal

from core.errors import DOMAINS, ConflictError, Domain, IllegalTransitionError, JournalError, NotFoundError
from core.journal.commit import _Txn
from core.journal.engine import JournalEngine
from core.journal.records import (
    _QUOTE_FIELDS,
    Event,
    HeldResources,
    JobFields,
    JobRecord,
    _check_domain,
    _check_price,
    _check_state,
    _check_time,
    _column_values,
    _dumps,
    _event,
    _job,
)
from core.journal.schema import (
    _JOB_COLUMNS,
    _SQL_ACTIVE_COUNT,
    _SQL_COUNT_BY_STATE,
    _SQL_DUE_QUOTES,
    _SQL_EVENTS,
    _SQL_FAILED_BY_DOMAIN,
    _SQL_FIND,
    _SQL_GET,
    _SQL_HELD,
    _SQL_HOLDING,
    _SQL_INSERT_JOB,
    _SQL_LAST_EXPIRY_SOURCE,
    _SQL_STATE,
)
from core.lifecycle import JOB_STATES, JobState, is_allowed

__all__ = ["JobStore"]

_FAILED: Final = "failed"


class JobStore(JournalEngine):
    """The ``jobs`` table and its ``events``: every job's row and the append-only log of what happened to it.

    Capacity is not stored separately: a job holds its ``cpus``/``memory_mb``/``gpus`` while it is
    ``priced`` with a live quote, ``accepted`` or ``running``; :meth:`held_resources` derives the ledger
    from that.
    """

    @staticmethod
    def _fetch_job(conn: sqlite3.Connection, id: str) -> JobRecord | None:
        row = conn.execute(_SQL_GET, (id,)).fetchone()
        return None if row is None else _job(row)

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
        validator_url: str | None = None,
    ) -> JobRecord:
        """Record a new job and its quote: ``created`` then ``priced``, two events, one transaction.

        With ``callback_url`` the job's webhook cursor is recorded in the same transaction, so every
        transition from the first on is delivered (see :meth:`webhooks_due`); with ``validator_url`` the
        validation notice the node owes once the job is completed (see :meth:`notices_due`).

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
                if validator_url is not None:
                    txn.conn.execute(
                        "INSERT INTO validation_notices (job, url, next_at) VALUES (?, ?, ?)",
                        (id, validator_url, at),
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
