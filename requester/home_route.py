"""Routing one job through the requester home (:mod:`requester.home`): idempotent, pinned, within budget.

:func:`route_once` is what ``hearth job submit --market`` (and an agent's tools) call:

1. the idempotency key is claimed before any network call (recorded ``routing``); the same key with the
   same envelope and a submitted job returns that job at once: no discovery, no quote, no spend; with
   another envelope it is refused (``idempotency_key_conflict``);
2. a key found in flight (a crash, or an unknown outcome, after ``routing`` was recorded) or failed is
   routed again within its retry budget; in flight at a node, it goes to that node only, with the quote it
   was sent (the node gives no new quote for a job it has accepted, and returns that job by ``job_id``);
3. the providers are discovered, and :func:`requester.routing.route` runs with a guard that, before each
   candidate is asked to take the job, pins it and reserves its amount against the budgets in one
   transaction: over a budget, routing stops with ``budget_exceeded`` and nothing is sent or signed;
4. the decision is recorded: the reservation committed at the funded amount, kept while the outcome is
   unknown, released otherwise.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from core.envelope import Envelope, envelope_hash, node_job_id
from core.errors import HearthError
from payments.keys import Signer
from payments.receipts import FundingTerms
from requester.home import KeyRecord, RequesterHome
from requester.market import Provider
from requester.routing import route
from requester.routing_decision import Candidate, RoutingDecision


@dataclass(frozen=True)
class Routed:
    """What :func:`route_once` did: the key's record, the decision's JSON (the recorded one on a replay),
    and the :class:`RoutingDecision` itself when it routed (None on a replay)."""

    record: KeyRecord
    decision: dict[str, Any]
    replayed: bool
    routing: RoutingDecision | None = None

    @property
    def outcome(self) -> str:
        return str(self.decision.get("outcome"))

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.record.key,
            "replayed": self.replayed,
            "state": self.record.state,
            "attempts": self.record.attempts,
            "workflow": self.record.workflow,
            "node": self.record.node,
            "job": self.record.job,
        }


def _recorded(provider: Provider, quote: dict[str, Any], job: str) -> Candidate:
    """The candidate a cut-off routing chose, with the quote it was sent (as the home recorded it)."""
    terms = None if quote.get("terms") is None else FundingTerms.from_json(quote["terms"])
    ask = None if quote.get("ask") is None else Decimal(str(quote["ask"]))
    return Candidate(
        provider,
        "quoted",
        "resumed with the quote it was sent before",
        ask=ask,
        quote_jwt=quote.get("jwt"),
        job=job,
        terms=terms,
    )


def default_key(signer: Signer, env: Envelope) -> str:
    """The key when none is given: the node's id of the job (``hj_…`` of the requester DID and job_id),
    which every node already treats as one job."""
    return node_job_id(signer.did, env.job_id)


async def route_once(
    home: RequesterHome,
    key: str,
    env: Envelope,
    signer: Signer,
    discover: Callable[[], Awaitable[Sequence[Provider]]],
    *,
    workflow: str,
    **route_kwargs: Any,
) -> Routed:
    """Route ``env`` under idempotency key ``key`` (see the module). ``discover`` gives the providers
    (called only when the key must be routed); ``route_kwargs`` go to :func:`requester.routing.route`.

    Raises ``idempotency_key_conflict``, ``budget_exceeded`` (retry budget spent) and ``outcome_unknown``
    (the key's node is not among the providers discovered now) before anything is sent; a refusal of the
    amount's budget is the decision's error (outcome ``refused``).
    """
    claim = home.claim(key, envelope_hash=envelope_hash(env), job_id=env.job_id, workflow=workflow)
    if claim.kind == "replay":
        assert claim.decision is not None
        return Routed(claim.record, claim.decision, replayed=True)
    record = claim.record if claim.kind == "new" else home.take(key)
    providers = list(await discover())
    if record.node is not None:  # in flight at a node: that node only, never a second one
        providers = [p for p in providers if p.did == record.node]
        if not providers:
            raise HearthError(
                "outcome_unknown",
                f"the job of idempotency key {key!r} may be at {record.node} ({record.endpoint}), which "
                "discovery does not list now; no other node is asked. Retry later, or check it with "
                f"`hearth job status {record.job} --node {record.endpoint}`",
                details={"key": key, "node": record.node, "endpoint": record.endpoint, "job": record.job},
                retryable=True,
                domain="request",
            )
    job_key = node_job_id(signer.did, env.job_id)
    resume = None
    if record.node is not None and record.quote is not None:
        resume = _recorded(providers[0], record.quote, record.job or job_key)

    def guard(cand: Candidate, amount: int) -> None:
        quote = {
            "jwt": cand.quote_jwt,
            "ask": None if cand.ask is None else str(cand.ask),
            "terms": None if cand.terms is None else cand.terms.to_json(),
        }
        endpoint = cand.provider.endpoint
        home.hold(key, amount=amount, node=cand.did, endpoint=endpoint, job=cand.job or job_key, quote=quote)

    decision = await route(env, signer, providers, guard=guard, resume=resume, **route_kwargs)
    doc = decision.to_json()
    charge = 0
    if decision.submitted and decision.job is not None and decision.job.funding is not None:
        charge = int(decision.job.funding["terms"]["amount"])
    done = home.finish(key, doc, charge=charge)
    return Routed(done, doc, replayed=False, routing=decision)


__all__ = ["Routed", "default_key", "route_once"]
