"""Getting paid: escrow terms for quotes, funding checks before work, receipts, crash-safe settlement.

The node's side of docs/protocol.md, driven by the journal (the only memory that survives a crash).
:class:`Settlement` is the one object the node holds; it composes four parts and runs their loop:

- **Terms** (:mod:`payments.terms`). A quote names the escrow entry the requester must fund
  (``FundingTerms``): job id, provider (this node's wallet), validator, amount (the quote) and deadline.
  Admission records them (``payments`` table) when it accepts the job.
- **Funding** (:mod:`payments.funding`). An accepted job runs only once the escrow holds at least the
  quote for exactly those terms, ``confirmations`` blocks deep. The payer funds it with ``fund`` (paying
  gas), or sends an EIP-3009 authorization with the job and the node submits ``fundWithAuthorization``
  (the payer pays nothing), or the agent of a spending grant sends its signed spend and the node submits
  ``fundFromGrant`` (:mod:`payments.grant_terms`; the grant's owner pays). A job that is not funded by
  its ``wait_until`` expires; one whose escrow entry has other terms fails.
- **Receipts** (:mod:`payments.verdicts`). :meth:`Settlement.accept_receipt` verifies a validator's
  EIP-712 receipt, simulates the ``release`` (or, for a failing receipt, the ``refund``) with
  ``eth_call``, then records the verdict: ``completed -> validated | disputed``; the loop sends it.
- **Transactions** (:mod:`payments.outbox`). Every transaction is signed with a nonce the node manages,
  recorded in ``chain_txs`` *before* it is broadcast, and resolved by hash afterwards: mined, confirmed
  after N blocks, reverted, or dropped (its nonce taken by another transaction). At most one live
  transaction per job and purpose exists (the database refuses a second), and before a ``release`` is
  sent the escrow is read: a job already paid is never paid again. While the RPC is down the loop backs
  off and retries.

A crash anywhere leaves a state the next start resumes from: a transaction recorded but perhaps not sent
is looked up by hash and re-broadcast (same bytes, same hash) if the chain never saw it. Crash-safety
tests stop the process at the outbox's fault points through the ``faults`` argument (:mod:`core.faults`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from core.config import ChainSection
from core.errors import ChainError
from core.faults import NO_FAULTS, FaultPoints
from core.journal import JobRecord, Journal, PaymentRecord, TxRecord
from payments.chain import Chain
from payments.funding import FundingWatcher
from payments.grants import GrantFunding
from payments.keys import EthSigner
from payments.outbox import Outbox
from payments.receipts import Authorization, FundingTerms
from payments.terms import AnyEnvelope, PaymentTerms
from payments.verdicts import Verdicts

log = logging.getLogger("hearth.settlement")

BACKOFF_START_SECONDS: Final = 0.5


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
        faults: FaultPoints = NO_FAULTS,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.wallet = wallet
        self.node_did = node_did
        self.chain = Chain(cfg, wallet)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.chain_up = True
        self.last_error: str | None = None
        self.outbox = Outbox(
            cfg,
            journal,
            self.chain,
            wallet.address,
            on_confirmed=self._after_confirmed,
            on_reverted=self._after_reverted,
            faults=faults,
        )
        self.terms = PaymentTerms(
            cfg,
            journal,
            self.chain,
            node_did,
            wallet.address,
            retry_budget=retry_budget,
            wake=self.wake,
            now=now,
        )
        self.funding = FundingWatcher(
            cfg, journal, self.chain, self.outbox, on_funded=on_funded, on_closed=on_closed, now=now
        )
        self.verdicts = Verdicts(journal, self.chain, self.outbox, wake=self.wake)

    @property
    def provider(self) -> str:
        """This node's wallet: the provider every escrow entry it quotes pays."""
        return self.wallet.address

    # -- lifetime -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt accepted jobs that have no payment row yet, then start the loop."""
        for job in self.journal.list_jobs(state="accepted", limit=1_000_000):
            if self.journal.payment(job.id) is None:
                self._adopt(job)
        self._task = asyncio.create_task(self._loop(), name="hearth-settlement")

    async def stop(self) -> None:
        """Stop the loop and close the RPC connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.chain.close()

    def wake(self) -> None:
        """Run the next round now rather than after ``poll_seconds``."""
        self._wake.set()

    def _adopt(self, job: JobRecord) -> None:
        terms = self.terms_of(job)
        if terms is None:
            # accepted before this node had a chain: it can never be funded under terms it never offered
            self.funding.expire_without_terms(job)
            return
        self.open_payment(job, terms, None)

    # -- terms (admission) ----------------------------------------------------------------------------

    def check_payment_terms(self, env: AnyEnvelope) -> str:
        """Refuse an envelope whose payment this node cannot take; return the validator's address."""
        return self.terms.check_payment_terms(env)

    def terms_for(self, job: str, env: AnyEnvelope, price: str, quote_expires_at: int) -> FundingTerms:
        """The escrow terms a quote of ``price`` for ``job`` asks to be funded."""
        return self.terms.terms_for(job, env, price, quote_expires_at)

    @staticmethod
    def terms_of(job: JobRecord) -> FundingTerms | None:
        """The terms in the job's current quote (signed by this node and kept in the journal)."""
        return PaymentTerms.terms_of(job)

    async def check_funding(self, terms: FundingTerms, doc: Any, *, iss: str) -> Authorization | GrantFunding:
        """A job's ``funding`` (EIP-3009 authorization or grant spend), checked before it is accepted."""
        return await self.terms.check_funding(terms, doc, iss=iss)

    def open_payment(
        self, job: JobRecord, terms: FundingTerms, auth: Authorization | GrantFunding | None
    ) -> PaymentRecord:
        """Record ``job``'s terms (and funding) so the loop watches its funding; idempotent."""
        return self.terms.open_payment(job, terms, auth)

    def is_funded(self, job: str) -> bool:
        """Whether ``job``'s escrow funding is confirmed (the scheduler runs nothing else)."""
        return self.funding.is_funded(job)

    # -- receipts -------------------------------------------------------------------------------------

    async def accept_receipt(self, job_key: str, body: Any) -> tuple[JobRecord, bool]:
        """Verify and record a validator receipt; returns the job and whether this call recorded it."""
        return await self.verdicts.accept_receipt(job_key, body)

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
        await self.outbox.reopen_reorged()
        unsent = await self.outbox.resolve(head)
        await self.funding.watch(head, can_send=not unsent)
        if not unsent:
            await self.verdicts.settle()

    async def _after_confirmed(self, tx: TxRecord) -> None:
        if tx.job is None:  # the wallet's own listing (provider.listing reads its outcome in the journal)
            return
        if tx.purpose == "fund":
            await self.funding.after_confirmed(tx)
        else:
            await self.verdicts.after_confirmed(tx)

    async def _after_reverted(self, tx: TxRecord) -> None:
        if tx.job is None:
            log.warning("%s transaction %s reverted", tx.purpose, tx.hash)
            return
        if tx.purpose == "fund":
            await self.funding.after_reverted(tx)
        else:
            await self.verdicts.after_reverted(tx)

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
        auth = payment.authorization
        grant = auth.get("grant") if auth is not None and auth.get("type") == "grant" else None
        return {
            "terms": payment.terms,
            "funding": {
                "state": payment.funding,
                "wait_until": payment.wait_until,
                "gasless": auth is not None,
                "grant": grant,
                "tx": latest("fund"),
            },
            "settlement": {
                "receipt": None if receipt is None else receipt.get("receipt"),
                "tx": latest("release") or latest("refund"),
            },
            "txs": [t.as_dict() for t in txs],
        }


__all__ = ["BACKOFF_START_SECONDS", "Settlement"]
