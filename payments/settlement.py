"""Getting paid: escrow terms for quotes, funding checks before work, receipts, crash-safe settlement.

The node's side of DESIGN §8, driven by the journal (the only memory that survives a crash):

- **Terms.** A quote names the escrow entry the requester must fund (``FundingTerms``): job id,
  provider (this node's wallet), validator, amount (the quote) and deadline. Admission records them
  (``payments`` table) when it accepts the job.
- **Funding.** An accepted job runs only once the escrow holds at least the quote for exactly those terms,
  ``confirmations`` blocks deep. The payer funds it with ``fund`` (paying gas), or sends an EIP-3009
  authorization with the job and the node submits ``fundWithAuthorization`` (the payer pays nothing). A job
  that is not funded by its ``wait_until`` expires; one whose escrow entry has other terms fails.
- **Receipts.** :meth:`Settlement.accept_receipt` verifies a validator's EIP-712 receipt (signer = the
  envelope's validator, digest = this result, amount <= the quote, provider = this node), simulates the
  ``release`` (or, for a failing receipt, the ``refund``) with ``eth_call``, then records the verdict:
  ``completed -> validated | disputed``.
- **Transactions.** Every transaction is signed with a nonce the node manages, recorded in ``chain_txs``
  *before* it is broadcast, and resolved by hash afterwards: mined, confirmed after N blocks, reverted,
  or dropped (its nonce taken by another transaction). At most one live transaction per job and purpose
  exists (the database refuses a second), and before a ``release`` is sent the escrow is read: a job
  already paid is never paid again. While the RPC is down the loop backs off and retries.

A crash anywhere leaves a state the next start resumes from: a transaction recorded but perhaps not sent
is looked up by hash and re-broadcast (same bytes, same hash) if the chain never saw it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Final, Literal

from eth_utils.address import to_checksum_address

from core.config import ChainSection
from core.envelope import FfmpegTranscodeEnvelope, VllmBatchEnvelope
from core.errors import ChainError, ConflictError, FundingError, HearthError, NotFoundError, SettlementError
from core.journal import TX_OPEN_STATES, JobRecord, JobState, Journal, PaymentRecord, TxPurpose, TxRecord
from payments.chain import Chain, EscrowJob, EscrowStatus, is_reverted
from payments.did import parse_did_pkh
from payments.jwt import decode_unverified
from payments.keys import EthSigner
from payments.receipts import (
    Authorization,
    FundingTerms,
    Receipt,
    authorization_signer,
    escrow_job_id,
    hex32,
    receipt_signer,
    result_digest,
    usdc_units,
)

log = logging.getLogger("hearth.settlement")

ACTOR: Final = "settlement"
# Set to a fault point's name to have the process SIGKILL itself there (crash tests; never in production).
FAULT_ENV: Final = "HEARTH_FAULT"
BACKOFF_START_SECONDS: Final = 0.5
# An authorization must stay valid this long after it reaches the node, or funding may fail in flight.
AUTHORIZATION_MARGIN_SECONDS: Final = 60
_SETTLED_STATES: Final = frozenset({"validated", "settled", "disputed", "refunded"})

AnyEnvelope = FfmpegTranscodeEnvelope | VllmBatchEnvelope


def fault_point(name: str) -> None:
    """Die here, as ``kill -9`` would, when ``HEARTH_FAULT`` names this point (crash-safety tests)."""
    if os.environ.get(FAULT_ENV) == name:
        log.warning("fault point %s: killing the node", name)
        os.kill(os.getpid(), signal.SIGKILL)


class Settlement:
    """Funding checks, receipts and the transactions of one node's wallet; one background loop."""

    def __init__(
        self,
        cfg: ChainSection,
        journal: Journal,
        wallet: EthSigner,
        node_did: str,
        *,
        retry_budget: int,
        on_funded: Callable[[str], None] = lambda job: None,
        on_closed: Callable[[str], object] = lambda job: None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.wallet = wallet
        self.node_did = node_did
        self.chain = Chain(cfg, wallet)
        self._retry_budget = retry_budget
        self._on_funded = on_funded
        self._on_closed = on_closed
        self._now = now
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()
        self.chain_up = True
        self.last_error: str | None = None

    @property
    def provider(self) -> str:
        return self.wallet.address

    # -- lifetime -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt accepted jobs that have no payment row yet, then start the loop."""
        for job in self.journal.list_jobs(state="accepted", limit=1_000_000):
            if self.journal.payment(job.id) is None:
                self._adopt(job)
        self._task = asyncio.create_task(self._loop(), name="hearth-settlement")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.chain.close()

    def wake(self) -> None:
        self._wake.set()

    def _adopt(self, job: JobRecord) -> None:
        terms = self.terms_of(job)
        if terms is None:
            # accepted before this node had a chain: it can never be funded under terms it never offered
            with contextlib.suppress(ConflictError):
                self.journal.transition(
                    job.id,
                    "expired",
                    actor=ACTOR,
                    reason="accepted without escrow terms; it cannot be funded",
                    domain="funding",
                    expect="accepted",
                )
                self._on_closed(job.id)
            return
        self.open_payment(job, terms, None)

    # -- terms (admission) ----------------------------------------------------------------------------

    def check_payment_terms(self, env: AnyEnvelope) -> str:
        """Refuse an envelope whose payment this node cannot take; return the validator's address."""
        pay = env.payment

        def refuse(field: str, expected: Any, got: Any) -> FundingError:
            return FundingError(
                "payment_terms_unsupported",
                f"payment.{field} must be {expected} on this node, not {got}",
                details={"field": f"payment.{field}", "expected": expected, "got": got},
            )

        if pay.chain_id != self.cfg.chain_id:
            raise refuse("chain_id", self.cfg.chain_id, pay.chain_id)
        if pay.escrow.lower() != self.cfg.escrow.lower():
            raise refuse("escrow", to_checksum_address(self.cfg.escrow), pay.escrow)
        try:
            chain_id, validator = parse_did_pkh(pay.validator)
        except HearthError:
            raise refuse(
                "validator", f"a did:pkh:eip155:{self.cfg.chain_id}:0x... DID", pay.validator
            ) from None
        if chain_id != self.cfg.chain_id:
            raise refuse("validator", f"a DID on chain {self.cfg.chain_id}", pay.validator)
        return validator

    def terms_for(self, job: str, env: AnyEnvelope, price: str, quote_expires_at: int) -> FundingTerms:
        """The escrow terms a quote of ``price`` for ``job`` asks to be funded."""
        validator = self.check_payment_terms(env)
        # The deadline covers funding, every attempt the retry budget allows, and validation + release.
        deadline = (
            quote_expires_at
            + self.cfg.funding_timeout_seconds
            + (self._retry_budget + 1) * env.limits.timeout_seconds
            + self.cfg.settlement_window_seconds
        )
        return FundingTerms(
            chain_id=self.cfg.chain_id,
            escrow=to_checksum_address(self.cfg.escrow),
            token=to_checksum_address(self.cfg.token),
            token_name=self.cfg.token_name,
            job_id=escrow_job_id(self.node_did, job),
            payer=to_checksum_address(env.payment.payer),
            provider=self.provider,
            validator=validator,
            amount=usdc_units(price),
            deadline=deadline,
        )

    @staticmethod
    def terms_of(job: JobRecord) -> FundingTerms | None:
        """The terms in the job's current quote (signed by this node and kept in the journal)."""
        if job.quote_jwt is None:
            return None
        _, claims, _, _ = decode_unverified(job.quote_jwt)
        doc = (claims.get("quote") or {}).get("funding_terms")
        return None if doc is None else FundingTerms.from_json(doc)

    async def check_authorization(self, terms: FundingTerms, doc: Any) -> Authorization:
        """A payer's EIP-3009 authorization, checked locally and, if the chain answers, in simulation."""
        auth = Authorization.from_json(doc)
        now = int(self._now())
        if auth.payer != terms.payer:
            raise FundingError(
                "authorization_payer_mismatch",
                f"the authorization is from {auth.payer}, the envelope's payer is {terms.payer}",
                details={"from": auth.payer, "payer": terms.payer},
            )
        if auth.valid_before < now + AUTHORIZATION_MARGIN_SECONDS or auth.valid_after > now:
            raise FundingError(
                "authorization_not_valid_now",
                f"the authorization must be valid now and for {AUTHORIZATION_MARGIN_SECONDS}s more",
                details={"valid_after": auth.valid_after, "valid_before": auth.valid_before, "now": now},
            )
        signer = authorization_signer(terms, auth)
        if signer != terms.payer:
            raise FundingError(
                "authorization_signature_invalid",
                "the authorization is not signed by the payer for these terms (amount, escrow job, nonce)",
                details={"recovered": signer, "payer": terms.payer, "terms": terms.to_json()},
            )
        try:
            await self.chain.simulate(self._fund_call(terms, auth), domain="funding")
        except ChainError as exc:
            if exc.code != "chain_unavailable":
                raise
            log.warning("could not simulate a funding authorization (chain down); it is checked before use")
        except HearthError as exc:
            if not is_reverted(exc, "JobExists"):  # already funded (by this authorization or otherwise)
                raise FundingError(
                    "authorization_rejected",
                    f"the escrow would refuse this funding: {exc.message}",
                    details=exc.details,
                ) from None
        return auth

    def open_payment(self, job: JobRecord, terms: FundingTerms, auth: Authorization | None) -> PaymentRecord:
        """Record ``job``'s terms (and authorization) so the loop watches its funding; idempotent."""
        record = self.journal.open_payment(
            job.id,
            escrow_job_id=hex32(terms.job_id),
            terms=terms.to_json(),
            wait_until=self._now() + self.cfg.funding_timeout_seconds,
            authorization=None if auth is None else auth.to_json(),
        )
        self.wake()
        return record

    def is_funded(self, job: str) -> bool:
        """Whether ``job``'s escrow funding is confirmed (the scheduler runs nothing else)."""
        payment = self.journal.payment(job)
        return payment is not None and payment.funding == "funded"

    # -- receipts -------------------------------------------------------------------------------------

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
        if job.state in _SETTLED_STATES:
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
        self._check_receipt(job, terms, receipt, signature)
        if body.get("credential") is not None:
            await _check_credential(body["credential"], receipt, signature)
        call = (
            self.chain.release(terms.job_id, receipt.amount, receipt.result_digest, signature)
            if receipt.passed
            else self.chain.refund(terms.job_id, receipt.result_digest, signature)
        )
        try:
            await self.chain.simulate(call, domain="settlement")
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
        self.wake()
        return updated, True

    def _check_receipt(self, job: JobRecord, terms: FundingTerms, receipt: Receipt, signature: bytes) -> None:
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

    # -- the loop -------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        backoff = BACKOFF_START_SECONDS
        while True:
            try:
                await self.tick()
            except ChainError as exc:
                if self.chain_up:
                    log.warning("chain unavailable, retrying with backoff: %s", exc.message)
                self.chain_up, self.last_error = False, exc.message
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.cfg.rpc_backoff_max_seconds)
                continue
            except Exception:  # keep settling; the journal is the truth and the next round retries
                log.exception("settlement round failed")
            else:
                if not self.chain_up:
                    log.info("chain reachable again")
                self.chain_up, self.last_error, backoff = True, None, BACKOFF_START_SECONDS
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see node.webhooks (3.11 wait_for)
                async with asyncio.timeout(self.cfg.poll_seconds):
                    await self._wake.wait()
            self._wake.clear()

    async def tick(self) -> None:
        """One round: resolve transactions in flight, watch funding, send what settlement needs."""
        head = await self.chain.head()
        await self._reopen_reorged()
        unsent = await self._resolve_txs(head)
        await self._watch_funding(head, can_send=not unsent)
        if not unsent:
            await self._settle()

    # -- transactions ---------------------------------------------------------------------------------

    async def _reopen_reorged(self) -> None:
        """Put back in flight a transaction counted final that a reorg deeper than ``confirmations`` removed.

        A mined transaction uses up its nonce, so a final one whose nonce the wallet's on-chain count has
        fallen back to (or below) is no longer in the chain. Left as it was, the journal would say paid or
        funded while the escrow says otherwise, and every later transaction would queue behind the nonce
        gap forever. Re-opened, it is resolved like any other: the same bytes are sent again and land once.
        """
        latest = await self.chain.nonce("latest")
        for tx in self.journal.txs_from_nonce(self.provider, latest):
            if tx.state in ("confirmed", "reverted") and await self.chain.mined(tx.hash) is None:
                log.warning(
                    "tx %s was final but a reorg removed it; sending it again", tx.hash, extra={"job": tx.job}
                )
                self.journal.update_tx(
                    tx.hash,
                    state="sent",
                    block_number=None,
                    block_hash=None,
                    note=f"{tx.purpose} transaction reorged out after it was final",
                )

    async def _resolve_txs(self, head: int) -> bool:
        """Resolve every open transaction by hash; True if one is still not known to the chain."""
        unsent = False
        for tx in self.journal.txs(states=TX_OPEN_STATES):
            mined = await self.chain.mined(tx.hash)
            if mined is None:
                if tx.state == "mined":
                    tx = self.journal.update_tx(
                        tx.hash, state="sent", block_number=None, block_hash=None, note="reorged out"
                    )
                if tx.nonce < await self.chain.nonce("latest") and await self.chain.mined(tx.hash) is None:
                    # its nonce was used by another transaction: this one can never land (asked twice: it
                    # may have been mined between the first look-up and the nonce read)
                    self.journal.update_tx(tx.hash, state="dropped", note=f"{tx.purpose} transaction dropped")
                    continue
                refusal = await self.chain.broadcast(tx.raw)
                if refusal is not None:
                    log.warning("tx %s not taken by the RPC: %s", tx.hash, refusal, extra={"job": tx.job})
                    self.journal.update_tx(tx.hash, error=refusal[:500])
                    unsent = True
                elif tx.state == "signed":
                    self.journal.update_tx(tx.hash, state="sent", note=f"{tx.purpose} transaction sent")
                continue
            if tx.state != "mined":
                tx = self.journal.update_tx(
                    tx.hash,
                    state="mined",
                    block_number=mined.block_number,
                    block_hash=mined.block_hash,
                    gas_used=mined.gas_used,
                    gas_price=mined.gas_price,
                    note=f"{tx.purpose} transaction mined in block {mined.block_number}",
                )
            elif tx.block_hash != mined.block_hash:
                tx = self.journal.update_tx(
                    tx.hash, block_number=mined.block_number, block_hash=mined.block_hash
                )
            if head - mined.block_number + 1 < max(self.cfg.confirmations, 1):
                continue
            if not mined.success:
                self.journal.update_tx(tx.hash, state="reverted", note=f"{tx.purpose} transaction reverted")
                await self._after_revert(tx)
            else:
                self.journal.update_tx(tx.hash, state="confirmed", note=f"{tx.purpose} transaction confirmed")
                await self._after_confirm(tx)
        return unsent

    async def _send(self, job: str, purpose: TxPurpose, call: Any, domain: Any) -> TxRecord:
        """Sign ``call`` with the next nonce, record it, then broadcast it."""
        async with self._send_lock:
            nonce = max(await self.chain.nonce("pending"), self.journal.next_nonce(self.provider))
            tx_hash, raw = await self.chain.sign(call, nonce, domain=domain)
            tx = self.journal.record_tx(
                job, purpose, sender=self.provider, nonce=nonce, hash=tx_hash, raw=raw
            )
            fault_point("after_record")
            refusal = await self.chain.broadcast(raw)
            fault_point("after_broadcast")
            if refusal is None:
                tx = self.journal.update_tx(tx_hash, state="sent", note=f"{purpose} transaction sent")
            else:
                tx = self.journal.update_tx(tx_hash, error=refusal[:500])
            return tx

    def _live_or_done(self, job: str, purpose: TxPurpose) -> TxRecord | None:
        for tx in self.journal.txs(job):
            if tx.purpose == purpose and tx.state not in ("dropped", "reverted"):
                return tx
        return None

    # -- funding --------------------------------------------------------------------------------------

    async def _watch_funding(self, head: int, *, can_send: bool) -> None:
        deep = max(head - max(self.cfg.confirmations, 1) + 1, 0)
        for payment in self.journal.payments_awaiting():
            job = self.journal.get(payment.job)
            if job is None:
                continue
            if job.state != "accepted":
                if job.state in ("cancelled", "expired", "failed") or job.state in _SETTLED_STATES:
                    with contextlib.suppress(ConflictError):
                        self.journal.set_funding(
                            job.id, "refused", reason=f"job {job.state}; funding no longer watched"
                        )
                continue
            terms = FundingTerms.from_json(payment.terms)
            entry = await self.chain.escrow_job(terms.job_id, deep)
            if entry.status != EscrowStatus.NONE:
                self._judge_entry(job, terms, entry)
                continue
            fund_tx = self._live_or_done(job.id, "fund")
            if payment.authorization is not None and fund_tx is None and can_send:
                await self._send_funding(job, terms, Authorization.from_json(payment.authorization))
                continue
            if fund_tx is None and self._now() > payment.wait_until:
                self._expire_unfunded(job)

    def _judge_entry(self, job: JobRecord, terms: FundingTerms, entry: EscrowJob) -> None:
        problems = []
        if entry.status != EscrowStatus.OPEN:
            problems.append(f"the escrow entry is {entry.status.name.lower()}")
        for name, want, got in (
            ("payer", terms.payer, entry.payer),
            ("provider", terms.provider, entry.provider),
            ("validator", terms.validator, entry.validator),
        ):
            if want != got:
                problems.append(f"{name} is {got}, the quote's is {want}")
        if entry.amount < terms.amount:
            problems.append(f"amount {entry.amount} is below the quote's {terms.amount}")
        if entry.deadline < terms.deadline:
            problems.append(f"deadline {entry.deadline} is before the quote's {terms.deadline}")
        if not problems:
            self.journal.set_funding(
                job.id,
                "funded",
                reason="escrow funded",
                data={"amount": str(entry.amount), "deadline": entry.deadline},
            )
            log.info("job %s funded: %s base units in escrow", job.id, entry.amount, extra={"job": job.id})
            self._on_funded(job.id)
            return
        self._fail_funding(job, "funding_mismatch", "; ".join(problems), {"problems": problems})

    def _fail_funding(self, job: JobRecord, code: str, message: str, data: dict[str, Any]) -> None:
        """Stop watching ``job``'s funding and fail it for good (``funding`` domain); its hold is freed."""
        with contextlib.suppress(ConflictError):
            self.journal.set_funding(job.id, "refused", reason=f"{code}: {message}"[:500])
            self.journal.transition(
                job.id,
                "failed",
                actor=ACTOR,
                reason=f"{code}: {message}"[:500],
                domain="funding",
                retryable=False,
                expect="accepted",
                data={"code": code, **data},
                fields={"failure_code": code, "failure_message": message[:500]},
            )
            self._on_closed(job.id)

    async def _send_funding(self, job: JobRecord, terms: FundingTerms, auth: Authorization) -> None:
        try:
            await self._send(job.id, "fund", self._fund_call(terms, auth), "funding")
        except HearthError as exc:
            if exc.code != "escrow_reverted":
                raise
            if is_reverted(exc, "JobExists"):
                return  # funded meanwhile by other means: the next round reads the entry
            message = f"the escrow refuses the authorization: {exc.details.get('error')}"
            self._fail_funding(job, "funding_rejected", message, {"details": exc.details})

    def _fund_call(self, terms: FundingTerms, auth: Authorization) -> Any:
        v, r, s = auth.vrs
        return self.chain.fund_with_authorization(
            (
                terms.job_id,
                terms.provider,
                terms.validator,
                terms.amount,
                terms.deadline,
                terms.payer,
                auth.valid_after,
                auth.valid_before,
                v,
                r,
                s,
            )
        )

    def _expire_unfunded(self, job: JobRecord) -> None:
        with contextlib.suppress(ConflictError):
            self.journal.transition(
                job.id,
                "expired",
                actor=ACTOR,
                reason="funding_timeout: the escrow was not funded in time; the job never ran",
                domain="funding",
                expect="accepted",
            )
            self.journal.set_funding(job.id, "refused", reason="not funded in time")
            self._on_closed(job.id)
            log.info("job %s expired unfunded", job.id, extra={"job": job.id})

    # -- settlement -----------------------------------------------------------------------------------

    async def _settle(self) -> None:
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
        call = (
            self.chain.release(terms.job_id, receipt.amount, receipt.result_digest, signature)
            if purpose == "release"
            else self.chain.refund(terms.job_id, receipt.result_digest, signature)
        )
        try:
            await self._send(job.id, purpose, call, "settlement")
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

    async def _after_confirm(self, tx: TxRecord) -> None:
        if tx.purpose == "fund":
            payment = self.journal.payment(tx.job)
            job = self.journal.get(tx.job)
            if (
                payment is not None
                and job is not None
                and payment.funding == "awaiting"
                and job.state == "accepted"
            ):
                terms = FundingTerms.from_json(payment.terms)
                self._judge_entry(job, terms, await self.chain.escrow_job(terms.job_id))
        elif tx.purpose == "release":
            self._finish(tx.job, "settled", f"released in {tx.hash}", expect="validated", tx=tx)
        else:
            self._finish(tx.job, "refunded", f"refunded in {tx.hash}", expect="disputed", tx=tx)

    async def _after_revert(self, tx: TxRecord) -> None:
        payment = self.journal.payment(tx.job)
        job = self.journal.get(tx.job)
        if payment is None or job is None:
            return
        entry = await self.chain.escrow_job(FundingTerms.from_json(payment.terms).job_id)
        if tx.purpose == "fund":
            if job.state != "accepted" or payment.funding != "awaiting":
                return
            if entry.status != EscrowStatus.NONE:
                self._judge_entry(job, FundingTerms.from_json(payment.terms), entry)
            else:  # the authorization does not work on chain; sending it again would only burn gas
                self._fail_funding(job, "funding_reverted", f"the funding transaction {tx.hash} reverted", {})
        elif entry.status != EscrowStatus.OPEN:
            self._closed_elsewhere(job, entry)

    def _finish(self, job: str, to: Any, reason: str, *, expect: Any, tx: TxRecord | None = None) -> None:
        data = None if tx is None else {"tx": tx.hash, "block": tx.block_number, "gas_used": tx.gas_used}
        try:
            self.journal.transition(job, to, actor=ACTOR, reason=reason, expect=expect, data=data)
        except (ConflictError, NotFoundError):
            return
        log.info("job %s %s: %s", job, to, reason, extra={"job": job})

    # -- views ----------------------------------------------------------------------------------------

    def view(self, job: str) -> dict[str, Any] | None:
        """The ``payment`` part of a job's status: terms, funding, receipt and every transaction."""
        payment = self.journal.payment(job)
        if payment is None:
            return None
        txs = self.journal.txs(job)

        def latest(purpose: str) -> dict[str, Any] | None:
            mine = [t for t in txs if t.purpose == purpose]
            return mine[-1].as_dict() if mine else None

        receipt = payment.receipt
        return {
            "terms": payment.terms,
            "funding": {
                "state": payment.funding,
                "wait_until": payment.wait_until,
                "gasless": payment.authorization is not None,
                "tx": latest("fund"),
            },
            "settlement": {
                "receipt": None if receipt is None else receipt.get("receipt"),
                "tx": latest("release") or latest("refund"),
            },
            "txs": [t.as_dict() for t in txs],
        }


async def _check_credential(credential: Any, receipt: Receipt, signature: bytes) -> None:
    """A credential sent with a receipt must verify (didkit) and wrap exactly that receipt and signature."""
    from validator.validator import verify_credential  # didkit loads only when a credential comes

    if not isinstance(credential, dict):
        raise SettlementError("credential_invalid", "credential must be a JSON object (a W3C VC)")
    try:
        wrapped, wrapped_signature = await verify_credential(credential)
    except HearthError as exc:
        raise SettlementError(exc.code, exc.message, details=exc.details) from None
    if wrapped != receipt or wrapped_signature != signature:
        raise SettlementError("credential_mismatch", "the credential wraps another receipt than the one sent")
