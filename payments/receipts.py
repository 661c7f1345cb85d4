"""The documents money moves on: funding terms, EIP-3009 funding authorizations and validator receipts.

One definition each, shared by the node (which checks them), the requester's tools (which sign the
authorization) and the validator's tools (which sign the receipt):

- :class:`FundingTerms` are what a quote asks the escrow to hold: escrow job id, provider, validator,
  amount and deadline. :func:`escrow_job_id` derives the 32-byte id from the node's DID and job id, so two
  nodes never share an escrow entry for one requester's ``job_id``.
- :class:`Authorization` is a payer's signed USDC ``ReceiveWithAuthorization`` for exactly those terms: its
  nonce is ``authorizationNonce(jobId, provider, validator, amount, deadline)``, so it pays for this job
  and nothing else, and the payer needs no gas.
- :class:`Receipt` is the validator's EIP-712 verdict ``{jobId, resultDigest, passed, amount, provider}``
  under the escrow's domain (name, version, chain id, contract address). :func:`result_digest` binds it
  to one result: ``sha256(JCS({"job", "artifact_cid", "artifact_sha256"}))``.

Every ``from_json`` refuses a malformed document with a structured error naming the field.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from core.envelope import Payment, canonical_json
from core.errors import Domain, FundingError, HearthError, SettlementError
from payments.did import parse_did_pkh
from payments.escrow_build import (
    authorization_nonce,
    receipt_typed_data,
    receive_authorization_typed_data,
    terms_hash,
)
from payments.keys import EthSigner

USDC_DECIMALS = 6
USDC_UNIT = 10**USDC_DECIMALS
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
_BYTES32_RE = re.compile(r"^0x[0-9a-fA-F]{64}$")
_SIGNATURE_RE = re.compile(r"^0x[0-9a-fA-F]{130}$")
_UINT_RE = re.compile(r"^(0|[1-9][0-9]{0,77})$")
_MAX_UINT256 = 2**256 - 1
_MAX_UINT64 = 2**64 - 1


# -- amounts and ids ---------------------------------------------------------------------------------------


def usdc_units(price: str) -> int:
    """A decimal USDC amount (``"1.82"``) in base units (``1820000``); ``ValueError`` unless exact.

    Exact: finite, not negative, at most 6 decimals, at most ``2**256 - 1`` base units. The conversion is
    integer arithmetic on the decimal's digits, so no decimal context can round (or underflow) an amount
    with more decimals into one that looks acceptable.
    """
    try:
        value = Decimal(price)
    except InvalidOperation:
        raise ValueError(f"not a decimal amount: {price!r}") from None
    sign, digits, exponent = value.as_tuple()
    coefficient = int("".join(map(str, digits)) or "0")
    inexact = ValueError(f"{price!r} is not a non-negative amount with at most {USDC_DECIMALS} decimals")
    if not isinstance(exponent, int) or (sign and coefficient):
        raise inexact  # NaN, sNaN, infinities, negatives (-0 is 0)
    shift = exponent + USDC_DECIMALS
    if coefficient == 0:
        return 0
    units: int
    if shift >= 0:
        if len(digits) + shift > len(str(_MAX_UINT256)):
            raise inexact  # far past uint256; refused before 10**shift is ever computed
        units = coefficient * 10**shift
    elif -shift > len(digits):
        raise inexact  # more decimals than digits: a non-zero fraction of a base unit
    else:
        units, rest = divmod(coefficient, 10**-shift)
        if rest:
            raise inexact
    if units > _MAX_UINT256:
        raise inexact
    return units


def usdc_str(units: int) -> str:
    """Base units as a plain decimal string: ``1820000`` -> ``"1.82"``; ``ValueError`` if negative."""
    if units < 0:
        raise ValueError(f"an amount is never negative, got {units} base units")
    whole, frac = divmod(int(units), USDC_UNIT)
    return f"{whole}.{frac:06d}".rstrip("0").rstrip(".") if frac else str(whole)


def escrow_job_id(node_did: str, job: str) -> bytes:
    """The escrow's ``bytes32`` job id for the node's job ``job``: ``keccak256("hearth:" did "\\n" job)``."""
    return keccak(f"hearth:{node_did}\n{job}".encode())


def result_digest(job: str, result: Mapping[str, Any]) -> bytes:
    """The 32 bytes a receipt signs for a result: its job, artifact CID and artifact sha256 (JCS, sha256).

    Raises :class:`SettlementError`-shaped ``HearthError`` (``result_incomplete``) if the result lacks them.
    """
    cid, sha = result.get("artifact_cid"), result.get("artifact_sha256")
    if not isinstance(cid, str) or not isinstance(sha, str):
        raise _bad("result_incomplete", "the result has no artifact_cid/artifact_sha256", "settlement")
    return hashlib.sha256(canonical_json({"job": job, "artifact_cid": cid, "artifact_sha256": sha})).digest()


def hex32(value: bytes) -> str:
    return "0x" + value.hex()


# -- parsing helpers ---------------------------------------------------------------------------------------


def _bad(code: str, message: str, domain: Domain, **details: Any) -> HearthError:
    """A refusal of a funding or settlement document: the error of its domain."""
    if domain == "funding":
        return FundingError(code, message, domain=domain, details=details)
    return SettlementError(code, message, domain=domain, details=details)


class _Reader:
    """Reads typed fields of one JSON object, refusing the first bad one with ``code`` in ``domain``."""

    def __init__(self, doc: Any, what: str, code: str, domain: Domain) -> None:
        if not isinstance(doc, Mapping):
            raise _bad(code, f"the {what} must be a JSON object", domain)
        self.doc, self.what, self.code, self.domain = doc, what, code, domain

    def _fail(self, name: str, expected: str) -> HearthError:
        return _bad(
            self.code, f"{self.what}.{name} must be {expected}", self.domain, field=name, expected=expected
        )

    def address(self, name: str) -> str:
        value = self.doc.get(name)
        if not isinstance(value, str) or not _ADDRESS_RE.match(value):
            raise self._fail(name, "a 0x-prefixed 20-byte address")
        return to_checksum_address(value)

    def bytes32(self, name: str) -> bytes:
        value = self.doc.get(name)
        if not isinstance(value, str) or not _BYTES32_RE.match(value):
            raise self._fail(name, "0x and 64 hex digits")
        return bytes.fromhex(value[2:])

    def signature(self, name: str) -> bytes:
        value = self.doc.get(name)
        if not isinstance(value, str) or not _SIGNATURE_RE.match(value):
            raise self._fail(name, "a 65-byte signature, 0x and 130 hex digits")
        return bytes.fromhex(value[2:])

    def uint(self, name: str, maximum: int = _MAX_UINT256) -> int:
        value = self.doc.get(name)
        # amounts travel as decimal strings (JSON numbers lose precision past 2^53); small ints may be numbers
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53:
            return value
        if not isinstance(value, str) or not _UINT_RE.match(value) or int(value) > maximum:
            raise self._fail(name, f"an unsigned integer (decimal string) up to {maximum}")
        return int(value)

    def boolean(self, name: str) -> bool:
        value = self.doc.get(name)
        if not isinstance(value, bool):
            raise self._fail(name, "true or false")
        return value

    def text(self, name: str, max_length: int = 256) -> str:
        value = self.doc.get(name)
        if not isinstance(value, str) or not 0 < len(value) <= max_length:
            raise self._fail(name, f"a string of 1 to {max_length} characters")
        return value


def _recover(typed_data: dict[str, Any], signature: bytes) -> str | None:
    """The address that signed ``typed_data``, or None if the signature does not recover at all."""
    from eth_account import Account  # a third of a second to import: only nodes that take payments pay it
    from eth_account.messages import encode_typed_data

    try:
        return str(Account.recover_message(encode_typed_data(full_message=typed_data), signature=signature))
    except Exception:  # malformed r/s/v: eth-keys raises several types; any of them means "no signer"
        return None


def _sign(signer: EthSigner, typed_data: dict[str, Any]) -> bytes:
    from eth_account import Account

    signed = Account.sign_typed_data(signer.private_key_bytes(), full_message=typed_data)
    return bytes(signed.signature)


# -- funding terms -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FundingTerms:
    """What the escrow must hold before the node works: set by the quote, checked on chain."""

    chain_id: int
    escrow: str
    token: str
    token_name: str
    job_id: bytes
    payer: str
    provider: str
    validator: str
    amount: int
    deadline: int

    def to_json(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "escrow": self.escrow,
            "token": self.token,
            "token_name": self.token_name,
            "escrow_job_id": hex32(self.job_id),
            "payer": self.payer,
            "provider": self.provider,
            "validator": self.validator,
            "amount": str(self.amount),
            "amount_usdc": usdc_str(self.amount),
            "deadline": self.deadline,
        }

    @classmethod
    def from_json(cls, doc: Any) -> FundingTerms:
        r = _Reader(doc, "funding_terms", "invalid_funding_terms", "funding")
        return cls(
            chain_id=r.uint("chain_id", 2**53),
            escrow=r.address("escrow"),
            token=r.address("token"),
            token_name=r.text("token_name"),
            job_id=r.bytes32("escrow_job_id"),
            payer=r.address("payer"),
            provider=r.address("provider"),
            validator=r.address("validator"),
            amount=r.uint("amount"),
            deadline=r.uint("deadline", _MAX_UINT64),
        )

    @property
    def entry(self) -> tuple[str, str, str, int, int]:
        """The terms as the escrow's ``release`` and ``refund`` take them back."""
        return (self.payer, self.provider, self.validator, self.amount, self.deadline)

    @property
    def terms_hash(self) -> bytes:
        """The hash the escrow's entry must hold for these terms (``HearthEscrow.termsHash``)."""
        return terms_hash(*self.entry)

    @property
    def nonce(self) -> bytes:
        """The EIP-3009 nonce binding an authorization to these terms (as the escrow computes it)."""
        return authorization_nonce(self.job_id, self.provider, self.validator, self.amount, self.deadline)


