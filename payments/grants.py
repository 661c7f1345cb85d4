"""Spending grants (DESIGN §12): an owner lets an agent key fund jobs from the owner's USDC, within caps.

The escrow enforces every grant: ``openGrant`` (or ``openGrantWithPermit``, the owner's EIP-2612 permit
in place of an ``approve``) sets the agent, the per-job and per-period caps, the period and the expiry;
``revokeGrant`` ends it; ``fundFromGrant`` funds one job's escrow entry from the owner's balance when
the agent signed an EIP-712 ``Spend`` for exactly that job's terms. This module is the one definition of
those documents and calls, shared by the node (which checks a spend before it accepts a job, then
submits it), the requester (whose agent signs the spend) and the owner's ``hearth grant`` commands:

- :class:`Spend` and :class:`GrantFunding` (the ``funding`` of ``POST /v1/jobs``: ``{"grant", "spend",
  "signature"}``), parsed strictly: every field refused with ``invalid_funding`` naming it;
- :func:`spend_typed_data`, :func:`sign_spend`, :func:`spend_signer`: the ``Spend`` under the escrow's
  EIP-712 domain (the receipts' domain);
- :class:`Grant`: ``grantOf`` as read from the chain (what is left this period, when the period ends);
- :func:`permit_typed_data`: the owner's EIP-2612 ``Permit`` of the token to the escrow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from payments.escrow_build import _DOMAIN_TYPE, ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, USDC_DOMAIN_VERSION
from payments.keys import EthSigner
from payments.receipts import FundingTerms, _Reader, _recover, _sign, hex32

MAX_UINT64: Final = 2**64 - 1
MAX_UINT128: Final = 2**128 - 1
FUNDING_TYPE: Final = "grant"

_SPEND_TYPE = [
    {"name": "grantId", "type": "uint256"},
    {"name": "jobId", "type": "bytes32"},
    {"name": "provider", "type": "address"},
    {"name": "validator", "type": "address"},
    {"name": "amount", "type": "uint256"},
    {"name": "deadline", "type": "uint64"},
]
_PERMIT_TYPE = [
    {"name": "owner", "type": "address"},
    {"name": "spender", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Spend:
    """An agent's ``Spend``: fund escrow job ``job_id`` with ``amount`` from grant ``grant_id``."""

    grant_id: int
    job_id: bytes
    provider: str
    validator: str
    amount: int
    deadline: int

    @classmethod
    def for_terms(cls, grant_id: int, terms: FundingTerms) -> Spend:
        """The spend that funds exactly ``terms`` (a quote's escrow terms) from ``grant_id``."""
        return cls(
            grant_id=grant_id,
            job_id=terms.job_id,
            provider=terms.provider,
            validator=terms.validator,
            amount=terms.amount,
            deadline=terms.deadline,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "grantId": str(self.grant_id),
            "jobId": hex32(self.job_id),
            "provider": self.provider,
            "validator": self.validator,
            "amount": str(self.amount),
            "deadline": self.deadline,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Spend:
        r = _Reader(doc, "funding.spend", "invalid_funding", "funding")
        return cls(
            grant_id=r.uint("grantId"),
            job_id=r.bytes32("jobId"),
            provider=r.address("provider"),
            validator=r.address("validator"),
            amount=r.uint("amount"),
            deadline=r.uint("deadline", MAX_UINT64),
        )

    def mismatches(self, grant_id: int, terms: FundingTerms) -> list[dict[str, object]]:
        """Where this spend departs from ``terms`` funded by ``grant_id``: ``{"field", "spend", "terms"}``."""
        want = Spend.for_terms(grant_id, terms).to_json()
        got = self.to_json()
        return [{"field": k, "spend": got[k], "terms": want[k]} for k in want if got[k] != want[k]]


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantFunding:
    """The ``funding`` of a grant-funded job: the grant, the agent's spend and its signature."""

    grant_id: int
    spend: Spend
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "type": FUNDING_TYPE,
            "grant": str(self.grant_id),
            "spend": self.spend.to_json(),
            "signature": "0x" + self.signature.hex(),
        }

    @classmethod
    def from_json(cls, doc: Any) -> GrantFunding:
        r = _Reader(doc, "funding", "invalid_funding", "funding")
        if doc.get("type", FUNDING_TYPE) != FUNDING_TYPE:
            raise r._fail("type", f'"{FUNDING_TYPE}"')
        grant_id = r.uint("grant")
        spend = Spend.from_json(doc.get("spend"))
        if spend.grant_id != grant_id:
            raise r._fail("spend", f"a spend from grant {grant_id} (spend.grantId is {spend.grant_id})")
        return cls(grant_id=grant_id, spend=spend, signature=r.signature("signature"))

    @property
    def r_s_v(self) -> bytes:
        """The 65-byte signature as ``fundFromGrant`` takes it (``v`` 27 or 28)."""
        sig = self.signature
        return sig[:64] + bytes([sig[64] if sig[64] >= 27 else sig[64] + 27])


def is_grant_funding(doc: Any) -> bool:
    """Whether a ``funding`` document is the grant form (it names a ``grant``), not an EIP-3009 one."""
    return isinstance(doc, Mapping) and ("grant" in doc or doc.get("type") == FUNDING_TYPE)


