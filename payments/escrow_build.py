"""The escrow contracts' committed build and the typed data their signers sign.

``payments/contracts/artifacts/<Name>.json`` holds each contract's ABI and bytecode as
``payments/contracts/compile.mjs`` wrote them; :func:`load_artifact` reads one. The typed-data builders
give the EIP-712 messages a validator signs for ``HearthEscrow.release``/``refund`` and a payer signs for
``HearthEscrow.fundWithAuthorization`` (USDC's EIP-3009 ``ReceiveWithAuthorization``), in the shape
``eth_account.Account.sign_typed_data(full_message=...)`` takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_abi.abi import encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from core.errors import ConfigError

ARTIFACTS_DIR = Path(__file__).resolve().parent / "contracts" / "artifacts"
ESCROW_DOMAIN_NAME = "HearthEscrow"
ESCROW_DOMAIN_VERSION = "1"
# USDC (FiatToken v2) signs its EIP-712 messages under version "2"; TestUSDC does the same.
USDC_DOMAIN_VERSION = "2"

_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
_RECEIPT_TYPE = [
    {"name": "jobId", "type": "bytes32"},
    {"name": "resultDigest", "type": "bytes32"},
    {"name": "passed", "type": "bool"},
    {"name": "amount", "type": "uint256"},
    {"name": "provider", "type": "address"},
]
_RECEIVE_TYPE = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """One compiled contract: its ABI, creation and runtime bytecode (0x-hex) and its compiler version."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    deployed_bytecode: str
    compiler_version: str


def load_artifact(name: str, artifacts_dir: Path = ARTIFACTS_DIR) -> Artifact:
    """The committed build of contract ``name``; :class:`ConfigError` if it is missing or unreadable."""
    path = artifacts_dir / f"{name}.json"
    try:
        raw = json.loads(path.read_text())
        return Artifact(
            name=raw["contractName"],
            abi=raw["abi"],
            bytecode=raw["bytecode"],
            deployed_bytecode=raw["deployedBytecode"],
            compiler_version=raw["compiler"]["version"],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            "contract_artifact_unreadable",
            f"cannot read the build of {name} at {path}: {exc}",
            details={"contract": name, "path": str(path)},
        ) from exc


def authorization_nonce(job_id: bytes, provider: str, validator: str, amount: int, deadline: int) -> bytes:
    """The EIP-3009 nonce binding a payer's authorization to one job's terms, as the escrow computes it."""
    return keccak(
        encode(
            ["bytes32", "address", "address", "uint256", "uint64"],
            [job_id, provider, validator, amount, deadline],
        )
    )


def terms_hash(payer: str, provider: str, validator: str, amount: int, deadline: int) -> bytes:
    """The hash the escrow keeps of a job's terms (``HearthEscrow.termsHash``): keccak256 of their ABI
    encoding with the last byte zeroed (the escrow's entry keeps the job's status there)."""
    digest = keccak(
        encode(
            ["address", "address", "address", "uint256", "uint64"],
            [payer, provider, validator, amount, deadline],
        )
    )
    return digest[:31] + b"\x00"


def receipt_typed_data(
    *,
    chain_id: int,
    escrow: str,
    job_id: bytes,
    result_digest: bytes,
    passed: bool,
    amount: int,
    provider: str,
) -> dict[str, Any]:
    """The EIP-712 ``Receipt`` a validator signs; a failing one (``passed=False``) carries ``amount=0``."""
    return {
        "types": {"EIP712Domain": _DOMAIN_TYPE, "Receipt": _RECEIPT_TYPE},
        "primaryType": "Receipt",
        "domain": _domain(ESCROW_DOMAIN_NAME, ESCROW_DOMAIN_VERSION, chain_id, escrow),
        "message": {
            "jobId": job_id,
            "resultDigest": result_digest,
            "passed": passed,
            "amount": amount,
            "provider": to_checksum_address(provider),
        },
    }


def receive_authorization_typed_data(
    *,
    chain_id: int,
    token: str,
    token_name: str,
    payer: str,
    escrow: str,
    amount: int,
    valid_after: int,
    valid_before: int,
    nonce: bytes,
) -> dict[str, Any]:
    """The EIP-3009 ``ReceiveWithAuthorization`` a payer signs so the escrow can pull ``amount`` for a job."""
    return {
        "types": {"EIP712Domain": _DOMAIN_TYPE, "ReceiveWithAuthorization": _RECEIVE_TYPE},
        "primaryType": "ReceiveWithAuthorization",
        "domain": _domain(token_name, USDC_DOMAIN_VERSION, chain_id, token),
        "message": {
            "from": to_checksum_address(payer),
            "to": to_checksum_address(escrow),
            "value": amount,
            "validAfter": valid_after,
            "validBefore": valid_before,
            "nonce": nonce,
        },
    }


def _domain(name: str, version: str, chain_id: int, contract: str) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "chainId": chain_id,
        "verifyingContract": to_checksum_address(contract),
    }
