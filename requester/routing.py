"""Routing one job among competing providers (DESIGN §11): quote everywhere, choose, submit once.

:func:`route` takes an envelope, the requester's signing key, the providers discovery found
(:class:`requester.market.Provider`) and a :class:`Strategy`, and returns a :class:`RoutingDecision` that
explains itself: every candidate with its ask, refusal or reason to be left out, the winner and why it won,
every submission attempt and the job it gave.

1. Fit: a provider whose offer cannot take the envelope (:func:`requester.market.fits`) is left out with
   its reason; under ``reputation``, so is one below the settled-jobs and failure-rate thresholds.
2. Quotes: every remaining provider is asked at once (one signed request each, ``aud`` its DID), each
   within a bounded time. A quote counts only if it is signed by that DID for this requester and envelope,
   within ``max_price``, and (when it names escrow terms) pays the provider's registered wallet; with a
   payer wallet its terms must also be the envelope's payment.
3. Choice: cheapest ask first; ties go to the better record (more settled jobs, fewer failures), then DID.
4. Submission, in that order, never funding two nodes for one job:

   - a definite refusal (the node's structured 4xx, or a 503 saying it is busy) or a connection that
     failed before anything was sent: on to the next candidate;
   - an unknown outcome (sent, no answer: a read timeout, a connection dropped after sending, a 5xx, an
     answer that is not the node's): the same node again, with the same envelope and quote under a fresh
     ``jti`` (the node takes each token once; by ``job_id`` it returns the job it already has), with
     backoff. Still unknown: stop with ``outcome_unknown`` naming the node and job. The router never moves
     on from a node that may hold the job.

   A ``guard`` (the requester home's budgets and pinned node, :mod:`requester.home_route`) is called
   before each candidate is asked to take the job, with the amount it would be paid (its quoted escrow
   amount, else its ask, in USDC base units); when it raises, routing stops with outcome ``refused`` and
   its error: nothing was sent to that node or any other, nothing signed. ``resume`` (a candidate quoted
   by an earlier routing that was cut off, as the requester home recorded it) skips discovery's providers
   and the quotes: the job goes to that node alone, with that quote (the node returns the job it already
   has by ``job_id``; it gives no new quote for a job it has accepted).

   Paying (a payer ``wallet``), the job is first accepted without money, then the EIP-3009 authorization
   is signed for the node that accepted it, and only for it, and sent to it (retried as above with the
   same authorization). A node that refuses never held an authorization, so the next one can be asked.
   Paying from a spending grant (a :class:`GrantFunder`: the grant and its agent's key, DESIGN §12) goes
   the same two steps: the agent's ``Spend`` is signed for the accepting node's quoted terms only, and
   the node submits ``fundFromGrant`` (the grant's owner pays; the agent signs the requests too).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any, Final

import aiohttp

from core import defaults as d
from core.envelope import Envelope, envelope_dict, envelope_hash, node_job_id
from core.errors import HearthError, PricingError, RequestError
from core.untrusted import UntrustedJSONError, parse_json
from payments.grants import Spend, sign_spend
from payments.jwt import verify_node_token
from payments.keys import EthSigner, Signer
from payments.receipts import USDC_UNIT, FundingTerms, sign_authorization
from requester.client import sign_request
from requester.market import REASONS, Provider, fits
from requester.paid import quoted_terms
from requester.routing_decision import (
    Attempt,
    Candidate,
    Heard,
    RoutingDecision,
    Step,
    Strategy,
    SubmittedJob,
    brief,
    explain,
    no_provider,
    shown,
)

DEFAULT_QUOTE_TIMEOUT_SECONDS: Final = d.DEFAULT_ROUTING_QUOTE_TIMEOUT_SECONDS
DEFAULT_SUBMIT_TIMEOUT_SECONDS: Final = 30.0
DEFAULT_CONNECT_TIMEOUT_SECONDS: Final = 5.0
DEFAULT_RETRIES: Final = 3  # further tries of one node after an unknown outcome
DEFAULT_BACKOFF_SECONDS: Final = 0.5  # doubles with each retry
DEFAULT_CONCURRENCY: Final = 32
MAX_ANSWER_BYTES: Final = 1 << 20
Guard = Callable[[Candidate, int], None]  # raises a HearthError to stop before the candidate is asked
_ORDER: Final = {"quoted": 0, "refused": 1, "unreachable": 2, "ineligible": 3, "unfit": 4}


@dataclass(frozen=True)
class GrantFunder:
    """Fund the routed job from spending grant ``grant_id``: ``agent`` (the grant's agent key) signs a
    ``Spend`` for the accepting node's terms; the grant's owner (the envelope's payer) pays."""

    grant_id: int
    agent: EthSigner

    def funding(self, terms: FundingTerms) -> dict[str, Any]:
        spend = Spend.for_terms(self.grant_id, terms)
        return sign_spend(self.agent, chain_id=terms.chain_id, escrow=terms.escrow, spend=spend).to_json()


# -- one request, its outcome classified --------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    heard: Heard
    status: int | None
    body: dict[str, Any]
    message: str

    @property
    def error(self) -> dict[str, Any]:
        err = self.body.get("error")
        return err if isinstance(err, dict) else {}

    @property
    def code(self) -> str | None:
        code = self.error.get("code")
        return code if isinstance(code, str) else None


def _classify(status: int, raw: bytes) -> _Answer:
    """A node's answer: ``ok`` (2xx JSON object), ``refused`` (its structured error with a 4xx, or a 503
    from a busy node: nothing was taken), or ``unknown`` (any other 5xx, or an answer not the node's)."""
    try:
        body = parse_json(raw) if raw else None
    except UntrustedJSONError:
        body = None
    if not isinstance(body, dict):
        return _Answer("unknown", status, {}, f"HTTP {status} with an answer that is not a JSON object")
    if 200 <= status < 300:
        return _Answer("ok", status, body, f"HTTP {status}")
    err = body.get("error")
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        message = str(err.get("message", ""))[:300]
        if 400 <= status < 500 or (status == 503 and err.get("domain") == "scheduling"):
            return _Answer("refused", status, body, message)
        return _Answer("unknown", status, body, f"HTTP {status} {err['code']}: {message}")
    return _Answer("unknown", status, body, f"HTTP {status} without the node's structured error")


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    data: bytes,
    content_type: str,
    *,
    connect: float,
    read: float,
    total: float | None = None,
) -> _Answer:
    """POST once. ``not_sent``: the connection failed before the request left; ``unknown``: it may have
    reached the node but no answer came back (read timeout, connection dropped, answer over the cap).
    ``total`` bounds the whole exchange (default: ``connect + read`` and a second), against a node that
    answers a byte at a time."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)
    try:
        async with asyncio.timeout(connect + read + 1.0 if total is None else total):
            async with session.post(
                url,
                data=data,
                headers={"Content-Type": content_type},
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > MAX_ANSWER_BYTES:
                        return _Answer("unknown", resp.status, {}, f"answer over {MAX_ANSWER_BYTES} bytes")
                    chunks.append(chunk)
                return _classify(resp.status, b"".join(chunks))
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        return _Answer("not_sent", None, {}, f"connection failed: {exc}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return _Answer("unknown", None, {}, f"sent, no answer: {type(exc).__name__} {exc}".strip())


# -- routing ------------------------------------------------------------------------------------------


@dataclass
class _Router:
    env: Envelope
    signer: Signer
    wallet: EthSigner | None
    grant: GrantFunder | None
    session: aiohttp.ClientSession
    quote_timeout: float
    submit_timeout: float
    connect_timeout: float
    retries: int
    backoff: float
    ttl_seconds: int
    valid_seconds: int | None
    attempts: list[Attempt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.doc = envelope_dict(self.env)
        self.hash = envelope_hash(self.env)
        self.job_key = node_job_id(self.signer.did, self.env.job_id)

    @property
    def paying(self) -> bool:
        return self.wallet is not None or self.grant is not None

    def token(self, node_did: str) -> str:
        """A fresh signed request for ``node_did`` (a new ``jti`` each time; the same envelope)."""
        return sign_request(self.signer, node_did, {"job": self.doc}, ttl_seconds=self.ttl_seconds)

    # quotes

    async def quote(self, cand: Candidate, limit: asyncio.Semaphore) -> None:
        did = cand.did
        async with limit:
            ans = await _post(
                self.session,
                _url(cand.provider.endpoint, "/v1/quotes"),
                self.token(did).encode(),
                "application/jwt",
                connect=min(self.connect_timeout, self.quote_timeout),
                read=self.quote_timeout,
                total=self.quote_timeout,
            )
        if ans.heard == "refused":
            ask = (
                ans.error.get("details", {}).get("ask")
                if isinstance(ans.error.get("details"), dict)
                else None
            )
            cand.status, cand.code, cand.message, cand.ask = "refused", ans.code, ans.message, _decimal(ask)
            return
        if ans.heard != "ok":
            cand.status, cand.code, cand.message = "unreachable", "unreachable", ans.message
            return
        try:
            cand.ask, cand.quote_jwt, cand.job, cand.terms = self.check_quote(cand.provider, ans.body)
        except HearthError as exc:
            cand.status, cand.code, cand.message = "refused", exc.code, exc.message
            return
        except (ValueError, TypeError, KeyError) as exc:  # a stranger's quote, malformed in a way unforeseen
            cand.status, cand.code, cand.message = "refused", "invalid_quote", f"unreadable quote: {exc}"
            return
        cand.status, cand.message = "quoted", f"asks {shown(cand.ask)} USDC"

    def check_quote(
        self, provider: Provider, body: dict[str, Any]
    ) -> tuple[Decimal, str, str, FundingTerms | None]:
        """The quote's ask, JWT, job and escrow terms, once checked to be this node's quote of this
        envelope for this requester (and, when paying, of the envelope's payment to the registered wallet)."""
        jwt = body.get("jwt")
        if not isinstance(jwt, str):
            raise RequestError("invalid_quote", "the answer carries no quote JWT")
        claims = verify_node_token(jwt, provider.did, audience=self.signer.did)
        quote = claims.get("quote")
        if not isinstance(quote, dict) or quote.get("envelope_hash") != self.hash:
            raise RequestError("invalid_quote", "the quote does not price this envelope")
        ask = _decimal(quote.get("price"))
        if ask is None or ask < 0 or quote.get("currency") != "usdc":
            raise RequestError("invalid_quote", "the quote names no USDC price")
        if ask > self.env.payment.max_price_decimal:
            raise PricingError(
                "price_above_max",
                f"the ask {ask} exceeds max_price {self.env.payment.max_price}",
                details={"ask": str(ask), "max_price": self.env.payment.max_price},
            )
        terms = None
        if self.paying:  # raises unless the terms are the envelope's payment
            terms = quoted_terms(jwt, provider.did, self.env)
        elif quote.get("funding_terms") is not None:
            terms = FundingTerms.from_json(quote["funding_terms"])
        if terms is not None and terms.provider.lower() != provider.wallet.lower():
            raise HearthError(
                "payout_mismatch",
                f"the quote's escrow terms pay {terms.provider}, not the registered wallet {provider.wallet}",
                domain="funding",
            )
        return ask, jwt, str(quote.get("job") or self.job_key), terms

    # submission

    async def until_known(
        self, cand: Candidate, step: Step, funding: dict[str, Any] | None
    ) -> tuple[_Answer, bool]:
        """Send ``step`` to ``cand`` until its outcome is known; the last answer, and whether some try may
        have reached the node. After an unknown outcome only the node's acceptance ends the tries; the
        caller stops (never moving on) unless the answer is ``ok``."""
        url = _url(cand.provider.endpoint, "/v1/jobs")
        maybe_sent = False
        ans = _Answer("unknown", None, {}, "not tried")
        for n in range(1, self.retries + 2):
            if n > 1:
                await asyncio.sleep(self.backoff * 2 ** (n - 2))
            doc = {"request": self.token(cand.did), "quote": cand.quote_jwt, "funding": funding}
            ans = await _post(
                self.session,
                url,
                json.dumps(doc).encode(),
                "application/json",
                connect=self.connect_timeout,
                read=self.submit_timeout,
            )
            self.attempts.append(
                Attempt(
                    cand.did, cand.provider.endpoint, step, n, ans.heard, ans.status, ans.code, ans.message
                )
            )
            if ans.heard == "ok" or (not maybe_sent and ans.heard in ("refused", "not_sent")):
                return ans, maybe_sent
            maybe_sent = True
        return ans, maybe_sent


def _url(endpoint: str, path: str) -> str:
    return endpoint.rstrip("/") + path


def amount_of(cand: Candidate) -> int:
    """What ``cand`` would be paid in USDC base units: its quoted escrow amount, else its ask (rounded up)."""
    if cand.terms is not None:
        return cand.terms.amount
    assert cand.ask is not None  # only quoted candidates are submitted to
    return int((cand.ask * USDC_UNIT).to_integral_value(rounding=ROUND_CEILING))


def _decimal(value: Any) -> Decimal | None:
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    try:
        d = Decimal(value)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


async def route(
    env: Envelope,
    signer: Signer,
    providers: Sequence[Provider],
    *,
    strategy: Strategy | None = None,
    wallet: EthSigner | None = None,
    grant: GrantFunder | None = None,
    session: aiohttp.ClientSession | None = None,
    quote_timeout: float = DEFAULT_QUOTE_TIMEOUT_SECONDS,
    submit_timeout: float = DEFAULT_SUBMIT_TIMEOUT_SECONDS,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF_SECONDS,
    concurrency: int = DEFAULT_CONCURRENCY,
    ttl_seconds: int = 300,
    valid_seconds: int | None = None,
    guard: Guard | None = None,
    resume: Candidate | None = None,
) -> RoutingDecision:
    """Quote ``env`` with every fitting provider, choose by ``strategy``, submit to the winner (see the
    module's docstring). With ``wallet`` (the envelope's payer) the job is paid for by an EIP-3009
    authorization signed for the accepting node only (``valid_seconds``: it lapses sooner than the escrow
    deadline). With ``grant`` it is paid from a spending grant: ``signer`` must be the grant's agent (the
    node takes a grant-funded job only from it). Raises only on a local mistake (a wallet that is not the
    payer, a wallet and a grant, a signer that is not the grant's agent); every node's answer, good or bad,
    is in the decision."""
    strategy = strategy or Strategy()
    if grant is not None and (wallet is not None or grant.agent.did != signer.did):
        raise HearthError(
            "grant_not_agent" if wallet is None else "two_funders",
            f"a grant-funded job is requested by the grant's agent {grant.agent.did}, not {signer.did}"
            if wallet is None
            else "give a wallet or a grant, not both",
            domain="funding",
        )
    if wallet is not None and wallet.address.lower() != env.payment.payer.lower():
        raise HearthError(
            "wallet_not_payer",
            f"the wallet {wallet.address} is not the envelope's payer {env.payment.payer}",
            domain="funding",
        )
    own = session is None
    http = session or aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, force_close=True)
    )
    router = _Router(
        env, signer, wallet, grant, http, quote_timeout, submit_timeout, connect_timeout,
        max(retries, 0), backoff, ttl_seconds, valid_seconds,
    )  # fmt: skip
    try:
        return await _route(router, list(providers), strategy, concurrency, guard, resume)
    finally:
        if own:
            await http.close()


