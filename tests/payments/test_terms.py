"""payments.receipts.terms_mismatches: the one check of escrow terms against an envelope's payment, which
the requester (before signing an authorization) and the validator (before signing a receipt) both run."""

from __future__ import annotations

import dataclasses

import pytest
from eth_utils.address import to_checksum_address

from core.envelope import Payment
from payments.keys import new_ed25519, new_eth
from payments.receipts import FundingTerms, escrow_job_id, hex32, terms_mismatches

CHAIN_ID = 31337
ESCROW = to_checksum_address("0x" + "e" * 40)
PAYER = to_checksum_address("0x" + "a" * 40)
VALIDATOR = new_eth(CHAIN_ID)
JOB_ID = escrow_job_id("did:key:z6MkNode", "hj_1")


def _payment(**change: object) -> Payment:
    doc: dict[str, object] = {
        "max_price": "1.50",
        "chain_id": CHAIN_ID,
        "escrow": ESCROW,
        "payer": PAYER,
        "validator": VALIDATOR.did,
        **change,
    }
    return Payment.model_validate(doc)


def _terms(**change: object) -> FundingTerms:
    terms = FundingTerms(
        chain_id=CHAIN_ID,
        escrow=ESCROW,
        token=to_checksum_address("0x" + "7" * 40),
        token_name="USD Coin",
        job_id=JOB_ID,
        payer=PAYER,
        provider=to_checksum_address("0x" + "9" * 40),
        validator=VALIDATOR.address,
        amount=1_500_000,
        deadline=2_000_000_000,
    )
    return dataclasses.replace(terms, **change)


def test_terms_that_are_the_envelopes_have_no_mismatch() -> None:
    assert terms_mismatches(_terms(), _payment(), escrow_job_id=JOB_ID) == []
    # addresses compare in any case: the envelope may spell them in lower case
    lower = _payment(escrow=ESCROW.lower(), payer=PAYER.lower())
    assert terms_mismatches(_terms(), lower) == []


@pytest.mark.parametrize(
    ("field", "change", "terms", "expected"),
    [
        ("escrow", {"escrow": PAYER}, PAYER, ESCROW),
        ("payer", {"payer": ESCROW}, ESCROW, PAYER),
        ("validator", {"validator": PAYER}, PAYER, VALIDATOR.address),
    ],
)
def test_each_field_that_differs_is_one_row(
    field: str, change: dict[str, object], terms: object, expected: object
) -> None:
    assert terms_mismatches(_terms(**change), _payment()) == [
        {"field": field, "terms": terms, "expected": expected}
    ]


def test_another_chain_is_a_mismatch_and_so_is_the_validator_named_on_this_one() -> None:
    rows = terms_mismatches(_terms(chain_id=1), _payment())
    # the validator's did:pkh names chain 31337: on chain 1 it names no account the terms could hold
    assert rows == [
        {"field": "chain_id", "terms": 1, "expected": CHAIN_ID},
        {"field": "validator", "terms": VALIDATOR.address, "expected": VALIDATOR.did},
    ]


def test_the_amount_may_be_up_to_max_price_and_not_one_base_unit_over() -> None:
    assert terms_mismatches(_terms(amount=1_500_000), _payment()) == []
    assert terms_mismatches(_terms(amount=0), _payment()) == []
    assert terms_mismatches(_terms(amount=1_500_001), _payment()) == [
        {"field": "amount", "terms": "1.500001", "expected": "at most 1.50"}
    ]


def test_the_escrow_job_id_is_checked_only_when_given() -> None:
    other = escrow_job_id("did:key:z6MkNode", "hj_2")
    assert terms_mismatches(_terms(job_id=other), _payment()) == []
    assert terms_mismatches(_terms(job_id=other), _payment(), escrow_job_id=JOB_ID) == [
        {"field": "escrow_job_id", "terms": hex32(other), "expected": hex32(JOB_ID)}
    ]


def test_a_validator_that_cannot_sign_eip712_never_matches() -> None:
    ed = new_ed25519().did
    assert terms_mismatches(_terms(), _payment(validator=ed)) == [
        {"field": "validator", "terms": VALIDATOR.address, "expected": ed}
    ]
    elsewhere = new_eth(1)  # the same kind of DID, on another chain than the terms'
    rows = terms_mismatches(_terms(validator=elsewhere.address), _payment(validator=elsewhere.did))
    assert rows == [{"field": "validator", "terms": elsewhere.address, "expected": elsewhere.did}]


def test_every_mismatch_is_reported_at_once() -> None:
    terms = _terms(payer=ESCROW, amount=9_000_000, job_id=bytes(32))
    rows = terms_mismatches(terms, _payment(), escrow_job_id=JOB_ID)
    assert [r["field"] for r in rows] == ["payer", "amount", "escrow_job_id"]
