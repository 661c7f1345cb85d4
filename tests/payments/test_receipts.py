"""The documents money moves on: amounts, escrow ids, funding terms, authorizations and receipts.

Signatures are checked both ways (sign, recover) and against the escrow contract itself on anvil: the
authorization nonce and the receipt digest Python computes are the ones ``HearthEscrow`` computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account.messages import encode_typed_data
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from hypothesis import given
from hypothesis import strategies as st
from web3.contract import Contract

from core.envelope import canonical_json
from core.errors import HearthError
from node.http_errors import status_of
from payments.devnet import TOKEN_NAME
from payments.escrow_build import authorization_nonce
from payments.keys import EthSigner
from payments.receipts import (
    Authorization,
    FundingTerms,
    Receipt,
    authorization_signer,
    escrow_job_id,
    receipt_signer,
    result_digest,
    sign_authorization,
    sign_receipt,
    usdc_str,
    usdc_units,
)
from tests.payments.contracts.chain import CHAIN_ID, Chain, anvil

MAX_UINT256 = 2**256 - 1
NODE_DID = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
# Fixed keys: a failing run shows the same addresses every time.
VALIDATOR = EthSigner(hashlib.sha256(b"hearth test validator").digest(), CHAIN_ID)
PAYER = EthSigner(hashlib.sha256(b"hearth test payer").digest(), CHAIN_ID)
PROVIDER = to_checksum_address("0x" + "9" * 40)
ESCROW = to_checksum_address("0x" + "e" * 40)
TOKEN = to_checksum_address("0x" + "7" * 40)
RESULT = {
    "artifact_cid": "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq",
    "artifact_sha256": "ab" * 32,
}


def _terms(**changes: Any) -> FundingTerms:
    terms = FundingTerms(
        chain_id=CHAIN_ID,
        escrow=ESCROW,
        token=TOKEN,
        token_name=TOKEN_NAME,
        job_id=escrow_job_id(NODE_DID, "hj_test"),
        payer=PAYER.address,
        provider=PROVIDER,
        validator=VALIDATOR.address,
        amount=2_500_000,
        deadline=1_900_000_000,
    )
    return dataclasses.replace(terms, **changes)


def _receipt(**changes: Any) -> Receipt:
    receipt = Receipt(
        job="hj_test",
        chain_id=CHAIN_ID,
        escrow=ESCROW,
        escrow_job_id=escrow_job_id(NODE_DID, "hj_test"),
        result_digest=result_digest("hj_test", RESULT),
        passed=True,
        amount=1_820_000,
        provider=PROVIDER,
    )
    return dataclasses.replace(receipt, **changes)


def _eip712_digest(typed_data: dict[str, Any]) -> bytes:
    message = encode_typed_data(full_message=typed_data)
    return keccak(b"\x19" + message.version + message.header + message.body)


# -- amounts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "units"),
    [
        ("0", 0),
        ("-0", 0),
        ("0.000000", 0),
        ("0.000001", 1),
        ("0.0000010", 1),  # a trailing zero past the sixth decimal is still exact
        ("1.82", 1_820_000),
        ("1E-6", 1),
        ("1e2", 100_000_000),
        ("12345678901234567890.123456", 12345678901234567890123456),
    ],
)
def test_usdc_units_converts_exact_amounts(price: str, units: int) -> None:
    assert usdc_units(price) == units


@pytest.mark.parametrize(
    "price",
    [
        "",
        "abc",
        "1.0000001",  # a seventh decimal
        "-1",
        "-0.000001",
        "NaN",
        "sNaN",  # a signalling NaN must be refused, not raise decimal.InvalidOperation
        "Infinity",
        "1e999999",  # past uint256, and past the decimal context's exponent range
        "1e-999999999",  # would underflow to 0 in decimal arithmetic
        "12345678901234567890123.4567891",  # 30 digits: decimal's 28-digit context would round it
        usdc_str(MAX_UINT256) + "1",
    ],
)
def test_usdc_units_refuses_what_is_not_an_exact_non_negative_amount(price: str) -> None:
    with pytest.raises(ValueError):
        usdc_units(price)


@pytest.mark.parametrize(
    ("units", "text"),
    [(0, "0"), (1, "0.000001"), (10, "0.00001"), (1_000_000, "1"), (1_820_000, "1.82"), (10_500_000, "10.5")],
)
def test_usdc_str_writes_the_shortest_plain_decimal(units: int, text: str) -> None:
    assert usdc_str(units) == text


def test_usdc_str_refuses_a_negative_amount() -> None:
    with pytest.raises(ValueError):
        usdc_str(-1)


@given(st.integers(min_value=0, max_value=MAX_UINT256))
def test_usdc_units_and_usdc_str_round_trip_every_uint256(units: int) -> None:
    assert usdc_units(usdc_str(units)) == units


def test_the_largest_amount_is_uint256_max_base_units() -> None:
    assert usdc_units(usdc_str(MAX_UINT256)) == MAX_UINT256
    with pytest.raises(ValueError):
        usdc_units(usdc_str(MAX_UINT256 + 1))


# -- ids and digests ---------------------------------------------------------------------------------------


def test_escrow_job_id_binds_the_node_and_the_job() -> None:
    assert escrow_job_id(NODE_DID, "hj_a") == keccak(f"hearth:{NODE_DID}\nhj_a".encode())
    assert escrow_job_id(NODE_DID, "hj_a") != escrow_job_id(NODE_DID, "hj_b")
    assert escrow_job_id(NODE_DID, "hj_a") != escrow_job_id(NODE_DID + "x", "hj_a")


def test_result_digest_is_sha256_of_the_jcs_of_job_cid_and_sha256() -> None:
    expected = hashlib.sha256(canonical_json({"job": "hj_test", **RESULT})).digest()
    assert result_digest("hj_test", {**RESULT, "cost": "1.0", "checks": {}}) == expected
    assert result_digest("hj_other", RESULT) != expected
    assert result_digest("hj_test", {**RESULT, "artifact_sha256": "cd" * 32}) != expected


@pytest.mark.parametrize("missing", ["artifact_cid", "artifact_sha256"])
def test_result_digest_refuses_a_result_without_its_artifact(missing: str) -> None:
    with pytest.raises(HearthError) as info:
        result_digest("hj_test", {k: v for k, v in RESULT.items() if k != missing})
    assert info.value.code == "result_incomplete" and info.value.domain == "settlement"


# -- funding terms and authorizations ----------------------------------------------------------------------


def test_funding_terms_round_trip_through_json() -> None:
    terms = _terms()
    doc = terms.to_json()
    assert doc["amount"] == "2500000" and doc["amount_usdc"] == "2.5"
    assert FundingTerms.from_json(doc) == terms


def test_the_nonce_is_the_abi_encoding_of_the_terms_hashed() -> None:
    terms = _terms()
    words = (
        terms.job_id
        + bytes.fromhex(terms.provider[2:]).rjust(32, b"\0")
        + bytes.fromhex(terms.validator[2:]).rjust(32, b"\0")
        + terms.amount.to_bytes(32, "big")
        + terms.deadline.to_bytes(32, "big")
    )
    assert terms.nonce == keccak(words)
    assert terms.nonce == authorization_nonce(
        terms.job_id, terms.provider, terms.validator, terms.amount, terms.deadline
    )
    assert _terms(amount=terms.amount + 1).nonce != terms.nonce


def test_an_authorization_recovers_to_its_payer_and_only_for_its_terms() -> None:
    terms = _terms()
    auth = sign_authorization(PAYER, terms, valid_after=5)
    assert auth.valid_before == terms.deadline
    assert authorization_signer(terms, auth) == PAYER.address
    assert Authorization.from_json(auth.to_json()) == auth
    assert authorization_signer(_terms(amount=terms.amount + 1), auth) != PAYER.address
    v, r, s = auth.vrs
    assert v in (27, 28) and r + s == auth.signature[:64]


def test_a_wallet_that_is_not_the_payer_cannot_sign_the_authorization() -> None:
    with pytest.raises(HearthError) as info:
        sign_authorization(VALIDATOR, _terms())
    assert info.value.code == "payer_mismatch" and info.value.domain == "funding"


# -- receipts ----------------------------------------------------------------------------------------------


def test_a_receipt_recovers_to_its_validator_and_survives_json() -> None:
    receipt = _receipt()
    signature = sign_receipt(VALIDATOR, receipt)
    assert len(signature) == 65
    assert receipt_signer(receipt, signature) == VALIDATOR.address
    again = Receipt.from_json(receipt.to_json())
    assert receipt_signer(again, signature) == VALIDATOR.address


@pytest.mark.parametrize(
    "change",
    [
        {"chain_id": CHAIN_ID + 1},
        {"escrow": "0x" + "f" * 40},
        {"amount": 1_820_001},
        {"provider": "0x" + "8" * 40},
        {"escrow_job_id": escrow_job_id(NODE_DID, "hj_other")},
        {"result_digest": bytes(32)},
        {"passed": False, "amount": 0},
    ],
    ids=lambda change: "+".join(change),
)
def test_a_receipt_signed_for_other_terms_recovers_to_someone_else(change: dict[str, Any]) -> None:
    signature = sign_receipt(VALIDATOR, _receipt())
    other = receipt_signer(_receipt(**change), signature)
    assert other is not None and other != VALIDATOR.address


def test_a_failing_receipt_carries_amount_zero() -> None:
    with pytest.raises(ValueError):
        sign_receipt(VALIDATOR, _receipt(passed=False, amount=1))
    failing = _receipt(passed=False, amount=0)
    assert receipt_signer(failing, sign_receipt(VALIDATOR, failing)) == VALIDATOR.address


@pytest.mark.parametrize("signature", [b"", bytes(65), b"\xff" * 65, b"\x01" * 64 + b"\x1b"])
def test_a_malformed_signature_recovers_to_nobody_or_a_stranger(signature: bytes) -> None:
    assert receipt_signer(_receipt(), signature) != VALIDATOR.address


# -- every from_json refusal names its field ---------------------------------------------------------------


def _refusals(cls: type, doc: dict[str, Any], bad: dict[str, list[Any]]) -> list[Any]:
    return [
        pytest.param(cls, doc, field, value, id=f"{cls.__name__}.{field}={value!r}"[:80])
        for field, values in bad.items()
        for value in values
    ]


ADDRESS_BAD = [None, "0x123", "9" * 42, 7]
BYTES32_BAD = [None, "0x" + "0" * 63, "0x" + "g" * 64]
UINT_BAD = [None, -1, "1.5", "01", True, str(2**256)]
REFUSALS = [
    *_refusals(
        FundingTerms,
        _terms().to_json(),
        {
            "chain_id": [None, 0.5, str(2**53 + 1)],
            "escrow": ADDRESS_BAD,
            "token": ADDRESS_BAD,
            "token_name": [None, "", "x" * 257],
            "escrow_job_id": BYTES32_BAD,
            "payer": ADDRESS_BAD,
            "provider": ADDRESS_BAD,
            "validator": ADDRESS_BAD,
            "amount": UINT_BAD,
            "deadline": [None, str(2**64)],
        },
    ),
    *_refusals(
        Receipt,
        _receipt().to_json(),
        {
            "job": [None, "", "x" * 129],
            "chain_id": [None, "x"],
            "escrow": ADDRESS_BAD,
            "escrow_job_id": BYTES32_BAD,
            "result_digest": BYTES32_BAD,
            "passed": [None, "true", 1],
            "amount": UINT_BAD,
            "provider": ADDRESS_BAD,
        },
    ),
    *_refusals(
        Authorization,
        sign_authorization(PAYER, _terms()).to_json(),
        {
            "type": ["eip2612"],
            "from": ADDRESS_BAD,
            "valid_after": UINT_BAD,
            "valid_before": UINT_BAD,
            "signature": [None, "0x" + "00" * 64, "0x" + "zz" * 65],
        },
    ),
]
EXPECTED = {
    FundingTerms: ("invalid_funding_terms", "funding"),
    Receipt: ("invalid_receipt", "settlement"),
    Authorization: ("invalid_funding", "funding"),
}


@pytest.mark.parametrize(("cls", "doc", "field", "value"), REFUSALS)
def test_from_json_refuses_a_bad_field_by_name(cls: Any, doc: dict[str, Any], field: str, value: Any) -> None:
    bad = {k: v for k, v in doc.items() if k != field} if value is None else {**doc, field: value}
    with pytest.raises(HearthError) as info:
        cls.from_json(bad)
    code, domain = EXPECTED[cls]
    assert (info.value.code, info.value.domain, status_of(info.value)) == (code, domain, 422)
    assert info.value.details["field"] == field
    assert field in info.value.message


@pytest.mark.parametrize("cls", [FundingTerms, Receipt, Authorization])
def test_from_json_refuses_what_is_not_an_object(cls: Any) -> None:
    with pytest.raises(HearthError) as info:
        cls.from_json(["not", "an", "object"])
    assert info.value.code == EXPECTED[cls][0]


# -- the escrow contract agrees ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def escrow() -> Iterator[Contract]:
    with anvil() as chain:
        yield _deploy(chain)


def _deploy(chain: Chain) -> Contract:
    usdc = chain.deploy("TestUSDC", TOKEN_NAME, chain.deployer)
    return chain.deploy("HearthEscrow", usdc.address)


def test_the_escrow_computes_the_same_authorization_nonce(escrow: Contract) -> None:
    terms = _terms()
    on_chain = escrow.functions.authorizationNonce(
        terms.job_id, terms.provider, terms.validator, terms.amount, terms.deadline
    ).call()
    assert bytes(on_chain) == terms.nonce


@pytest.mark.parametrize("passed", [True, False])
def test_the_escrow_computes_the_same_receipt_digest(escrow: Contract, passed: bool) -> None:
    receipt = _receipt(escrow=escrow.address, passed=passed, amount=1_820_000 if passed else 0)
    on_chain = escrow.functions.receiptDigest(
        receipt.escrow_job_id, receipt.result_digest, receipt.passed, receipt.amount, receipt.provider
    ).call()
    assert bytes(on_chain) == _eip712_digest(receipt.typed_data())
    assert _eip712_digest(dataclasses.replace(receipt, chain_id=1).typed_data()) != bytes(on_chain)
