"""Admission: the path from a signed request to a signed quote or an accepted job.

Order matters and is fixed here: verify the DID-JWT and parse the envelope (:mod:`node.intake`) ->
idempotency (same submission, same job; a different body under a used job_id is a conflict)
-> policy screening (before any capacity is held) -> work estimate -> price against ``max_price`` ->
hold capacity until the quote expires (within the unfunded shares, see provider.ledger) -> journal ->
sign -> record the request's jti. A refusal at any step leaves nothing held and nothing recorded: the jti
is written only once the request succeeded.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import CapacitySection, NodeConfig
from core.envelope import VllmBatchEnvelope
from core.errors import (
    AuthError,
    ConflictError,
    FundingError,
    HearthError,
    JournalError,
    PricingError,
    RequestError,
)
from core.journal import JobRecord, Journal
from core.lifecycle import CANCELLABLE_STATES, CLOSED_STATES, PAST_ACCEPTANCE_STATES, RESULT_STATES
from core.logs import enter_job
from node.intake import AnyEnvelope, Incoming, Intake
from node.metrics import Metrics
from node.warm import WARM_JOB_NEED
from node.webhooks import check_callback, check_validator_url
from payments.jwt import VerifiedRequest, decode_unverified, sign_jwt, verify_node_token
from payments.keys import Signer
from provider.capacity import CapacityLedger, HoldPolicy, Resources
from provider.catalog import ModelCatalog
from provider.estimate import InputProbe, WorkEstimate, estimator_for
from provider.policy import screen
from provider.pricing import Bid, Pricer, check_max_price

if TYPE_CHECKING:  # web3 and eth-account take a second to import; a node without a chain never needs them
    from payments.grants import GrantFunding
    from payments.receipts import Authorization, FundingTerms
    from payments.settlement import Settlement

Prober = Callable[[AnyEnvelope], Awaitable[InputProbe | None]]
"""Finds what pricing needs of a job's input (ffprobe's duration and size), or None to price on limits."""


@dataclass(frozen=True, slots=True)
class Quote:
    """A signed quote and the job it prices."""

    job: JobRecord
    jwt: str
    claims: dict[str, Any]
    reused: bool


@dataclass(frozen=True, slots=True)
class Submission:
    """The outcome of POST /v1/jobs: the job, and whether this call accepted it (False: it already was)."""

    job: JobRecord
    accepted_now: bool


def _quote_expired() -> PricingError:
    return PricingError("quote_expired", "the quote has expired; ask for a new one", retryable=True)


class _JobLock:
    """:meth:`Admission._job_lock`: a class, not a generator, since every request takes one."""

    __slots__ = ("_job", "_lock", "_locks")

    def __init__(self, locks: dict[str, asyncio.Lock], job: str) -> None:
        self._locks = locks
        self._job = job
        self._lock = locks.setdefault(job, asyncio.Lock())

    async def __aenter__(self) -> None:
        try:
            await self._lock.acquire()
        except BaseException:
            self._forget()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()
        self._forget()

    def _forget(self) -> None:
        lock = self._lock
        if not lock.locked() and not getattr(lock, "_waiters", None):
            self._locks.pop(self._job, None)


def resources_of(env: AnyEnvelope, warm: Callable[[str], bool] | None = None) -> Resources:
    """What a job holds while it waits and runs: its envelope's limits, or, for a batch on a warm model's
    engine (``warm(model)``; the engine holds its own), only the node's share of the work
    (:data:`node.warm.WARM_JOB_NEED`)."""
    if isinstance(env, VllmBatchEnvelope) and warm is not None and warm(env.output_spec.model):
        return WARM_JOB_NEED
    return Resources(cpus=env.limits.cpus, memory_mb=env.limits.memory_mb, gpus=env.limits.gpus)


def hold_policy(cfg: CapacitySection) -> HoldPolicy:
    """The ledger's bounds on unfunded holds, from ``[capacity]``."""
    return HoldPolicy(
        unfunded_share=cfg.quote_hold_share,
        per_requester_share=cfg.per_requester_hold_share,
        busy_retry_seconds=cfg.busy_retry_after_seconds,
    )