def terms_mismatches(
    terms: FundingTerms, payment: Payment, *, escrow_job_id: bytes | None = None
) -> list[dict[str, object]]:
    """Where escrow ``terms`` depart from an envelope's ``payment``: one ``{"field", "terms", "expected"}``
    row per field, empty when the terms are the ones the envelope agreed to.

    ``chain_id``, ``escrow`` and ``payer`` must be the envelope's (addresses in any case); ``validator``
    must be the account of the envelope's ``did:pkh`` validator, on the terms' chain (any other DID can
    sign no receipt, so it never matches); ``amount`` must be at most the envelope's ``max_price`` in
    base units. With ``escrow_job_id``, the terms' escrow job id must be it too.
    """
    rows: list[dict[str, object]] = []

    def differ(field: str, got: object, want: object) -> None:
        rows.append({"field": field, "terms": got, "expected": want})

    if terms.chain_id != payment.chain_id:
        differ("chain_id", terms.chain_id, payment.chain_id)
    if terms.escrow.lower() != payment.escrow.lower():
        differ("escrow", terms.escrow, payment.escrow)
    if terms.payer.lower() != payment.payer.lower():
        differ("payer", terms.payer, payment.payer)
    if terms.validator.lower() != str(_validator_account(payment.validator, terms.chain_id)).lower():
        differ("validator", terms.validator, _validator_account(payment.validator, terms.chain_id))
    if terms.amount > usdc_units(payment.max_price):
        differ("amount", usdc_str(terms.amount), f"at most {payment.max_price}")
    if escrow_job_id is not None and terms.job_id != escrow_job_id:
        differ("escrow_job_id", hex32(terms.job_id), hex32(escrow_job_id))
    return rows


