"""Spending grants' documents: the agent's Spend and the grant funding of a job, the grant's limits as
the node applies them before it accepts a job, and the owner's grant terms.

Every field of ``funding`` is attacked (wrong types, huge integers, missing keys, booleans, negatives); the
Spend is signed and recovered both ways, and its EIP-712 digest is the escrow's own ``spendDigest`` on anvil.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from eth_abi.abi import encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3.contract import Contract

from cli.common import usage
from cli.grant import agent_address, duration
from core.errors import FundingError, HearthError
from node.http_errors import status_of
from payments.devnet import TOKEN_NAME
from payments.grant_owner import GrantTerms
from payments.grant_terms import GRANT_MARGIN_SECONDS, check_grant_limits
from payments.grants import (
    Grant,
    GrantFunding,
    Spend,
    is_grant_funding,
    sign_spend,
    spend_digest,
    spend_signer,
    spend_typed_data,
)
from payments.keys import EthSigner
from payments.receipts import FundingTerms, escrow_job_id
from tests.payments.contracts.chain import CHAIN_ID, anvil

AGENT = EthSigner(hashlib.sha256(b"hearth test agent").digest(), CHAIN_ID)
STRANGER = EthSigner(hashlib.sha256(b"hearth test stranger").digest(), CHAIN_ID)
OWNER = to_checksum_address("0x" + "0a" * 20)
PROVIDER = to_checksum_address("0x" + "9" * 40)
VALIDATOR = to_checksum_address("0x" + "5" * 40)
ESCROW = to_checksum_address("0x" + "e" * 40)
NOW = 1_800_000_000


def _terms(**changes: Any) -> FundingTerms:
    terms = FundingTerms(
        chain_id=CHAIN_ID,
        escrow=ESCROW,
        token=to_checksum_address("0x" + "7" * 40),
        token_name="USD Coin",
        job_id=escrow_job_id("did:key:z6Mk", "hj_grant"),
        payer=OWNER,
        provider=PROVIDER,
        validator=VALIDATOR,
        amount=1_820_000,
        deadline=NOW + 7200,
    )
    return dataclasses.replace(terms, **changes)


def _funding(grant_id: int = 7, **changes: Any) -> GrantFunding:
    spend = dataclasses.replace(Spend.for_terms(grant_id, _terms()), **changes)
    return sign_spend(AGENT, chain_id=CHAIN_ID, escrow=ESCROW, spend=spend)


def _grant(**changes: Any) -> Grant:
    grant = Grant(
        grant_id=7,
        owner=OWNER,
        agent=AGENT.address,
        per_job_max=2_000_000,
        period_max=5_000_000,
        period_seconds=86_400,
        expiry=NOW + 30 * 86_400,
        revoked=False,
        spent_this_period=1_000_000,
        left_this_period=4_000_000,
        period_ends=NOW + 3600,
    )
    return dataclasses.replace(grant, **changes)


# -- the documents -------------------------------------------------------------------------------------


def test_grant_funding_round_trips_and_is_told_from_an_authorization() -> None:
    funding = _funding()
    doc = funding.to_json()
    assert doc["type"] == "grant" and doc["grant"] == "7" and doc["spend"]["grantId"] == "7"
    assert GrantFunding.from_json(doc) == funding
    assert is_grant_funding(doc)
    assert is_grant_funding({"grant": "x"})  # the grant form, refused later field by field
    assert not is_grant_funding({"type": "eip3009", "from": OWNER})
    assert not is_grant_funding(["grant"])
    assert not is_grant_funding(None)


def test_the_spend_for_terms_has_every_field_of_the_terms() -> None:
    spend = Spend.for_terms(3, _terms())
    assert spend.mismatches(3, _terms()) == []
    assert [m["field"] for m in spend.mismatches(4, _terms())] == ["grantId"]
    for field, change in (
        ("jobId", {"job_id": bytes(32)}),
        ("provider", {"provider": VALIDATOR}),
        ("validator", {"validator": PROVIDER}),
        ("amount", {"amount": 1_820_001}),
        ("deadline", {"deadline": NOW}),
    ):
        assert [m["field"] for m in spend.mismatches(3, _terms(**change))] == [field]


def test_sign_and_recover_the_spend() -> None:
    funding = _funding()
    assert spend_signer(chain_id=CHAIN_ID, escrow=ESCROW, funding=funding) == AGENT.address
    # another escrow, another chain or any changed field: someone else (or nobody) signed that
    assert spend_signer(chain_id=CHAIN_ID, escrow=PROVIDER, funding=funding) != AGENT.address
    assert spend_signer(chain_id=1, escrow=ESCROW, funding=funding) != AGENT.address
    moved = dataclasses.replace(funding, spend=dataclasses.replace(funding.spend, amount=1_820_001))
    assert spend_signer(chain_id=CHAIN_ID, escrow=ESCROW, funding=moved) != AGENT.address
    other = sign_spend(STRANGER, chain_id=CHAIN_ID, escrow=ESCROW, spend=funding.spend)
    assert spend_signer(chain_id=CHAIN_ID, escrow=ESCROW, funding=other) == STRANGER.address
    garbage = dataclasses.replace(funding, signature=b"\xff" * 65)
    assert spend_signer(chain_id=CHAIN_ID, escrow=ESCROW, funding=garbage) is None
    assert funding.r_s_v[:64] == funding.signature[:64] and funding.r_s_v[64] in (27, 28)


def test_the_spend_digest_is_the_eip712_struct_of_the_spec() -> None:
    """Computed by hand from the type string the escrow uses, not by the library that signs."""
    spend = _funding().spend
    typehash = keccak(
        b"Spend(uint256 grantId,bytes32 jobId,address provider,address validator,uint256 amount,"
        b"uint64 deadline)"
    )
    struct = keccak(
        encode(
            ["bytes32", "uint256", "bytes32", "address", "address", "uint256", "uint64"],
            [
                typehash,
                spend.grant_id,
                spend.job_id,
                spend.provider,
                spend.validator,
                spend.amount,
                spend.deadline,
            ],
        )
    )
    domain = keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"),
                keccak(b"HearthEscrow"),
                keccak(b"1"),
                CHAIN_ID,
                ESCROW,
            ],
        )
    )
    assert spend_digest(chain_id=CHAIN_ID, escrow=ESCROW, spend=spend) == keccak(
        b"\x19\x01" + domain + struct
    )
    assert spend_typed_data(chain_id=CHAIN_ID, escrow=ESCROW, spend=spend)["primaryType"] == "Spend"


def _valid_doc() -> dict[str, Any]:
    return _funding().to_json()


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    doc = _valid_doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _MISSING:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


_MISSING = object()
_FIELDS = [
    ("grant",),
    ("signature",),
    ("spend", "grantId"),
    ("spend", "jobId"),
    ("spend", "provider"),
    ("spend", "validator"),
    ("spend", "amount"),
    ("spend", "deadline"),
]
_BAD_VALUES = [_MISSING, None, True, -1, 2**53, 1.5, "", "0x", "1e3", " 7", "7 ", ["7"], {"n": 7}, "9" * 80]


@pytest.mark.parametrize("path", _FIELDS, ids=".".join)
@pytest.mark.parametrize("value", _BAD_VALUES, ids=repr)
def test_every_field_of_a_grant_funding_is_refused_when_malformed(path: tuple[str, ...], value: Any) -> None:
    with pytest.raises(FundingError) as info:
        GrantFunding.from_json(_with(path, value))
    assert info.value.code == "invalid_funding"
    assert info.value.details["field"] == path[-1]
    assert status_of(info.value) == 422


@pytest.mark.parametrize(
    "doc",
    [None, [], "grant", 7, {"type": "eip3009", "grant": "7"}, {"grant": "7"}, {"grant": "7", "spend": []}],
    ids=repr,
)
def test_a_grant_funding_that_is_not_an_object_or_lacks_parts_is_refused(doc: Any) -> None:
    with pytest.raises(FundingError) as info:
        GrantFunding.from_json(doc)
    assert info.value.code == "invalid_funding"


def test_uint_fields_take_their_full_range_and_nothing_beyond() -> None:
    top = _with(("spend", "amount"), str(2**256 - 1))
    assert GrantFunding.from_json(top).spend.amount == 2**256 - 1
    for path, value in ((("spend", "amount"), str(2**256)), (("spend", "deadline"), str(2**64))):
        with pytest.raises(FundingError):
            GrantFunding.from_json(_with(path, value))
    assert GrantFunding.from_json(_with(("spend", "deadline"), str(2**64 - 1))).spend.deadline == 2**64 - 1


def test_the_grant_and_the_spends_grant_must_agree() -> None:
    doc = _with(("grant",), "8")
    with pytest.raises(FundingError) as info:
        GrantFunding.from_json(doc)
    assert info.value.details["field"] == "spend"


# -- the grant's limits, before a job is accepted -------------------------------------------------------


def test_a_spend_within_every_limit_passes_exactly_at_the_caps() -> None:
    check_grant_limits(_grant(), 2_000_000, NOW)  # exactly the per-job cap
    check_grant_limits(_grant(left_this_period=1_820_000), 1_820_000, NOW)  # exactly what is left
    check_grant_limits(_grant(expiry=NOW + GRANT_MARGIN_SECONDS + 1), 1, NOW)


@pytest.mark.parametrize(
    ("changes", "amount", "code"),
    [
        ({"revoked": True, "left_this_period": 0}, 1, "grant_revoked"),
        ({"expiry": NOW}, 1, "grant_expired"),
        ({"expiry": NOW + GRANT_MARGIN_SECONDS}, 1, "grant_expired"),
        ({}, 2_000_001, "grant_exceeds_job_cap"),
        ({"left_this_period": 1_819_999}, 1_820_000, "grant_exhausted"),
        ({"left_this_period": 0}, 1, "grant_exhausted"),
    ],
)
def test_a_spend_the_grant_does_not_allow_is_a_402_saying_what_is_left(
    changes: dict[str, Any], amount: int, code: str
) -> None:
    grant = _grant(**changes)
    with pytest.raises(FundingError) as info:
        check_grant_limits(grant, amount, NOW)
    exc = info.value
    assert exc.code == code and status_of(exc) == 402 and exc.domain == "funding" and not exc.retryable
    assert exc.details["left_this_period"] == str(grant.left_this_period)
    assert exc.details["per_job_max"] == str(grant.per_job_max)
    assert exc.details["period_ends"] == grant.period_ends
    assert exc.details["amount"] == str(amount)
    assert exc.to_dict()["error"]["details"]["grant"] == "7"


def test_grant_codes_have_their_statuses() -> None:
    for code, status in (
        ("grant_not_agent", 403),
        ("grant_unknown", 422),
        ("grant_spend_mismatch", 422),
        ("grant_rejected", 422),
        ("grant_revoked", 402),
        ("grant_exhausted", 402),
    ):
        assert status_of(FundingError(code, "x")) == status, code


def test_grant_view_reads_the_escrow_tuple() -> None:
    view = (OWNER.lower(), AGENT.address, 2, 5, 60, NOW, False, 1, 4, NOW + 30)
    grant = Grant.from_view(9, view)
    assert grant.owner == OWNER and grant.exists and grant.left_this_period == 4
    assert grant.to_json()["spent_this_period"] == "1"
    assert not Grant.from_view(9, ("0x" + "00" * 20, *view[1:])).exists


# -- the owner's terms and the command's arguments ------------------------------------------------------


def test_owner_terms_are_checked_before_anything_is_signed() -> None:
    good = GrantTerms(
        agent=AGENT.address, per_job_max=1, period_max=2, period_seconds=3600, expiry=NOW + 86_400
    )
    good.check(NOW)
    assert good.lifetime_cap(NOW) == 2 * 24
    for change in (
        {"per_job_max": 0},
        {"period_max": 0},
        {"per_job_max": 3},
        {"period_seconds": 0},
        {"expiry": NOW},
        {"per_job_max": 2**128, "period_max": 2**128},
        {"agent": "0x" + "00" * 20},
    ):
        with pytest.raises(FundingError) as info:
            dataclasses.replace(good, **change).check(NOW)
        assert info.value.code == "invalid_grant_terms" and info.value.details["problems"]


def test_durations_and_agents_on_the_command_line() -> None:
    assert duration("3600") == duration("3600s") == duration("60m") == duration("1h") == 3600
    assert duration("1d") == 86_400 and duration("2w") == 14 * 86_400
    for bad in ("", "0", "0d", "-1d", "1y", "1.5h", "d", "1 d", "9" * 20):
        with pytest.raises(HearthError) as info:
            duration(bad)
        assert info.value.code == usage("x").code
    assert agent_address(AGENT.address, CHAIN_ID) == AGENT.address
    assert agent_address(AGENT.did, CHAIN_ID) == AGENT.address
    for bad in (AGENT.did.replace(f":{CHAIN_ID}:", ":1:"), "did:key:z6Mk", "0x1234", "agent"):
        with pytest.raises(HearthError):
            agent_address(bad, CHAIN_ID)


# -- the escrow contract agrees -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def escrow() -> Iterator[Contract]:
    with anvil() as chain:
        usdc = chain.deploy("TestUSDC", TOKEN_NAME, chain.deployer)
        yield chain.deploy("HearthEscrow", usdc.address)


def test_the_escrow_computes_the_same_spend_digest(escrow: Contract) -> None:
    spend = _funding().spend
    on_chain = escrow.functions.spendDigest(
        spend.grant_id, spend.job_id, spend.provider, spend.validator, spend.amount, spend.deadline
    ).call()
    assert bytes(on_chain) == spend_digest(chain_id=CHAIN_ID, escrow=escrow.address, spend=spend)
    assert bytes(on_chain) != spend_digest(chain_id=CHAIN_ID, escrow=ESCROW, spend=spend)