def spend_typed_data(*, chain_id: int, escrow: str, spend: Spend) -> dict[str, Any]:
    """The EIP-712 ``Spend`` an agent signs, under the escrow's domain."""
    return {
        "types": {"EIP712Domain": _DOMAIN_TYPE, "Spend": _SPEND_TYPE},
        "primaryType": "Spend",
        "domain": {
            "name": ESCROW_DOMAIN_NAME,
            "version": ESCROW_DOMAIN_VERSION,
            "chainId": chain_id,
            "verifyingContract": to_checksum_address(escrow),
        },
        "message": {
            "grantId": spend.grant_id,
            "jobId": spend.job_id,
            "provider": to_checksum_address(spend.provider),
            "validator": to_checksum_address(spend.validator),
            "amount": spend.amount,
            "deadline": spend.deadline,
        },
    }


def spend_digest(*, chain_id: int, escrow: str, spend: Spend) -> bytes:
    """The 32-byte EIP-712 digest of ``spend`` (what the escrow's ``spendDigest`` returns)."""
    from eth_account.messages import encode_typed_data

    message = encode_typed_data(full_message=spend_typed_data(chain_id=chain_id, escrow=escrow, spend=spend))
    return keccak(b"\x19" + message.version + message.header + message.body)


def sign_spend(agent: EthSigner, *, chain_id: int, escrow: str, spend: Spend) -> GrantFunding:
    """The agent's signed ``spend``, as the ``funding`` of a job submission."""
    signature = _sign(agent, spend_typed_data(chain_id=chain_id, escrow=escrow, spend=spend))
    return GrantFunding(grant_id=spend.grant_id, spend=spend, signature=signature)


def spend_signer(*, chain_id: int, escrow: str, funding: GrantFunding) -> str | None:
    """Who signed ``funding``'s spend (None if nobody recoverable)."""
    typed = spend_typed_data(chain_id=chain_id, escrow=escrow, spend=funding.spend)
    return _recover(typed, funding.signature)


def permit_typed_data(
    *,
    chain_id: int,
    token: str,
    token_name: str,
    owner: str,
    spender: str,
    value: int,
    nonce: int,
    deadline: int,
) -> dict[str, Any]:
    """The EIP-2612 ``Permit`` an owner signs so the escrow may pull ``value`` (USDC's domain, version 2)."""
    return {
        "types": {"EIP712Domain": _DOMAIN_TYPE, "Permit": _PERMIT_TYPE},
        "primaryType": "Permit",
        "domain": {
            "name": token_name,
            "version": USDC_DOMAIN_VERSION,
            "chainId": chain_id,
            "verifyingContract": to_checksum_address(token),
        },
        "message": {
            "owner": to_checksum_address(owner),
            "spender": to_checksum_address(spender),
            "value": value,
            "nonce": nonce,
            "deadline": deadline,
        },
    }


def sign_permit(owner: EthSigner, typed_data: dict[str, Any]) -> tuple[int, bytes, bytes]:
    """``(v, r, s)`` of the owner's permit."""
    sig = _sign(owner, typed_data)
    return (sig[64] if sig[64] >= 27 else sig[64] + 27), sig[:32], sig[32:64]


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """``HearthEscrow.grantOf(grantId)``: a grant as the chain reads it at some block."""

    grant_id: int
    owner: str
    agent: str
    per_job_max: int
    period_max: int
    period_seconds: int
    expiry: int
    revoked: bool
    spent_this_period: int
    left_this_period: int
    period_ends: int

    @classmethod
    def from_view(cls, grant_id: int, view: tuple[Any, ...] | list[Any]) -> Grant:
        owner, agent, per_job, period_max, seconds, expiry, revoked, spent, left, ends = view
        return cls(
            grant_id=grant_id,
            owner=to_checksum_address(owner),
            agent=to_checksum_address(agent),
            per_job_max=int(per_job),
            period_max=int(period_max),
            period_seconds=int(seconds),
            expiry=int(expiry),
            revoked=bool(revoked),
            spent_this_period=int(spent),
            left_this_period=int(left),
            period_ends=int(ends),
        )

    @property
    def exists(self) -> bool:
        return int(self.owner, 16) != 0

    def left(self) -> dict[str, Any]:
        """What is left of the grant: the details of every refusal that names it."""
        return {
            "grant": str(self.grant_id),
            "left_this_period": str(self.left_this_period),
            "per_job_max": str(self.per_job_max),
            "period_max": str(self.period_max),
            "period_ends": self.period_ends,
            "expiry": self.expiry,
            "revoked": self.revoked,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.left(),
            "owner": self.owner,
            "agent": self.agent,
            "period_seconds": self.period_seconds,
            "spent_this_period": str(self.spent_this_period),
        }


__all__ = [
    "FUNDING_TYPE",
    "MAX_UINT64",
    "MAX_UINT128",
    "Grant",
    "GrantFunding",
    "Spend",
    "is_grant_funding",
    "permit_typed_data",
    "sign_permit",
    "sign_spend",
    "spend_digest",
    "spend_signer",
    "spend_typed_data",
]
