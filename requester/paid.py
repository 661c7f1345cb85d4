"""A requester's paid submission: the payer's wallet checked, the node's quoted escrow terms checked
against the envelope's payment, an EIP-3009 authorization signed for them, and the wait for the escrow to
be funded.

Every check that can fail locally runs before anything is signed or sent; the node submits
``fundWithAuthorization`` itself, so the payer's wallet needs USDC but no gas. A job funded from a
spending grant (:func:`submit_granted`) is paid by the grant's owner: its agent signs a ``Spend`` for the
quoted terms and the node submits ``fundFromGrant``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.envelope import Envelope, envelope_hash
from core.errors import AuthError, FundingError, RequestError
from payments.grants import GrantFunding, Spend, sign_spend
from payments.jwt import verify_node_token
from payments.keys import EthSigner, load_key
from payments.receipts import Authorization, FundingTerms, sign_authorization, terms_mismatches
from requester.client import NodeClient

# `submit --wait` polls this often, and gives the node this long past the funding's wait_until
# (clock skew between the two machines; a fund transaction still gathering confirmations).
FUNDING_POLL_SECONDS = 0.5
FUNDING_WAIT_GRACE_SECONDS = 120.0


class PaymentTermsRefused(FundingError):
    """Raised when ``job submit --wallet`` will not sign for a quote: the node offers no escrow terms, or
    terms other than the envelope's payment. No authorization is signed and the job is not submitted.

    Unlike a wallet that is not the payer (a usage error, exit 2) the node's answer is at fault here, so
    the command exits 1 as it does when the node refuses.
    """


@dataclass(frozen=True)
class PaidSubmission:
    """What the node answered to a paid submission, and the terms and authorization it was sent with."""

    body: dict[str, Any]
    terms: FundingTerms
    authorization: Authorization


@dataclass(frozen=True)
class GrantSubmission:
    """What the node answered to a grant-funded submission, the terms and the agent's signed spend."""

    body: dict[str, Any]
    terms: FundingTerms
    funding: GrantFunding


async def submit_granted(
    client: NodeClient,
    *,
    env: Envelope,
    agent: EthSigner,
    grant_id: int,
    node_did: str,
    quote_jwt: str | None,
    request_token: Callable[[], Awaitable[str]],
) -> GrantSubmission:
    """Quote (unless ``quote_jwt`` is given), check the terms, sign the agent's ``Spend`` from grant
    ``grant_id`` for exactly them, submit with it. The node submits ``fundFromGrant``: the grant's owner
    pays, the agent needs neither USDC nor gas. ``request_token`` must sign with the agent's key (the node
    takes a grant-funded job only from the grant's agent)."""
    if quote_jwt is None:
        quote_jwt = str((await client.quote(await request_token()))["jwt"])
    terms = quoted_terms(quote_jwt, node_did, env)
    spend = Spend.for_terms(grant_id, terms)
    funding = sign_spend(agent, chain_id=terms.chain_id, escrow=terms.escrow, spend=spend)
    body = await client.submit(await request_token(), quote_jwt, funding.to_json())
    return GrantSubmission(body=body, terms=terms, funding=funding)


def agent_key(path: Path) -> EthSigner:
    """The --agent-key: an Ethereum key (its ``did:pkh`` signs the request, its address the spend)."""
    signer = load_key(path)
    if not isinstance(signer, EthSigner):
        raise FundingError(
            "wallet_not_ethereum",
            f"{path} holds a {signer.key_type} key; --agent-key takes an Ethereum key "
            "(hearth keys new --type eth)",
            details={"wallet": str(path), "did": signer.did},
        )
    return signer


async def submit_paid(
    client: NodeClient,
    *,
    env: Envelope,
    wallet: EthSigner,
    node_did: str,
    quote_jwt: str | None,
    request_token: Callable[[], Awaitable[str]],
    valid_seconds: int | None = None,
) -> PaidSubmission:
    """Quote (unless ``quote_jwt`` is given), check the terms, sign the authorization, submit with it.

    ``request_token`` makes a fresh signed request on each call: the node takes each one once, and asking
    for the quote used one.
    """
    if quote_jwt is None:
        quote_jwt = str((await client.quote(await request_token()))["jwt"])
    terms = quoted_terms(quote_jwt, node_did, env)
    valid_before = None if valid_seconds is None else int(time.time()) + valid_seconds
    auth = sign_authorization(wallet, terms, valid_before=valid_before)
    body = await client.submit(await request_token(), quote_jwt, auth.to_json())
    return PaidSubmission(body=body, terms=terms, authorization=auth)


