"""Payments and chain transactions: each job's escrow terms, funding and receipt; every signed transaction.

A transaction is recorded before it is broadcast and resolved by hash afterwards; the database refuses a
second live transaction for one job and purpose, a second open registry transaction of one wallet, or a
second use of one nonce. A registry transaction (``register``, ``leave``) belongs to no job, so it notes
nothing in any job's events.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from core.errors import ConflictError, NotFoundError
from core.journal.jobs import JobStore
from core.journal.records import (
    REGISTRY_PURPOSES,
    TX_OPEN_STATES,
    Event,
    FundingState,
    JobRecord,
    PaymentRecord,
    TxPurpose,
    TxRecord,
    TxState,
    _check_time,
    _dumps,
)
from core.journal.schema import _PAYMENT_COLUMNS, _TX_COLUMNS, _TX_FIELDS

__all__ = ["PaymentStore"]


class PaymentStore(JobStore):
    """The ``payments`` and ``chain_txs`` tables; a verdict also moves its job, so this is a job store too."""

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
        totals: dict[str, int] = {
            "earned": 0,
            "gas_fund": 0,
            "gas_release": 0,
            "gas_refund": 0,
            "gas_register": 0,
            "gas_leave": 0,
        }
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

    # ----------------------------------------------------------------------------------------- chain txs

    def record_tx(
        self, job: str | None, purpose: TxPurpose, *, sender: str, nonce: int, hash: str, raw: str
    ) -> TxRecord:
        """Record a signed transaction *before* it is broadcast, so a crash after sending still knows it.

        ``job`` is None for a registry transaction (``register``, ``leave``), and only for one. Raises
        :class:`ConflictError` (``tx_exists``) if the nonce is taken, the job already has a live transaction
        for ``purpose``, or the wallet already has an open registry transaction: the database refuses to let
        one payment, or one registration, be sent twice.
        """
        if (job is None) != (purpose in REGISTRY_PURPOSES):
            raise ValueError(f"a {purpose} transaction {'needs' if job is None else 'takes no'} job")
        with self._write() as txn:
            at = self._now()
            try:
                cur = txn.conn.execute(
                    "INSERT INTO chain_txs (job, purpose, sender, nonce, hash, raw, state, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, 'signed', ?, ?)",
                    (job, purpose, sender, nonce, hash, raw, at, at),
                )
            except sqlite3.IntegrityError as exc:
                whose = f"job {job}" if job is not None else f"wallet {sender}"
                raise ConflictError(
                    "tx_exists",
                    f"{whose} already has a live {purpose} transaction, or nonce {nonce} is taken",
                    details={"id": job, "purpose": purpose, "nonce": nonce, "sender": sender},
                ) from exc
            if job is not None:
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
            if note is not None and record.job is not None:
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

    def txs(
        self,
        job: str | None = None,
        *,
        states: Iterable[TxState] | None = None,
        purposes: Iterable[TxPurpose] | None = None,
    ) -> list[TxRecord]:
        """Recorded transactions, oldest first: of one job, in the given states, of the given purposes."""
        clauses: list[str] = []
        params: list[Any] = []
        if job is not None:
            clauses.append("job = ?")
            params.append(job)
        for column, values in (("state", states), ("purpose", purposes)):
            if values is not None:
                wanted = list(values)
                clauses.append(f"{column} IN ({', '.join('?' for _ in wanted)})")
                params.extend(wanted)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_TX_COLUMNS} FROM chain_txs{where} ORDER BY id", params).fetchall()
        return [TxRecord(*row) for row in rows]

    def registry_tx(self, sender: str) -> TxRecord | None:
        """``sender``'s registry transaction (``register`` or ``leave``) still open, if any (at most one)."""
        open_states = ", ".join(f"'{state}'" for state in TX_OPEN_STATES)
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_TX_COLUMNS} FROM chain_txs WHERE sender = ? AND purpose IN ('register', 'leave') "
                f"AND state IN ({open_states})",
                (sender,),
            ).fetchone()
        return None if row is None else TxRecord(*row)

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