def _validator_account(did: str, chain_id: int) -> str:
    """The account a ``did:pkh`` validator on ``chain_id`` signs with; the DID itself for any other DID
    (no address equals it, so terms naming an account never match one that cannot sign EIP-712).
    """
    if not did.startswith("did:pkh:"):
        return did
    try:
        chain, account = parse_did_pkh(did)
    except HearthError:
        return did
    return account if chain == chain_id else did


# -- EIP-3009 authorization --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Authorization:
    """A payer's ``ReceiveWithAuthorization`` signature letting the escrow pull one job's amount."""

    payer: str
    valid_after: int
    valid_before: int
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "eip3009",
            "from": self.payer,
            "valid_after": str(self.valid_after),
            "valid_before": str(self.valid_before),
            "signature": "0x" + self.signature.hex(),
        }

    @classmethod
    def from_json(cls, doc: Any) -> Authorization:
        r = _Reader(doc, "funding", "invalid_funding", "funding")
        if doc.get("type", "eip3009") != "eip3009":
            raise r._fail("type", '"eip3009"')
        return cls(
            payer=r.address("from"),
            valid_after=r.uint("valid_after"),
            valid_before=r.uint("valid_before"),
            signature=r.signature("signature"),
        )

    @property
    def vrs(self) -> tuple[int, bytes, bytes]:
        """``(v, r, s)`` as ``fundWithAuthorization`` takes them."""
        sig = self.signature
        v = sig[64] if sig[64] >= 27 else sig[64] + 27
        return v, sig[:32], sig[32:64]


