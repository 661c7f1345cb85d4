"""Validator receipts and what they decide: release the escrow to this node, or refund the payer.

:meth:`Verdicts.accept_receipt` verifies a validator's EIP-712 receipt (signer = the envelope's validator,
digest = this result, amount <= the quote, provider = this node), and the W3C credential wrapping it when
one comes along; it simulates the ``release`` (or, for a failing receipt, the ``refund``) with
``eth_call``, then records the verdict: ``completed -> validated | disputed``. Each round
:meth:`Verdicts.settle` sends the ``release`` or ``refund`` of every job with a verdict and no transaction
yet, after reading the escrow (a job already paid, by anyone, is never paid again); a confirmed
transaction moves the job to ``settled`` or ``refunded``. Part of :class:`payments.settlement.Settlement`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any, Literal

from eth_utils.address import to_checksum_address

from core.errors import ChainError, ConflictError, HearthError, NotFoundError, SettlementError
from core.journal import JobRecord, JobState, Journal, PaymentRecord, TxPurpose, TxRecord
from core.lifecycle import RECEIPT_STATES
from payments.chain import Chain, EscrowJob, EscrowStatus
from payments.outbox import Outbox
from payments.receipts import FundingTerms, Receipt, hex32, receipt_signer, result_digest
from payments.terms import ACTOR

log = logging.getLogger("hearth.settlement")


class Verdicts:
    """Takes validator receipts and carries out their verdicts on chain."""

    def __init__(
        self,
        journal: Journal,
        chain: Chain,
        outbox: Outbox,
        *,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self.journal = journal
        self.chain = chain
        self.outbox = outbox
        self._wake = wake

    # -- taking a receipt -----------------------------------------------------------------------------

    async def accept_receipt(self, job_key: str, body: Any) -> tuple[JobRecord, bool]:
        """Verify and record a validator receipt; returns the job and whether this call recorded it."""
        if not isinstance(body, dict):
            raise SettlementError(
                "invalid_receipt", "the body must be {'receipt': {...}, 'signature': '0x...'}"
            )
        receipt = Receipt.from_json(body.get("receipt"))
        sig_hex = body.get("signature")
        if not isinstance(sig_hex, str) or len(sig_hex) != 132 or not sig_hex.startswith("0x"):
            raise SettlementError(
                "invalid_receipt", "signature must be 0x and 130 hex digits", details={"field": "signature"}
            )
        try:
            signature = bytes.fromhex(sig_hex[2:])
        except ValueError:
            raise SettlementError(
                "invalid_receipt", "signature is not hex", details={"field": "signature"}
            ) from None
        job = self.journal.require(job_key)
        payment = self.journal.payment(job.id)
        if payment is None:
            raise SettlementError(
                "job_not_payable", f"job {job.id} has no escrow terms on this node", details={"job": job.id}
            )
        stored = {"receipt": receipt.to_json(), "signature": sig_hex, "credential": body.get("credential")}
        if job.state in RECEIPT_STATES:
            prior = payment.receipt or {}
            if prior.get("receipt") == stored["receipt"] and prior.get("signature") == sig_hex:
                return job, False  # the same receipt again: idempotent
            raise ConflictError(
                "receipt_recorded",
                f"job {job.id} is {job.state} under another receipt",
                details={"job": job.id},
            )
        if job.state != "completed":
            raise ConflictError(
                "job_not_completed",
                f"job {job.id} is {job.state}; a receipt is taken once it is completed",
                retryable=job.state in ("accepted", "running"),
                details={"job": job.id, "state": job.state},
            )
        terms = FundingTerms.from_json(payment.terms)
        check_receipt(job, terms, receipt, signature)
        if body.get("credential") is not None:
            await check_credential(body["credential"], receipt, signature)
        try:
            purpose: TxPurpose = "release" if receipt.passed else "refund"
            await self.chain.simulate(
                self._escrow_call(purpose, terms, receipt, signature), domain="settlement"
            )
        except ChainError as exc:
            if exc.code != "chain_unavailable":
                raise
            log.warning(
                "job %s: receipt taken without simulation (chain down); simulated before sending", job.id
            )
        except HearthError as exc:
            raise SettlementError(
                "receipt_rejected_onchain",
                f"the escrow would refuse this receipt: {exc.message}",
                details=exc.details,
            ) from None
        to: Literal["validated", "disputed"] = "validated" if receipt.passed else "disputed"
        updated, _ = self.journal.record_verdict(
            job.id,
            to,
            stored,
            actor=f"validator:{to_checksum_address(terms.validator)}",
            reason=f"receipt: {to}",
        )
        self._wake()
        return updated, True

    def _escrow_call(
        self, purpose: TxPurpose, terms: FundingTerms, receipt: Receipt, signature: bytes
    ) -> Any:
        """The escrow call that carries out a receipt: ``release`` (it passed) or ``refund`` (it failed)."""
        if purpose == "release":
            return self.chain.release(
                terms.job_id, terms.entry, receipt.amount, receipt.result_digest, signature
            )
        return self.chain.refund(terms.job_id, terms.entry, receipt.result_digest, signature)

    # -- carrying out verdicts ------------------------------------------------------------------------

    async def settle(self) -> None:
        """Send the ``release`` / ``refund`` of every job with a verdict and no live transaction for it."""
        pairs: tuple[tuple[JobState, TxPurpose], ...] = (("validated", "release"), ("disputed", "refund"))
        for state, purpose in pairs:
            for job in self.journal.list_jobs(state=state, limit=10_000):
                sent = [tx for tx in self.journal.txs(job.id) if tx.purpose == purpose]
                # one live or confirmed transaction is enough; after a revert the node does not keep
                # paying gas for the same call: the job waits for the operator (the note says why)
                if any(tx.state not in ("dropped",) for tx in sent):
                    continue
                payment = self.journal.payment(job.id)
                if payment is None or payment.receipt is None:
                    continue
                await self._settle_one(job, payment, purpose)

    async def _settle_one(self, job: JobRecord, payment: PaymentRecord, purpose: TxPurpose) -> None:
        terms = FundingTerms.from_json(payment.terms)
        stored = payment.receipt or {}
        receipt = Receipt.from_json(stored.get("receipt"))
        signature = bytes.fromhex(str(stored.get("signature"))[2:])
        entry = await self.chain.escrow_job(terms.job_id)
        if entry.status != EscrowStatus.OPEN:
            self._closed_elsewhere(job, entry)
            return
        call = self._escrow_call(purpose, terms, receipt, signature)
        try:
            await self.outbox.send(job.id, purpose, call, "settlement")
        except HearthError as exc:
            if exc.code != "escrow_reverted":
                raise
            log.error(
                "job %s: the escrow refuses the %s: %s", job.id, purpose, exc.details, extra={"job": job.id}
            )
            with contextlib.suppress(HearthError):
                self.journal.append_event(
                    job.id,
                    "note",
                    f"{purpose} refused by the escrow: {exc.details.get('error')}",
                    exc.details,
                    actor=ACTOR,
                )

    async def after_confirmed(self, tx: TxRecord) -> None:
        """A ``release`` / ``refund`` transaction is confirmed: the job is settled / refunded."""
        if tx.job is None:
            return
        if tx.purpose == "release":
            self._finish(tx.job, "settled", f"released in {tx.hash}", expect="validated", tx=tx)
        else:
            self._finish(tx.job, "refunded", f"refunded in {tx.hash}", expect="disputed", tx=tx)

    async def after_reverted(self, tx: TxRecord) -> None:
        """A ``release`` / ``refund`` reverted: if the entry was closed by another sender, follow it."""
        if tx.job is None:
            return
        payment = self.journal.payment(tx.job)
        job = self.journal.get(tx.job)
        if payment is None or job is None:
            return
        entry = await self.chain.escrow_job(FundingTerms.from_json(payment.terms).job_id)
        if entry.status != EscrowStatus.OPEN:
            self._closed_elsewhere(job, entry)

    def _closed_elsewhere(self, job: JobRecord, entry: EscrowJob) -> None:
        """The escrow entry was settled by someone else's transaction (anyone may submit a receipt)."""
        if job.state == "validated" and entry.status == EscrowStatus.RELEASED:
            self._finish(job.id, "settled", "escrow released (by another sender)", expect="validated")
        elif job.state == "disputed" and entry.status == EscrowStatus.REFUNDED:
            self._finish(job.id, "refunded", "escrow refunded (by another sender)", expect="disputed")
        else:
            with contextlib.suppress(HearthError):
                self.journal.append_event(
                    job.id,
                    "note",
                    f"the escrow entry is {entry.status.name.lower()}; nothing left to settle",
                    {"escrow_status": entry.status.name.lower()},
                    actor=ACTOR,
                )

    def _finish(self, job: str, to: Any, reason: str, *, expect: Any, tx: TxRecord | None = None) -> None:
        data = None if tx is None else {"tx": tx.hash, "block": tx.block_number, "gas_used": tx.gas_used}
        try:
            self.journal.transition(job, to, actor=ACTOR, reason=reason, expect=expect, data=data)
        except (ConflictError, NotFoundError):
            return
        log.info("job %s %s: %s", job, to, reason, extra={"job": job})