def payer_wallet(path: Path, env: Envelope) -> EthSigner:
    """The --wallet key, refused unless it is an Ethereum key of the envelope's payer (nothing sent yet)."""
    signer = load_key(path)
    if not isinstance(signer, EthSigner):
        raise FundingError(
            "wallet_not_ethereum",
            f"{path} holds a {signer.key_type} key; --wallet takes an Ethereum key "
            "(hearth keys new --type eth)",
            details={"wallet": str(path), "did": signer.did},
        )
    if signer.address.lower() != env.payment.payer.lower():
        raise FundingError(
            "wallet_not_payer",
            f"the wallet {signer.address} is not the envelope's payer {env.payment.payer}",
            details={"wallet": signer.address, "payer": env.payment.payer},
        )
    return signer


def quoted_terms(quote_jwt: str, node_did: str, env: Envelope) -> FundingTerms:
    """The escrow terms of ``node_did``'s quote for ``env``, checked against the envelope's payment.

    The quote's signature is checked too: the payer is about to sign money over to what it says.
    """
    try:
        claims = verify_node_token(quote_jwt, node_did)
    except AuthError as exc:
        code = "quote_expired" if exc.code == "expired" else "invalid_quote"
        raise RequestError(
            code, f"not a current quote of {node_did}: {exc.message}", details=exc.details
        ) from None
    quote = claims.get("quote")
    if not isinstance(quote, dict) or quote.get("envelope_hash") != envelope_hash(env):
        raise RequestError(
            "quote_for_another_envelope",
            f"the quote does not price this envelope (job_id {env.job_id}); ask for a new one",
            details={"job_id": env.job_id, "envelope_hash": envelope_hash(env)},
        )
    if quote.get("funding_terms") is None:
        raise PaymentTermsRefused(
            "payments_not_configured",
            f"the node {node_did} takes no payments (its quote has no funding_terms); "
            "submit without --wallet",
            details={"node": node_did},
        )
    terms = FundingTerms.from_json(quote["funding_terms"])
    check_terms(terms, env)
    return terms


def check_terms(terms: FundingTerms, env: Envelope) -> None:
    """Refuse escrow terms other than the envelope's (:func:`~payments.receipts.terms_mismatches`: chain,
    escrow, payer, validator, amount <= max_price) with ``funding_terms_mismatch``, each mismatch as
    ``{"field", "envelope", "quote"}``.
    """
    mismatches = [
        {"field": row["field"], "envelope": row["expected"], "quote": row["terms"]}
        for row in terms_mismatches(terms, env.payment)
    ]
    if mismatches:
        raise PaymentTermsRefused(
            "funding_terms_mismatch",
            "the quote's escrow terms differ from the envelope's payment "
            f"({', '.join(str(m['field']) for m in mismatches)}); nothing was signed",
            details={"mismatches": mismatches},
        )


async def wait_for_funding(client: NodeClient, job: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Poll ``job``'s status until its escrow funding is decided; the last status body.

    Decided: funding ``funded`` or ``refused``, or the job has left ``accepted``. Bounded: the node expires
    a job still unfunded at its ``wait_until``; this waits FUNDING_WAIT_GRACE_SECONDS longer at most, then
    returns the undecided status. ``say`` hears of each fund transaction and state it reaches.
    """
    give_up: float | None = None
    shown: tuple[str, str] | None = None
    while True:
        body = await client.status(job)
        view = body["job"]
        payment = view.get("payment")
        if payment is None:  # the node has no chain (any more): nothing will fund the job
            return body
        funding, tx = payment["funding"], payment["funding"]["tx"]
        if tx is not None and (tx["hash"], tx["state"]) != shown:
            shown = (tx["hash"], tx["state"])
            say(f"  fund tx   {tx['hash']} ({tx['state']})")
        if funding["state"] != "awaiting" or view["state"] != "accepted":
            return body
        if give_up is None:
            left = max(float(funding["wait_until"]) - time.time(), 0.0)
            give_up = time.monotonic() + left + FUNDING_WAIT_GRACE_SECONDS
        if time.monotonic() >= give_up:
            return body
        await asyncio.sleep(FUNDING_POLL_SECONDS)


def funding_outcome(body: dict[str, Any]) -> tuple[bool, str]:
    """Whether the job of a status body is funded, and a line that says how (or why not)."""
    view = body["job"]
    payment = view.get("payment")
    if payment is None:
        return False, "not watched: the node reports no payment for this job"
    funding, tx = payment["funding"], payment["funding"]["tx"]
    if funding["state"] == "funded":
        if tx is None:
            return True, "funded (the escrow holds the amount)"
        return True, (
            f"funded by tx {tx['hash']} ({tx['state']} in block {tx['block_number']}, "
            f"{tx['gas_used']} gas paid by the node)"
        )
    failure = view.get("failure")
    why = f": {failure['message']}" if failure else ""
    if funding["state"] == "refused" or view["state"] != "accepted":
        return False, f"{funding['state']}, job {view['state']}{why}"
    return False, f"still awaiting after the wait; see `hearth job status {view['id']}`"
