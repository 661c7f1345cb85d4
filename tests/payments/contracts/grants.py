"""Spending grants in tests: the typed data an agent and an owner sign, and opening a grant on anvil."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3.contract import Contract

from payments import grants
from payments.grants import Spend
from tests.payments.contracts.chain import CHAIN_ID, Chain, events


def spend_typed_data(
    *,
    escrow: str,
    grant_id: int,
    job_id: bytes,
    provider: str,
    validator: str,
    amount: int,
    deadline: int,
    chain_id: int = CHAIN_ID,
) -> dict[str, Any]:
    """The EIP-712 ``Spend`` a grant's agent signs to fund one job (the escrow's own domain), as the
    node's :func:`payments.grants.spend_typed_data` builds it; the tests check it against ``spendDigest``."""
    spend = Spend(
        grant_id=grant_id,
        job_id=job_id,
        provider=provider,
        validator=validator,
        amount=amount,
        deadline=deadline,
    )
    return grants.spend_typed_data(chain_id=chain_id, escrow=escrow, spend=spend)


def sign_spend(agent: LocalAccount, **fields: Any) -> bytes:
    """``agent``'s 65-byte signature of the ``Spend`` built by :func:`spend_typed_data` from ``fields``."""
    return bytes(agent.sign_typed_data(full_message=spend_typed_data(**fields)).signature)


def typed_data_digest(data: dict[str, Any]) -> bytes:
    """The EIP-712 digest eth-account signs for ``data`` (0x19 0x01 || domain separator || struct hash)."""
    message = encode_typed_data(full_message=data)
    return keccak(b"\x19" + message.version + message.header + message.body)


def sign_permit(
    owner: LocalAccount,
    *,
    token: Contract,
    token_name: str,
    spender: str,
    value: int,
    deadline: int,
    chain_id: int = CHAIN_ID,
) -> tuple[int, bytes, bytes]:
    """``owner``'s EIP-2612 permit for ``spender`` on ``token`` (USDC's domain version "2"), as (v, r, s)."""
    typed = grants.permit_typed_data(
        chain_id=chain_id,
        token=token.address,
        token_name=token_name,
        owner=owner.address,
        spender=spender,
        value=value,
        nonce=token.functions.nonces(owner.address).call(),
        deadline=deadline,
    )
    signed = owner.sign_typed_data(full_message=typed)
    return signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")


@dataclass(frozen=True)
class GrantTerms:
    """What an owner grants an agent: caps in token base units, the period length and the expiry."""

    agent: LocalAccount
    per_job_max: int
    period_max: int
    period_seconds: int
    expiry: int

    @property
    def args(self) -> tuple[str, int, int, int, int]:
        return (self.agent.address, self.per_job_max, self.period_max, self.period_seconds, self.expiry)


def open_grant(chain: Chain, escrow: Contract, owner: str, terms: GrantTerms) -> tuple[int, int]:
    """Opens a grant from ``owner``; returns its id (from its ``GrantOpened`` event) and its opening time."""
    receipt = chain.transact(escrow.functions.openGrant(*terms.args), owner)
    (event,) = events(escrow, "GrantOpened", receipt)
    return int(event["grantId"]), chain.block_time(receipt)