async def _route(
    router: _Router,
    providers: list[Provider],
    strategy: Strategy,
    concurrency: int,
    guard: Guard | None,
    resume: Candidate | None,
) -> RoutingDecision:
    env = router.env
    if resume is not None:  # quoted before (a routing cut off): that node alone, no new quote
        decision = RoutingDecision(env.job_id, strategy, "no_provider", [resume], router.attempts)
        return await _submit(router, decision, [resume], guard)
    candidates: list[Candidate] = []
    for p in sorted(providers, key=lambda p: p.did):
        unfit = fits(p.offer, env)
        if unfit is not None:
            candidates.append(Candidate(p, "unfit", REASONS.get(unfit, unfit), unfit))
            continue
        why_not = strategy.ineligible(p.reputation)
        if why_not is not None:
            candidates.append(Candidate(p, "ineligible", why_not, "below_reputation_threshold"))
            continue
        candidates.append(Candidate(p, "unreachable", "no answer in time"))  # until its quote comes
    asked = [c for c in candidates if c.status == "unreachable"]
    limit = asyncio.Semaphore(max(concurrency, 1))
    await asyncio.gather(*(router.quote(c, limit) for c in asked))
    ranked = sorted((c for c in candidates if c.status == "quoted"), key=Candidate.rank_key)
    rest = sorted((c for c in candidates if c.status != "quoted"), key=lambda c: (_ORDER[c.status], c.did))
    candidates = ranked + rest  # the quotes first, cheapest first; then refusals, and who was not asked
    decision = RoutingDecision(env.job_id, strategy, "no_provider", candidates, router.attempts)
    if not ranked:
        decision.error = no_provider(candidates, asked, strategy)
        return decision
    return await _submit(router, decision, ranked, guard)