class Admission:
    """Turns signed requests into quotes and accepted jobs; owns the capacity ledger's job holds."""

    def __init__(
        self,
        cfg: NodeConfig,
        signer: Signer,
        journal: Journal,
        ledger: CapacityLedger,
        metrics: Metrics,
        *,
        home: Path,
        gpu_model: str | None = None,
        now: Callable[[], float] = time.time,
        prober: Prober | None = None,
        settlement: Settlement | None = None,
        models: ModelCatalog | None = None,
        warm: Callable[[str], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        self.models = models if models is not None else ModelCatalog([])
        self._warm = warm  # whether a model's batches run on its warm engine (node.warm)
        self.settlement = settlement
        self.signer = signer
        self.journal = journal
        self.ledger = ledger
        self.metrics = metrics
        self._home = home
        self._gpu_model = gpu_model
        self.pricer = Pricer(cfg.pricing, gpu_model=gpu_model, models=cfg.models, home=home)
        self.intake = Intake(signer.did, journal, cfg.api, metrics, now=now)
        self._now = now
        self._prober = prober
        self._locks: dict[str, asyncio.Lock] = {}

    def reconfigure(self, cfg: NodeConfig) -> None:
        """Take new prices, policy and hold shares (SIGHUP); jobs and holds stay as they are."""
        self.cfg = cfg
        self.pricer = Pricer(cfg.pricing, gpu_model=self._gpu_model, models=cfg.models, home=self._home)
        self.ledger.policy = hold_policy(cfg.capacity)

    # -- requests ---------------------------------------------------------------------------------------

    def _job_lock(self, job: str) -> _JobLock:
        """One request at a time per job (``async with``); a lock nobody holds or awaits is dropped."""
        return _JobLock(self._locks, job)

    def _existing(self, inc: Incoming) -> JobRecord | None:
        env = inc.env
        job = self.journal.get(inc.job_key)
        if job is not None and job.idem_key != inc.key:
            raise ConflictError(
                "job_id_conflict",
                f"job_id {env.job_id!r} is already used by this requester with a different body",
                details={"job": job.id, "job_id": env.job_id, "state": job.state},
            )
        return job

    # -- quotes -----------------------------------------------------------------------------------------

    async def quote(self, token: str) -> Quote:
        """POST /v1/quotes: a signed quote, or a structured refusal carrying the node's ask."""
        async with self.journal.batched():
            with self.intake.job(token) as inc:
                return await self._quote(inc)

    async def _quote(self, inc: Incoming) -> Quote:
        enter_job(inc.job_key)
        async with self._job_lock(inc.job_key):
            existing = self._existing(inc)
            if existing is not None:
                if self._quote_live(existing):
                    self._check_price_within(existing, inc.env)
                    return self._reuse_quote(existing)
                if existing.state in PAST_ACCEPTANCE_STATES or existing.state in CLOSED_STATES:
                    raise ConflictError(
                        "job_not_quotable",
                        f"job {existing.id} is {existing.state}; it takes no new quote",
                        details={"job": existing.id, "state": existing.state},
                    )
            return await self._price_and_hold(inc, existing)

    def _check_price_within(self, job: JobRecord, env: AnyEnvelope) -> None:
        price = Decimal(job.price or "0")
        if price > env.payment.max_price_decimal:
            self.metrics.quote("refused", "price_above_max")
            raise PricingError(
                "price_above_max",
                f"the node's ask {price} exceeds max_price {env.payment.max_price}",
                details={"ask": str(price), "max_price": env.payment.max_price, "currency": "usdc"},
            )

    def _reuse_quote(self, job: JobRecord) -> Quote:
        assert job.quote_jwt is not None
        _, claims, _, _ = decode_unverified(job.quote_jwt)  # the journal's own copy: signed by us
        self.metrics.quote("reused", "ok")
        return Quote(job=job, jwt=job.quote_jwt, claims=claims, reused=True)

    async def _price_and_hold(
        self, inc: Incoming, existing: JobRecord | None, *, accepting: bool = False
    ) -> Quote:
        """A new quote for ``inc`` (see :meth:`_bid`); a refusal to bid is counted with its error code."""
        try:
            return await self._bid(inc, existing, accepting=accepting)
        except HearthError as exc:
            self.metrics.quote("refused", exc.code)
            raise

    async def _bid(self, inc: Incoming, existing: JobRecord | None, *, accepting: bool = False) -> Quote:
        """Screen, estimate, price and hold, then journal and sign the quote.

        ``accepting`` (a bare request, bid and accept in one step): a quote whose capacity is not free now
        is refused here, before anything is written, rather than issued and then refused at acceptance.
        """
        request, env, job_key = inc.request, inc.env, inc.job_key
        now = self._now()
        policy = self.cfg.policy
        active = self.journal.active_count(request.iss, now, limit=policy.per_did_concurrency)
        screen(env, request.iss, policy, active_for_did=active)
        if self.settlement is not None:
            self.settlement.check_payment_terms(env)
        if isinstance(env, VllmBatchEnvelope):
            self.models.check(env)  # an unknown model, or limits it cannot run in, before any fetch
        if env.callback_url is not None:
            check_callback(env.callback_url, self.cfg.webhooks)
        if env.validation.validator_url is not None:
            check_validator_url(env.validation.validator_url, self.cfg.webhooks)
        need = resources_of(env, self._warm)
        probe = await self._prober(env) if self._prober is not None else None
        estimator = estimator_for(env.kind, self.models)
        if probe is not None and probe.data is not None:
            # every line of a batch goes through the model's tokenizer: off the event loop
            estimate = await asyncio.to_thread(estimator.estimate, env, probe)
        else:
            estimate = estimator.estimate(env, probe)
        bid = await self.pricer.ask(env, estimate, self.ledger.utilisation(extra=need))
        check_max_price(bid, env.payment.max_price_decimal)
        expires_at = int(now) + self.cfg.api.quote_ttl_seconds
        held_at = self._now()  # the probe may have taken a while
        self.ledger.expire(held_at)  # holds lapsed since the last housekeeping round stand in no one's way
        # An unfunded hold, within the [capacity] shares; beyond them (or when what is free now is too
        # little) the quote is still issued but holds nothing, and its acceptance needs free capacity.
        held = self.ledger.hold_unfunded(
            job_key, request.iss, need, expires_at, now=held_at, must_fit=accepting
        )
        try:
            quote_id = "q_" + secrets.token_hex(12)
            claims = self._quote_claims(inc, quote_id, bid, estimate, now, expires_at, held=held)
            quote_jwt = sign_jwt(self.signer, claims)
            if existing is None:
                job = self.journal.create_priced(
                    id=job_key,
                    iss=request.iss,
                    job_id=env.job_id,
                    kind=env.kind,
                    idem_key=inc.key,
                    envelope_hash=inc.hash,
                    envelope=inc.doc,
                    price=str(bid.ask),
                    quote_id=quote_id,
                    quote_jwt=quote_jwt,
                    quote_expires_at=float(expires_at),
                    cpus=need.cpus,
                    memory_mb=need.memory_mb,
                    gpus=need.gpus,
                    actor=request.iss,
                    reason=f"quoted {bid.ask} {bid.currency}",
                    callback_url=env.callback_url,
                    validator_url=env.validation.validator_url,
                )
            else:
                job, _ = self.journal.transition(
                    existing.id,
                    "priced",
                    actor=request.iss,
                    reason=f"re-quoted {bid.ask} {bid.currency}",
                    expect="expired",
                    fields={
                        "price": str(bid.ask),
                        "quote_id": quote_id,
                        "quote_jwt": quote_jwt,
                        "quote_expires_at": float(expires_at),
                    },
                )
        except BaseException:
            self.ledger.release(job_key)
            raise
        await self._committed(undo=lambda: self.ledger.release(job_key))
        self.metrics.quote("won", "ok")
        return Quote(job=job, jwt=quote_jwt, claims=claims, reused=False)

    def _quote_claims(
        self,
        inc: Incoming,
        quote_id: str,
        bid: Bid,
        estimate: WorkEstimate,
        now: float,
        expires_at: int,
        *,
        held: bool,
    ) -> dict[str, Any]:
        """The quote's claims. ``reserved`` is what the job will run with; ``held`` says whether that is
        held for the requester until ``expires_at`` (False: an over-quote, accepted only if free then)."""
        env = inc.env
        claims: dict[str, Any] = {
            "iss": self.signer.did,
            "aud": inc.request.iss,
            "iat": int(now),
            "exp": expires_at,
            "jti": quote_id,
            "quote": {
                "quote_id": quote_id,
                "job": inc.job_key,
                "job_id": env.job_id,
                "kind": env.kind,
                "envelope_hash": inc.hash,
                "idempotency_key": inc.key,
                "price": str(bid.ask),
                "currency": bid.currency,
                "chain_id": env.payment.chain_id,
                "expires_at": expires_at,
                "surge_factor": str(bid.surge_factor),
                "breakdown": bid.breakdown,
                "estimate": {
                    "cpu_seconds": round(estimate.cpu_seconds, 3),
                    "gpu_seconds": round(estimate.gpu_seconds, 3),
                    "output_mb": round(estimate.output_mb, 3),
                    "input_tokens": estimate.input_tokens,
                    "output_tokens": estimate.output_tokens,
                    "basis": estimate.basis,
                },
                "reserved": resources_of(env, self._warm).to_dict(),
                "held": held,
            },
        }
        if self.settlement is not None:
            terms = self.settlement.terms_for(inc.job_key, env, str(bid.ask), expires_at)
            claims["quote"]["funding_terms"] = terms.to_json()
        return claims

    # -- acceptance -------------------------------------------------------------------------------------

    async def submit(self, token: str, quote_jwt: str | None, funding: Any = None) -> Submission:
        """POST /v1/jobs: accept against a quote, or bid and accept in one step for a bare request.

        ``funding``: the payer's EIP-3009 authorization for the quote's escrow terms (gasless funding), or
        a grant's agent's signed spend (the request's ``iss`` must be that agent), checked before the job
        is accepted; without it the payer funds the escrow itself.
        """
        async with self.journal.batched():
            with self.intake.job(token) as inc:
                return await self._submit(inc, quote_jwt, funding)

    async def _submit(self, inc: Incoming, quote_jwt: str | None, funding: Any) -> Submission:
        enter_job(inc.job_key)
        request, env = inc.request, inc.env
        if funding is not None and self.settlement is None:
            raise FundingError(
                "payments_not_configured", "this node has no chain configured; send the job without 'funding'"
            )
        async with self._job_lock(inc.job_key):
            existing = self._existing(inc)
            if existing is not None and existing.state in PAST_ACCEPTANCE_STATES:
                if funding is not None and existing.state == "accepted":
                    await self._open_payment(existing, funding)  # a retry that brings the authorization
                return Submission(job=existing, accepted_now=False)
            if existing is not None and existing.state in CLOSED_STATES:
                raise ConflictError(
                    "job_closed",
                    f"job {existing.id} is {existing.state}",
                    details={"job": existing.id, "state": existing.state},
                )
            if quote_jwt is not None:
                job = self._job_for_quote(quote_jwt, inc, existing)
            elif existing is not None and self._quote_live(existing):
                job = existing
            else:
                job = (await self._price_and_hold(inc, existing, accepting=True)).job
            self._check_price_within(job, env)
            payment = await self._payment_terms(job, funding)
            before = self.ledger.get(job.id)
            self._hold_for_acceptance(job.id, request.iss, resources_of(env, self._warm))
            try:
                accepted, _ = self.journal.transition(
                    job.id,
                    "accepted",
                    actor=request.iss,
                    reason=f"accepted at {job.price} usdc",
                    expect="priced",
                )
            except BaseException:
                self.ledger.restore(job.id, before)
                raise
            if self.settlement is not None and payment is not None:
                self.settlement.open_payment(accepted, *payment)
            await self._committed(undo=lambda: self.ledger.restore(job.id, before))
            self.metrics.accepted()
            return Submission(job=accepted, accepted_now=True)

    def _hold_for_acceptance(self, job: str, iss: str, need: Resources) -> None:
        """Hold capacity for a job being accepted, or refuse (503 with ``retry_after_seconds``).

        Without payments the job is work from now on: a committed hold (its quote's hold turns into it).
        With payments it is still unfunded, and anyone can accept for free: its quote's hold is kept until
        the funding deadline (:meth:`funded` commits it), and without one it is held within the unfunded
        shares, or beyond them holds nothing until funded. Either way, a job whose quote held nothing (an
        over-quote, or a lapsed hold) is accepted only if the capacity is free now.
        """
        now = self._now()
        self.ledger.expire(now)
        chain = self.cfg.chain
        if self.settlement is None or chain is None:
            self.ledger.commit(job, need, now=now)
        else:
            deadline = now + chain.funding_timeout_seconds
            self.ledger.hold_unfunded(job, iss, need, deadline, now=now, must_fit=True)

    def funded(self, job: str) -> None:
        """``job``'s escrow funding is confirmed: its hold becomes committed, taken whatever else is held
        (paid work goes before quotes; the scheduler queues what does not fit yet)."""
        record = self.journal.get(job)
        if record is not None and record.state == "accepted":
            need = Resources(cpus=record.cpus, memory_mb=record.memory_mb, gpus=record.gpus)
            self.ledger.commit(job, need, now=self._now(), must_fit=False)

    async def _payment_terms(
        self, job: JobRecord, funding: Any
    ) -> tuple[FundingTerms, Authorization | GrantFunding | None] | None:
        """The job's escrow terms and checked authorization (None when the node takes no payments)."""
        if self.settlement is None:
            return None
        terms = self.settlement.terms_of(job)
        if terms is None:
            raise FundingError(
                "quote_without_terms", "the job's quote names no escrow terms; ask for a new quote"
            )
        if funding is None:
            return terms, None
        return terms, await self.settlement.check_funding(terms, funding, iss=job.iss)

    async def _open_payment(self, job: JobRecord, funding: Any) -> None:
        payment = await self._payment_terms(job, funding)
        if self.settlement is not None and payment is not None:
            self.settlement.open_payment(job, *payment)

    async def _committed(self, undo: Callable[[], object]) -> None:
        """Wait until this request's journal writes are committed; should the commit fail, ``undo`` what
        the request changed in memory for them (a capacity hold). A cancelled wait undoes nothing: the
        writes are still committed."""
        try:
            await self.journal.committed()
        except JournalError:
            undo()
            raise

    def _quote_live(self, job: JobRecord) -> bool:
        """The job is priced and its quote has not expired."""
        return job.state == "priced" and (job.quote_expires_at or 0) > self._now()

    def _job_for_quote(self, quote_jwt: str, inc: Incoming, existing: JobRecord | None) -> JobRecord:
        """The job a quote JWT accepts. The node's own current quote is recognised by equality with the
        journal's copy (no signature check needed); anything else is verified to say precisely why not."""
        if (
            existing is not None
            and existing.quote_jwt is not None
            and hmac.compare_digest(existing.quote_jwt.encode(), quote_jwt.encode())
        ):
            if not self._quote_live(existing):
                raise _quote_expired()
            return existing
        try:
            claims = verify_node_token(quote_jwt, self.signer.did, now=self._now)
        except AuthError as exc:
            if exc.code == "expired":
                raise _quote_expired() from None
            raise AuthError(
                "invalid_quote", f"the quote was not issued by this node: {exc.message}", details=exc.details
            ) from None
        quote = claims.get("quote")
        if (
            not isinstance(quote, dict)
            or claims.get("aud") != inc.request.iss
            or quote.get("idempotency_key") != inc.key
        ):
            raise AuthError("invalid_quote", "the quote is for another requester or another job")
        raise ConflictError(
            "quote_superseded",
            "this quote is not the job's current quote; ask for a new one",
            details={"job": inc.job_key, "state": existing.state if existing else None},
        )

    # -- cancel -----------------------------------------------------------------------------------------

    async def cancel(self, job: str, token: str) -> tuple[JobRecord, str]:
        """Cancel for the job's requester: a signed request whose ``cancel`` claim names the job."""

        def names_job(payload: dict[str, Any]) -> None:
            if payload.get("cancel") != job:
                raise RequestError("invalid_cancel", "the signed request must carry {'cancel': <job id>}")

        async with self.journal.batched():
            with self.intake.request(token, names_job) as request:
                return await self._cancel(job, request)

    async def _cancel(self, job: str, request: VerifiedRequest) -> tuple[JobRecord, str]:
        async with self._job_lock(job):
            record = self.journal.require(job)
            if record.iss != request.iss:
                raise AuthError("not_job_owner", "only the job's requester may cancel it")
            if record.state == "cancelled":
                return record, "cancelled"
            if record.state in RESULT_STATES:
                return record, "already_completed"
            if record.state not in CANCELLABLE_STATES:
                raise ConflictError(
                    "job_closed",
                    f"job {job} is {record.state}",
                    details={"job": job, "state": record.state},
                )
            updated, _ = self.journal.transition(
                job, "cancelled", actor=request.iss, reason="cancelled by requester", expect=record.state
            )
            await self.journal.committed()
            self.ledger.release(job)
            return updated, "cancelled"

    # -- housekeeping -----------------------------------------------------------------------------------

    def expire_quotes(self) -> int:
        """Expire quotes past their time and release their holds; returns how many expired."""
        now = self._now()
        expired = self.journal.expire_quotes(now)
        for job in expired:
            self.ledger.release(job.id)
            self.metrics.quote("lost", "expired")
        self.ledger.expire(now)
        self.journal.prune_nonces(now - self.cfg.api.clock_skew_seconds)
        return len(expired)