def authorization_typed_data(terms: FundingTerms, valid_after: int, valid_before: int) -> dict[str, Any]:
    return receive_authorization_typed_data(
        chain_id=terms.chain_id,
        token=terms.token,
        token_name=terms.token_name,
        payer=terms.payer,
        escrow=terms.escrow,
        amount=terms.amount,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=terms.nonce,
    )


def sign_authorization(
    payer: EthSigner, terms: FundingTerms, *, valid_after: int = 0, valid_before: int | None = None
) -> Authorization:
    """The payer's authorization for ``terms``; valid until the escrow deadline unless told otherwise."""
    if payer.address != terms.payer:
        raise _bad(
            "payer_mismatch",
            f"the wallet {payer.address} is not the envelope's payer {terms.payer}",
            "funding",
            wallet=payer.address,
            payer=terms.payer,
        )
    before = terms.deadline if valid_before is None else valid_before
    signature = _sign(payer, authorization_typed_data(terms, valid_after, before))
    return Authorization(
        payer=payer.address, valid_after=valid_after, valid_before=before, signature=signature
    )


def authorization_signer(terms: FundingTerms, auth: Authorization) -> str | None:
    """Who signed ``auth`` for ``terms`` (None if nobody recoverable)."""
    return _recover(authorization_typed_data(terms, auth.valid_after, auth.valid_before), auth.signature)


# -- validator receipt -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """A validator's verdict on one job's result, as the escrow's ``release``/``refund`` check it."""

    job: str
    chain_id: int
    escrow: str
    escrow_job_id: bytes
    result_digest: bytes
    passed: bool
    amount: int
    provider: str

    def typed_data(self) -> dict[str, Any]:
        return receipt_typed_data(
            chain_id=self.chain_id,
            escrow=self.escrow,
            job_id=self.escrow_job_id,
            result_digest=self.result_digest,
            passed=self.passed,
            amount=self.amount,
            provider=self.provider,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "chain_id": self.chain_id,
            "escrow": self.escrow,
            "escrow_job_id": hex32(self.escrow_job_id),
            "result_digest": hex32(self.result_digest),
            "passed": self.passed,
            "amount": str(self.amount),
            "provider": self.provider,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Receipt:
        r = _Reader(doc, "receipt", "invalid_receipt", "settlement")
        return cls(
            job=r.text("job", 128),
            chain_id=r.uint("chain_id", 2**53),
            escrow=r.address("escrow"),
            escrow_job_id=r.bytes32("escrow_job_id"),
            result_digest=r.bytes32("result_digest"),
            passed=r.boolean("passed"),
            amount=r.uint("amount"),
            provider=r.address("provider"),
        )


def sign_receipt(validator: EthSigner, receipt: Receipt) -> bytes:
    """The validator's 65-byte EIP-712 signature of ``receipt``."""
    if not receipt.passed and receipt.amount != 0:
        raise ValueError("a failing receipt carries amount 0")
    return _sign(validator, receipt.typed_data())


def receipt_signer(receipt: Receipt, signature: bytes) -> str | None:
    """Who signed ``receipt`` (None if nobody recoverable)."""
    return _recover(receipt.typed_data(), signature)
