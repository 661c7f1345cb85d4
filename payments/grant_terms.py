"""A grant-funded job's funding, checked before the node accepts the job (DESIGN §12).

The ``funding`` of ``POST /v1/jobs`` may be ``{"grant": id, "spend": {...}, "signature": "0x…"}``: the
grant's agent signed an EIP-712 ``Spend`` for exactly the quote's escrow terms, and the node submits
``fundFromGrant`` (through the same outbox as ``fundWithAuthorization``). Before the job is accepted,
:func:`check_grant_funding` refuses, with nothing held or recorded:

- a malformed document (``invalid_funding``, naming the field), a spend other than the quote's terms
  (``grant_spend_mismatch``);
- a grant the escrow does not know (``grant_unknown``), a request whose ``iss`` is not the grant's agent
  as ``did:pkh`` (``grant_not_agent``), a spend the agent did not sign (``grant_spend_signature_invalid``),
  an envelope whose payer is not the grant's owner (``grant_owner_not_payer``);
- what the chain says of the grant now: revoked (``grant_revoked``), expired or about to
  (``grant_expired``), the amount over the per-job cap (``grant_exceeds_job_cap``) or over what is left
  this period (``grant_exhausted``): 402s whose details say what is left (:meth:`Grant.left`);
- a ``fundFromGrant`` the escrow would revert in simulation (the same codes from its custom errors, else
  ``grant_rejected``: e.g. the owner's balance or allowance).

The grant is read on chain: with the chain unreachable the refusal is ``chain_unavailable`` (retryable).
"""

from __future__ import annotations

from typing import Any, Final

from core.config import ChainSection
from core.errors import FundingError, HearthError
from payments.chain import Chain, EscrowStatus, is_reverted
from payments.did import parse_did_pkh
from payments.grants import Grant, GrantFunding, spend_signer
from payments.receipts import FundingTerms

# A grant must stay open this long after a spend reaches the node, or funding may fail in flight.
GRANT_MARGIN_SECONDS: Final = 60

# The escrow's custom errors of fundFromGrant, as the node's refusal codes.
_REVERTS: Final = {
    "GrantUnknown": "grant_unknown",
    "GrantRevokedError": "grant_revoked",
    "GrantExpired": "grant_expired",
    "OverJobCap": "grant_exceeds_job_cap",
    "OverPeriodCap": "grant_exhausted",
    "NotGrantAgent": "grant_spend_signature_invalid",
}


def grant_fund_call(chain: Chain, funding: GrantFunding) -> Any:
    """The escrow's ``fundFromGrant`` call for the agent's signed spend."""
    s = funding.spend
    return chain.fund_from_grant(
        (s.grant_id, s.job_id, s.provider, s.validator, s.amount, s.deadline, funding.r_s_v)
    )


async def read_grant(chain: Chain, grant_id: int) -> Grant:
    """The grant as the escrow reads it now; ``grant_unknown`` if it was never opened."""
    try:
        grant = Grant.from_view(grant_id, await chain.grant_view(grant_id))
    except HearthError as exc:
        if not is_reverted(exc, "GrantUnknown"):
            raise
        grant = None
    if grant is None or not grant.exists:
        raise FundingError(
            "grant_unknown", f"the escrow has no grant {grant_id}", details={"grant": str(grant_id)}
        )
    return grant


def _refuse(code: str, message: str, grant: Grant, amount: int) -> FundingError:
    return FundingError(code, message, details={**grant.left(), "amount": str(amount)})


def check_grant_limits(grant: Grant, amount: int, now: float) -> None:
    """Refuse a spend of ``amount`` the grant does not allow now (402s with what is left)."""
    if grant.revoked:
        raise _refuse("grant_revoked", f"grant {grant.grant_id} was revoked by its owner", grant, amount)
    if grant.expiry <= now + GRANT_MARGIN_SECONDS:
        raise _refuse(
            "grant_expired",
            f"grant {grant.grant_id} expires at {grant.expiry} (within {GRANT_MARGIN_SECONDS}s, or past)",
            grant,
            amount,
        )
    if amount > grant.per_job_max:
        raise _refuse(
            "grant_exceeds_job_cap",
            f"{amount} base units exceed grant {grant.grant_id}'s per-job cap of {grant.per_job_max}",
            grant,
            amount,
        )
    if amount > grant.left_this_period:
        raise _refuse(
            "grant_exhausted",
            f"{amount} base units exceed the {grant.left_this_period} left of grant {grant.grant_id} "
            f"this period (it ends at {grant.period_ends})",
            grant,
            amount,
        )


async def check_grant_funding(
    cfg: ChainSection, chain: Chain, terms: FundingTerms, doc: Any, *, iss: str, now: float
) -> GrantFunding:
    """The agent's spend for ``terms``, checked locally, against the grant on chain and in simulation."""
    funding = GrantFunding.from_json(doc)
    mismatches = funding.spend.mismatches(funding.grant_id, terms)
    if mismatches:
        raise FundingError(
            "grant_spend_mismatch",
            "the spend is not for the quote's escrow terms "
            f"({', '.join(str(m['field']) for m in mismatches)}); sign the quote's terms",
            details={"mismatches": mismatches},
        )
    grant = await read_grant(chain, funding.grant_id)
    try:
        iss_chain, iss_account = parse_did_pkh(iss)
    except HearthError:
        iss_chain, iss_account = None, None
    if iss_chain != cfg.chain_id or iss_account != grant.agent:
        raise FundingError(
            "grant_not_agent",
            f"a job funded by grant {grant.grant_id} must be requested by its agent "
            f"did:pkh:eip155:{cfg.chain_id}:{grant.agent}",
            details={"grant": str(grant.grant_id), "agent": grant.agent, "iss": iss},
        )
    signer = spend_signer(chain_id=terms.chain_id, escrow=terms.escrow, funding=funding)
    if signer != grant.agent:
        raise FundingError(
            "grant_spend_signature_invalid",
            "the spend is not signed by the grant's agent for these terms",
            details={"recovered": signer, "agent": grant.agent, "grant": str(grant.grant_id)},
        )
    if grant.owner != terms.payer:
        raise FundingError(
            "grant_owner_not_payer",
            f"grant {grant.grant_id} pays from {grant.owner}; the envelope's payment.payer is {terms.payer}",
            details={"owner": grant.owner, "payer": terms.payer, "grant": str(grant.grant_id)},
        )
    try:
        check_grant_limits(grant, terms.amount, now)
    except FundingError:
        if (await chain.escrow_job(terms.job_id)).status != EscrowStatus.NONE:
            return funding  # funded already (a retry after this very spend): the watcher judges the entry
        raise
    try:
        await chain.simulate(grant_fund_call(chain, funding), domain="funding")
    except HearthError as exc:
        if is_reverted(exc, "JobExists"):
            return funding  # funded already (by this spend or otherwise): the watcher judges the entry
        if exc.code != "escrow_reverted":
            raise  # the chain is down: retryable
        code = "grant_rejected"
        if str(exc.details.get("error")) in _REVERTS:
            code = _REVERTS[str(exc.details.get("error"))]
        raise FundingError(
            code,
            f"the escrow would refuse this spend: {exc.message}",
            details={**grant.left(), "amount": str(terms.amount), "escrow": exc.details},
        ) from None
    return funding


__all__ = [
    "GRANT_MARGIN_SECONDS",
    "check_grant_funding",
    "check_grant_limits",
    "grant_fund_call",
    "read_grant",
]