def check_receipt(job: JobRecord, terms: FundingTerms, receipt: Receipt, signature: bytes) -> None:
    """Refuse a receipt that is not the envelope's validator's verdict on exactly this job's result."""

    def refuse(code: str, message: str, **details: Any) -> SettlementError:
        return SettlementError(code, message, details=details)

    if receipt.job != job.id:
        raise refuse(
            "receipt_job_mismatch", "the receipt names another job", job=job.id, receipt_job=receipt.job
        )
    if receipt.chain_id != terms.chain_id or receipt.escrow != terms.escrow:
        raise refuse(
            "receipt_domain_mismatch",
            "the receipt is for another chain or escrow",
            expected={"chain_id": terms.chain_id, "escrow": terms.escrow},
        )
    if receipt.escrow_job_id != terms.job_id:
        raise refuse(
            "receipt_job_mismatch", "the receipt names another escrow job", expected=hex32(terms.job_id)
        )
    if receipt.provider != terms.provider:
        raise refuse(
            "receipt_provider_mismatch", "the receipt pays another provider", expected=terms.provider
        )
    result = job.result
    if result is None or receipt.result_digest != result_digest(job.id, result):
        raise refuse(
            "receipt_digest_mismatch",
            "the receipt's result_digest is not this job's result",
            expected=hex32(result_digest(job.id, result)) if result else None,
        )
    if receipt.amount > terms.amount:
        raise refuse(
            "receipt_amount_above_quote", "the receipt pays more than the quote", quote=str(terms.amount)
        )
    if not receipt.passed and receipt.amount != 0:
        raise refuse("receipt_amount_on_failure", "a failing receipt carries amount 0")
    signer = receipt_signer(receipt, signature)
    if signer != terms.validator:
        raise refuse(
            "receipt_signer_mismatch",
            "the receipt is not signed by the envelope's validator",
            recovered=signer,
            validator=terms.validator,
        )


async def check_credential(credential: Any, receipt: Receipt, signature: bytes) -> None:
    """A credential sent with a receipt must verify (didkit) and wrap exactly that receipt and signature."""
    from payments.credentials import verify_credential  # didkit loads only when a credential comes

    if not isinstance(credential, dict):
        raise SettlementError("credential_invalid", "credential must be a JSON object (a W3C VC)")
    try:
        wrapped, wrapped_signature = await verify_credential(credential)
    except HearthError as exc:
        raise SettlementError(exc.code, exc.message, details=exc.details) from None
    if wrapped != receipt or wrapped_signature != signature:
        raise SettlementError("credential_mismatch", "the credential wraps another receipt than the one sent")


__all__ = ["Verdicts", "check_credential", "check_receipt"]
