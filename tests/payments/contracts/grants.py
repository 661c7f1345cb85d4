"""Spending grants in tests: the typed data an agent and an owner sign, and opening a grant on anvil."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3.contract import Contract

from payments.escrow_build import ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, USDC_DOMAIN_VERSION
from tests.payments.contracts.chain import CHAIN_ID, Chain, events

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


def _domain(name: str, version: str, contract: str, chain_id: int) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "chainId": chain_id,
        "verifyingContract": to_checksum_address(contract),
    }


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
    """The EIP-712 ``Spend`` a grant's agent signs to fund one job (the escrow's own domain)."""
    return {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"},
            ],
            "Spend": _SPEND_TYPE,
        },
        "primaryType": "Spend",
        "domain": _domain(ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, escrow, chain_id),
        "message": {
            "grantId": grant_id,
            "jobId": job_id,
            "provider": to_checksum_address(provider),
            "validator": to_checksum_address(validator),
            "amount": amount,
            "deadline": deadline,
        },
    }


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
    nonce = token.functions.nonces(owner.address).call()
    signed = owner.sign_typed_data(
        _domain(token_name, USDC_DOMAIN_VERSION, token.address, chain_id),
        {"Permit": _PERMIT_TYPE},
        {"owner": owner.address, "spender": spender, "value": value, "nonce": nonce, "deadline": deadline},
    )
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