async def _submit(
    router: _Router, decision: RoutingDecision, ranked: list[Candidate], guard: Guard | None
) -> RoutingDecision:
    """Submit to the ``ranked`` quotes in order (see the module), the guard asked before each."""
    candidates = decision.candidates
    passed: list[Candidate] = []
    for cand in ranked:
        if guard is not None:
            try:
                guard(cand, amount_of(cand))
            except HearthError as exc:
                decision.outcome, decision.error = "refused", exc
                decision.reason = f"refused before {cand.did} was asked to take the job: {exc.message}"
                return decision
        ans, maybe_sent = await router.until_known(cand, "accept", None)
        if ans.heard == "ok":
            return await _accepted(router, decision, cand, ans, ranked, passed)
        if maybe_sent:
            return _unknown(router, decision, cand, "accept", ans)
        cand.status, cand.code = (
            ("refused", ans.code) if ans.heard == "refused" else ("unreachable", "unreachable")
        )
        cand.message = f"at submission: {ans.message}"
        passed.append(cand)
    decision.error = HearthError(
        "no_provider",
        f"every quoting provider refused the submission or could not be reached ({len(ranked)})",
        details={"candidates": [brief(c) for c in candidates]},
        domain="request",
    )
    return decision


async def _accepted(
    router: _Router,
    decision: RoutingDecision,
    cand: Candidate,
    ans: _Answer,
    ranked: list[Candidate],
    passed: list[Candidate],
) -> RoutingDecision:
    job = ans.body.get("job") if isinstance(ans.body.get("job"), dict) else {}
    assert isinstance(job, dict)
    submitted = SubmittedJob(
        id=str(job.get("id") or cand.job or router.job_key),
        job_id=router.env.job_id,
        node=cand.did,
        endpoint=cand.provider.endpoint,
        state=str(job["state"]) if "state" in job else None,
        accepted_now=bool(ans.body.get("accepted_now")) if "accepted_now" in ans.body else None,
    )
    decision.winner, decision.job = cand.did, submitted
    decision.reason = explain(cand, ranked, passed, decision.strategy)
    if not router.paying:
        decision.outcome = "submitted"
        return decision
    terms = cand.terms
    assert terms is not None  # a paid quote without terms was refused when quoted
    sent: dict[str, Any]
    if router.grant is not None:  # the agent's spend, once, for this node's terms only
        sent = router.grant.funding(terms)
        funding = {"terms": terms.to_json(), "grant": sent}
    else:
        assert router.wallet is not None
        valid_before = None if router.valid_seconds is None else int(time.time()) + router.valid_seconds
        sent = sign_authorization(router.wallet, terms, valid_before=valid_before).to_json()  # this node only
        funding = {"terms": terms.to_json(), "authorization": sent}
    fans, maybe_sent = await router.until_known(cand, "fund", sent)
    if fans.heard == "ok":
        body_job = fans.body.get("job")
        state = body_job.get("state") if isinstance(body_job, dict) else None
        decision.job = replace(submitted, state=state or submitted.state, funding=funding)
        decision.outcome = "submitted"
        return decision
    decision.job = replace(submitted, funding=funding)
    if maybe_sent:
        return _unknown(router, decision, cand, "fund", fans)
    decision.outcome = "funding_failed"
    decision.error = HearthError(
        "funding_refused" if fans.heard == "refused" else "funding_not_delivered",
        f"{cand.did} accepted job {submitted.id} but "
        + (
            f"refused its funding: {fans.message}"
            if fans.heard == "refused"
            else f"could not be reached with its funding: {fans.message}"
        )
        + "; no other node is asked (the job is this node's)",
        details={
            "node": cand.did,
            "job": submitted.id,
            "code": fans.code,
            "refusal": fans.error.get("details") if isinstance(fans.error.get("details"), dict) else None,
        },
        domain="funding",
    )
    return decision


def _unknown(
    router: _Router, decision: RoutingDecision, cand: Candidate, step: Step, ans: _Answer
) -> RoutingDecision:
    job = decision.job.id if decision.job is not None else (cand.job or router.job_key)
    decision.outcome, decision.winner = "outcome_unknown", cand.did
    if decision.job is None:
        decision.job = SubmittedJob(job, router.env.job_id, cand.did, cand.provider.endpoint, None, None)
    tries = sum(1 for a in router.attempts if a.node == cand.did and a.step == step)
    decision.reason = f"{cand.did} may hold job {job}: {tries} tries of '{step}' gave no definite answer"
    decision.error = HearthError(
        "outcome_unknown",
        f"the node {cand.did} ({cand.provider.endpoint}) may have taken job {job} ({step}); its last answer: "
        f"{ans.message}. No other node was asked; see `hearth job status {job} --node URL` there",
        details={
            "node": cand.did,
            "endpoint": cand.provider.endpoint,
            "job": job,
            "step": step,
            "tries": tries,
        },
        retryable=True,
        domain="request",
    )
    return decision


__all__ = ["GrantFunder", "Guard", "amount_of", "route"]
