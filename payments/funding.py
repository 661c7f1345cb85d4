"""The funding watcher: an accepted job runs only once its escrow entry holds the quote's terms.

Each round :meth:`FundingWatcher.watch` reads, ``confirmations`` blocks deep, the escrow entry of every
payment still awaiting funding. An entry with exactly the quote's terms (or more money, a later deadline)
marks the job funded and hands it to the scheduler (``on_funded``); an entry with other terms fails the job
for good (``funding_mismatch``). A job that came with the payer's EIP-3009 authorization is funded by the
node itself: the watcher sends ``fundWithAuthorization`` through the :class:`~payments.outbox.Outbox` (the
payer pays no gas); one that came with a grant's agent's signed spend, ``fundFromGrant``, the same way. A
job that is not funded by its ``wait_until`` expires. Every job that stops being watched without running
frees its capacity hold (``on_closed``). Part of :class:`payments.settlement.Settlement`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from core.config import ChainSection
from core.errors import ConflictError, HearthError
from core.journal import JobRecord, Journal, TxRecord
from core.lifecycle import ENDED_WITHOUT_RESULT, RECEIPT_STATES
from payments.chain import Chain, EscrowJob, EscrowStatus, is_reverted
from payments.grant_terms import grant_fund_call
from payments.grants import GrantFunding, is_grant_funding
from payments.outbox import Outbox
from payments.receipts import Authorization, FundingTerms
from payments.terms import ACTOR, fund_call

log = logging.getLogger("hearth.settlement")


class FundingWatcher:
    """Watches the escrow for the funding of accepted jobs; funds gasless ones; expires unfunded ones."""

    def __init__(
        self,
        cfg: ChainSection,
        journal: Journal,
        chain: Chain,
        outbox: Outbox,
        *,
        on_funded: Callable[[str], None] = lambda job: None,
        on_closed: Callable[[str], object] = lambda job: None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.chain = chain
        self.outbox = outbox
        self._on_funded = on_funded
        self._on_closed = on_closed
        self._now = now

    def is_funded(self, job: str) -> bool:
        """Whether ``job``'s escrow funding is confirmed (the scheduler runs nothing else)."""
        payment = self.journal.payment(job)
        return payment is not None and payment.funding == "funded"

    def expire_without_terms(self, job: JobRecord) -> None:
        """Expire ``job``, accepted before this node had a chain: it was offered no terms to fund."""
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

    async def watch(self, head: int, *, can_send: bool) -> None:
        """One round over every payment awaiting funding; sends a funding only when ``can_send``."""
        deep = max(head - max(self.cfg.confirmations, 1) + 1, 0)
        for payment in self.journal.payments_awaiting():
            job = self.journal.get(payment.job)
            if job is None:
                continue
            if job.state != "accepted":
                # closed before it was funded, or funded and long past running: nothing to watch
                if job.state in ENDED_WITHOUT_RESULT or job.state in RECEIPT_STATES:
                    with contextlib.suppress(ConflictError):
                        self.journal.set_funding(
                            job.id, "refused", reason=f"job {job.state}; funding no longer watched"
                        )
                continue
            terms = FundingTerms.from_json(payment.terms)
            entry = await self.chain.escrow_job(terms.job_id, deep)
            if entry.status != EscrowStatus.NONE:
                self.judge_entry(job, terms, entry)
                continue
            fund_tx = self.outbox.live_or_done(job.id, "fund")
            if payment.authorization is not None and fund_tx is None and can_send:
                await self._send_funding(job, self._fund_call(terms, payment.authorization))
                continue
            if fund_tx is None and self._now() > payment.wait_until:
                self._expire_unfunded(job)

    def judge_entry(self, job: JobRecord, terms: FundingTerms, entry: EscrowJob) -> None:
        """Mark ``job`` funded when the escrow ``entry`` holds exactly ``terms`` (by their hash, as the escrow
        keeps them); fail it when it does not."""
        problems = []
        if entry.status != EscrowStatus.OPEN:
            problems.append(f"the escrow entry is {entry.status.name.lower()}")
        if entry.terms_hash != terms.terms_hash:
            problems.append(
                f"the escrow entry holds other terms (hash 0x{entry.terms_hash.hex()}) than the quote's "
                f"(0x{terms.terms_hash.hex()})"
            )
        if not problems:
            self.journal.set_funding(
                job.id,
                "funded",
                reason="escrow funded",
                data={"amount": str(terms.amount), "deadline": terms.deadline},
            )
            log.info("job %s funded: %s base units in escrow", job.id, terms.amount, extra={"job": job.id})
            self._on_funded(job.id)
            return
        self._fail_funding(job, "funding_mismatch", "; ".join(problems), {"problems": problems})

    async def after_confirmed(self, tx: TxRecord) -> None:
        """A ``fund`` transaction is confirmed: judge the escrow entry it created."""
        if tx.job is None:
            return
        payment = self.journal.payment(tx.job)
        job = self.journal.get(tx.job)
        if payment is None or job is None or payment.funding != "awaiting" or job.state != "accepted":
            return
        terms = FundingTerms.from_json(payment.terms)
        self.judge_entry(job, terms, await self.chain.escrow_job(terms.job_id))

    async def after_reverted(self, tx: TxRecord) -> None:
        """A ``fund`` transaction reverted: judge an entry funded otherwise, or fail the job for good."""
        if tx.job is None:
            return
        payment = self.journal.payment(tx.job)
        job = self.journal.get(tx.job)
        if payment is None or job is None or job.state != "accepted" or payment.funding != "awaiting":
            return
        terms = FundingTerms.from_json(payment.terms)
        entry = await self.chain.escrow_job(terms.job_id)
        if entry.status != EscrowStatus.NONE:
            self.judge_entry(job, terms, entry)
        else:  # the authorization does not work on chain; sending it again would only burn gas
            self._fail_funding(job, "funding_reverted", f"the funding transaction {tx.hash} reverted", {})

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

    def _fund_call(self, terms: FundingTerms, doc: dict[str, Any]) -> Any:
        """The funding transaction's call: ``fundFromGrant`` for a grant spend, else
        ``fundWithAuthorization``."""
        if is_grant_funding(doc):
            return grant_fund_call(self.chain, GrantFunding.from_json(doc))
        return fund_call(self.chain, terms, Authorization.from_json(doc))

    async def _send_funding(self, job: JobRecord, call: Any) -> None:
        try:
            await self.outbox.send(job.id, "fund", call, "funding")
        except HearthError as exc:
            if exc.code != "escrow_reverted":
                raise
            if is_reverted(exc, "JobExists"):
                return  # funded meanwhile by other means: the next round reads the entry
            message = f"the escrow refuses the funding: {exc.details.get('error')}"
            self._fail_funding(job, "funding_rejected", message, {"details": exc.details})

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


__all__ = ["FundingWatcher"]
