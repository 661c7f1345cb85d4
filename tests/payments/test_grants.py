"""HearthEscrow's spending grants on anvil: an owner's agent funds jobs within on-chain caps.

Every cap is tried at its edge (exactly at it, one base unit over), the period window at the second it
turns, expiry at and after its second, revocation alone and racing a spend in one block in both orders,
and the spends that must not fund: signed by someone else, replayed for another job, for a job id in use.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from web3.contract import Contract

from payments.devnet import TOKEN_NAME, USDC
from payments.escrow_build import terms_hash
from tests.payments.contracts.chain import Chain, anvil, events, new_account, reverts, sign_receipt
from tests.payments.contracts.grants import (
    GrantTerms,
    open_grant,
    sign_permit,
    sign_spend,
    spend_typed_data,
    typed_data_digest,
)

DAY = 86_400
JOB_SECONDS = 3600
# Upper bounds that catch a gas regression (figures printed by test_gas_figures with -s). fundFromGrant
# writes one fresh slot for the job (the hash of its terms and its status), as fund does.
MAX_GAS = {
    "openGrant": 135_000,
    "openGrantWithPermit": 195_000,
    "fundFromGrant": 105_000,
    "revokeGrant": 40_000,
}


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with anvil() as c:
        yield c


@pytest.fixture(scope="module")
def usdc(chain: Chain) -> Contract:
    return chain.deploy("TestUSDC", TOKEN_NAME, chain.deployer)


@pytest.fixture(scope="module")
def escrow(chain: Chain, usdc: Contract) -> Contract:
    return chain.deploy("HearthEscrow", usdc.address)


@dataclass
class Spend:
    """One job an agent funds from a grant."""

    grant_id: int
    job_id: bytes
    provider: str
    validator: LocalAccount
    amount: int
    deadline: int

    @property
    def terms(self) -> tuple[int, bytes, str, str, int, int]:
        return (self.grant_id, self.job_id, self.provider, self.validator.address, self.amount, self.deadline)

    def signed(self, escrow: Contract, agent: LocalAccount) -> bytes:
        grant_id, job_id, provider, validator, amount, deadline = self.terms
        return sign_spend(
            agent, escrow=escrow.address, grant_id=grant_id, job_id=job_id, provider=provider,
            validator=validator, amount=amount, deadline=deadline,
        )  # fmt: skip

    def call(self, escrow: Contract, signature: bytes) -> Any:
        return escrow.functions.fundFromGrant(*self.terms, signature)


def _owner(chain: Chain, usdc: Contract, escrow: Contract, *, balance: int = 100 * USDC) -> LocalAccount:
    """A fresh owner with ether, ``balance`` USDC and an unlimited allowance to the escrow; anvil sends
    transactions from its address (impersonation), and its key signs permits."""
    owner = new_account()
    chain.rpc("anvil_setBalance", owner.address, hex(10**18))
    chain.rpc("anvil_impersonateAccount", owner.address)
    chain.transact(usdc.functions.mint(owner.address, balance), chain.deployer)
    chain.transact(usdc.functions.approve(escrow.address, 2**256 - 1), owner.address)
    return owner


def _terms(chain: Chain, **overrides: Any) -> GrantTerms:
    fields: dict[str, Any] = {
        "agent": new_account(),
        "per_job_max": 5 * USDC,
        "period_max": 12 * USDC,
        "period_seconds": DAY,
        "expiry": chain.now() + 30 * DAY,
    }
    fields.update(overrides)
    return GrantTerms(**fields)


def _spend(chain: Chain, grant_id: int, amount: int, deadline: int | None = None) -> Spend:
    return Spend(
        grant_id, secrets.token_bytes(32), new_account().address, new_account(), amount,
        deadline if deadline is not None else chain.now() + 10 * DAY,
    )  # fmt: skip


def _fund(chain: Chain, escrow: Contract, agent: LocalAccount, spend: Spend) -> Any:
    """Submits ``spend`` signed by ``agent`` from a relayer account; returns the receipt."""
    return chain.transact(spend.call(escrow, spend.signed(escrow, agent)), chain.accounts[5])


def _grant(escrow: Contract, grant_id: int) -> dict[str, Any]:
    keys = (
        "owner",
        "agent",
        "perJobMax",
        "periodMax",
        "periodSeconds",
        "expiry",
        "revoked",
        "spent",
        "left",
        "ends",
    )
    return dict(zip(keys, escrow.functions.grantOf(grant_id).call(), strict=True))


def _fails_at(chain: Chain, when: int, call: Any, error: str, *args: Any) -> None:
    """The call reverts with ``error(args)`` in a block at ``when`` (checked in the pending block, then sent
    and mined there with status 0, so the block at ``when`` exists afterwards)."""
    chain.next_block_at(when)
    with reverts(error, *args):
        call.call({"from": chain.accounts[5]}, block_identifier="pending")
    receipt = chain.send(call, chain.accounts[5])
    assert receipt["status"] == 0 and chain.block_time(receipt) == when


def _succeeds_at(chain: Chain, when: int, call: Any) -> Any:
    chain.next_block_at(when)
    receipt = chain.send(call, chain.accounts[5])
    assert receipt["status"] == 1 and chain.block_time(receipt) == when
    return receipt


# --- opening and reading -------------------------------------------------------------------------------


def test_grant_ids_start_at_one_and_the_view_tells_the_terms(chain: Chain, usdc: Contract) -> None:
    escrow = chain.deploy("HearthEscrow", usdc.address)
    owner = _owner(chain, usdc, escrow)
    terms = _terms(chain)
    with reverts("GrantUnknown(uint256)", 1):
        escrow.functions.grantOf(1).call()
    receipt = chain.transact(escrow.functions.openGrant(*terms.args), owner.address)
    (event,) = events(escrow, "GrantOpened", receipt)
    opened = chain.block_time(receipt)
    assert event == {
        "grantId": 1, "owner": owner.address, "agent": terms.agent.address, "perJobMax": terms.per_job_max,
        "periodMax": terms.period_max, "periodSeconds": DAY, "expiry": terms.expiry,
    }  # fmt: skip
    assert escrow.functions.grantCount().call() == 1
    assert _grant(escrow, 1) == {
        "owner": owner.address, "agent": terms.agent.address, "perJobMax": terms.per_job_max,
        "periodMax": terms.period_max, "periodSeconds": DAY, "expiry": terms.expiry, "revoked": False,
        "spent": 0, "left": terms.period_max, "ends": opened + DAY,
    }  # fmt: skip
    second, _ = open_grant(chain, escrow, owner.address, _terms(chain))
    assert second == 2
    for unknown in (0, 3):
        with reverts("GrantUnknown(uint256)", unknown):
            escrow.functions.grantOf(unknown).call()


def test_bad_grant_terms_are_refused(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    owner = _owner(chain, usdc, escrow)
    now = chain.now()
    for bad in (
        {"per_job_max": 0},
        {"period_max": 0},
        {"period_seconds": 0},
        {"expiry": now},
    ):
        with reverts("InvalidTerms()"):
            escrow.functions.openGrant(*_terms(chain, **bad).args).transact({"from": owner.address})
    with reverts("InvalidTerms()"):
        escrow.functions.openGrant("0x" + "00" * 20, USDC, USDC, DAY, now + DAY).transact(
            {"from": owner.address}
        )


# --- spending ------------------------------------------------------------------------------------------


def test_a_spend_funds_a_job_the_owner_pays_and_gets_refunds(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    owner = _owner(chain, usdc, escrow)
    terms = _terms(chain)
    grant_id, _ = open_grant(chain, escrow, owner.address, terms)
    spend = _spend(chain, grant_id, 3 * USDC)
    held = usdc.functions.balanceOf(escrow.address).call()
    receipt = _fund(chain, escrow, terms.agent, spend)
    (funded,) = events(escrow, "Funded", receipt)
    assert funded == {
        "jobId": spend.job_id, "payer": owner.address, "provider": spend.provider,
        "validator": spend.validator.address, "amount": spend.amount, "deadline": spend.deadline,
    }  # fmt: skip
    (spent,) = events(escrow, "GrantSpent", receipt)
    assert spent == {
        "grantId": grant_id,
        "jobId": spend.job_id,
        "amount": 3 * USDC,
        "spentThisPeriod": 3 * USDC,
    }
    entry = (owner.address, spend.provider, spend.validator.address, spend.amount, spend.deadline)
    assert escrow.functions.jobState(spend.job_id).call() == [1, terms_hash(*entry)]  # open, the owner pays
    assert usdc.functions.balanceOf(owner.address).call() == 97 * USDC
    assert usdc.functions.balanceOf(escrow.address).call() == held + 3 * USDC
    assert _grant(escrow, grant_id)["spent"] == 3 * USDC
    assert _grant(escrow, grant_id)["left"] == 9 * USDC

    # A failing receipt sends the whole amount back to the owner, not to the agent or the relayer.
    failing = sign_receipt(
        spend.validator, escrow=escrow.address, job_id=spend.job_id, result_digest=bytes(32), passed=False,
        amount=0, provider=spend.provider,
    )  # fmt: skip
    refund = chain.transact(
        escrow.functions.refund(spend.job_id, entry, bytes(32), failing), chain.accounts[6]
    )
    (refunded,) = events(escrow, "Refunded", refund)
    assert refunded["payer"] == owner.address and refunded["amount"] == 3 * USDC
    assert usdc.functions.balanceOf(owner.address).call() == 100 * USDC
    assert usdc.functions.balanceOf(terms.agent.address).call() == 0
    assert _grant(escrow, grant_id)["spent"] == 3 * USDC  # a refund does not give the period's budget back


def test_the_per_job_cap_at_its_edge(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    owner = _owner(chain, usdc, escrow)
    terms = _terms(chain, per_job_max=5 * USDC, period_max=50 * USDC)
    grant_id, _ = open_grant(chain, escrow, owner.address, terms)
    over = _spend(chain, grant_id, 5 * USDC + 1)
    with reverts("OverJobCap(uint256,uint256)", 5 * USDC + 1, 5 * USDC):
        over.call(escrow, over.signed(escrow, terms.agent)).transact({"from": chain.accounts[5]})
    _fund(chain, escrow, terms.agent, _spend(chain, grant_id, 5 * USDC))
    assert _grant(escrow, grant_id)["spent"] == 5 * USDC
    zero = _spend(chain, grant_id, 0)
    with reverts("InvalidTerms()"):
        zero.call(escrow, zero.signed(escrow, terms.agent)).transact({"from": chain.accounts[5]})


def test_the_period_cap_exactly_reached_then_one_unit_over(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    owner = _owner(chain, usdc, escrow)
    terms = _terms(chain, per_job_max=5 * USDC, period_max=12 * USDC)
    grant_id, _ = open_grant(chain, escrow, owner.address, terms)
    for amount in (5 * USDC, 5 * USDC):
        _fund(chain, escrow, terms.agent, _spend(chain, grant_id, amount))
    over = _spend(chain, grant_id, 2 * USDC + 1)
    with reverts("OverPeriodCap(uint256,uint256)", 2 * USDC + 1, 2 * USDC):
        over.call(escrow, over.signed(escrow, terms.agent)).transact({"from": chain.accounts[5]})
    receipt = _fund(chain, escrow, terms.agent, _spend(chain, grant_id, 2 * USDC))
    assert events(escrow, "GrantSpent", receipt)[0]["spentThisPeriod"] == 12 * USDC
    assert (_grant(escrow, grant_id)["spent"], _grant(escrow, grant_id)["left"]) == (12 * USDC, 0)
    one = _spend(chain, grant_id, 1)
    with reverts("OverPeriodCap(uint256,uint256)", 1, 0):
        one.call(escrow, one.signed(escrow, terms.agent)).transact({"from": chain.accounts[5]})
    assert usdc.functions.balanceOf(owner.address).call() == 88 * USDC


def test_the_period_window_turns_at_its_second(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    owner = _owner(chain, usdc, escrow)
    period = 1000
    terms = _terms(chain, per_job_max=10 * USDC, period_max=10 * USDC, period_seconds=period)
    grant_id, opened = open_grant(chain, escrow, owner.address, terms)
    turn = opened + period  # the first second of the second window
    _fund(chain, escrow, terms.agent, _spend(chain, grant_id, 6 * USDC))

    late = _spend(chain, grant_id, 5 * USDC)
    _fails_at(chain, turn - 2, late.call(escrow, late.signed(escrow, terms.agent)),
              "OverPeriodCap(uint256,uint256)", 5 * USDC, 4 * USDC)  # fmt: skip
    last = _spend(chain, grant_id, 4 * USDC)
    receipt = _succeeds_at(chain, turn - 1, last.call(escrow, last.signed(escrow, terms.agent)))
    assert events(escrow, "GrantSpent", receipt)[0]["spentThisPeriod"] == 10 * USDC
    assert (_grant(escrow, grant_id)["spent"], _grant(escrow, grant_id)["ends"]) == (10 * USDC, turn)

    fresh = _spend(chain, grant_id, 10 * USDC)
    receipt = _succeeds_at(chain, turn, fresh.call(escrow, fresh.signed(escrow, terms.agent)))
    assert events(escrow, "GrantSpent", receipt)[0]["spentThisPeriod"] == 10 * USDC
    assert _grant(escrow, grant_id)["ends"] == turn + period
    one = _spend(chain, grant_id, 1)
    _fails_at(chain, turn + period - 1, one.call(escrow, one.signed(escrow, terms.agent)),
              "OverPeriodCap(uint256,uint256)", 1, 0)  # fmt: skip

    # A window with no spend at all: the count starts afresh two windows on, not from the stale one.
    skip = _spend(chain, grant_id, 10 * USDC)
    _succeeds_at(chain, turn + 2 * period + 7, skip.call(escrow, skip.signed(escrow, terms.agent)))
    assert usdc.functions.balanceOf(owner.address).call() == 70 * USDC


def test_expiry_at_and_after_its_second(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    owner = _owner(chain, usdc, escrow)
    expiry = chain.now() + 500
    terms = _terms(chain, expiry=expiry)
    grant_id, _ = open_grant(chain, escrow, owner.address, terms)
    before = _spend(chain, grant_id, USDC, deadline=expiry + DAY)
    _succeeds_at(chain, expiry - 1, before.call(escrow, before.signed(escrow, terms.agent)))
    at = _spend(chain, grant_id, USDC, deadline=expiry + DAY)
    _fails_at(chain, expiry, at.call(escrow, at.signed(escrow, terms.agent)),
              "GrantExpired(uint256,uint64)", grant_id, expiry)  # fmt: skip
    assert _grant(escrow, grant_id)["left"] == 0
    chain.advance(DAY)
    after = _spend(chain, grant_id, USDC, deadline=chain.now() + DAY)
    with reverts("GrantExpired(uint256,uint64)", grant_id, expiry):
        after.call(escrow, after.signed(escrow, terms.agent)).transact({"from": chain.accounts[5]})


# --- revocation ----------------------------------------------------------------------------------------


def test_revocation_stops_spending_and_only_the_owner_revokes(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    owner = _owner(chain, usdc, escrow)
    terms = _terms(chain)
    grant_id, _ = open_grant(chain, escrow, owner.address, terms)
    for stranger in (terms.agent.address, chain.accounts[5]):
        chain.rpc("anvil_setBalance", stranger, hex(10**18))
        chain.rpc("anvil_impersonateAccount", stranger)
        with reverts("NotGrantOwner()"):
            escrow.functions.revokeGrant(grant_id).transact({"from": stranger})
    with reverts("GrantUnknown(uint256)", 10**9):
        escrow.functions.revokeGrant(10**9).transact({"from": owner.address})
    receipt = chain.transact(escrow.functions.revokeGrant(grant_id), owner.address)
    assert events(escrow, "GrantRevoked", receipt) == [{"grantId": grant_id}]
    assert _grant(escrow, grant_id)["revoked"] is True and _grant(escrow, grant_id)["left"] == 0
    spend = _spend(chain, grant_id, USDC)
    with reverts("GrantRevokedError(uint256)", grant_id):
        spend.call(escrow, spend.signed(escrow, terms.agent)).transact({"from": chain.accounts[5]})
    with reverts("GrantRevokedError(uint256)", grant_id):
        escrow.functions.revokeGrant(grant_id).transact({"from": owner.address})
    assert usdc.functions.balanceOf(owner.address).call() == 100 * USDC


@pytest.mark.parametrize("revoke_first", [True, False])
def test_revocation_racing_a_spend_in_one_block(
    chain: Chain, usdc: Contract, escrow: Contract, revoke_first: bool
) -> None:
    owner = _owner(chain, usdc, escrow)
    terms = _terms(chain)
    grant_id, _ = open_grant(chain, escrow, owner.address, terms)
    spend = _spend(chain, grant_id, 4 * USDC)
    revoke = escrow.functions.revokeGrant(grant_id)
    fund = spend.call(escrow, spend.signed(escrow, terms.agent))
    chain.rpc("evm_setAutomine", False)  # both wait in the pool, then go into one block in the order sent
    try:
        if revoke_first:
            revoke_hash = revoke.transact({"from": owner.address, "gas": 100_000})
            spend_hash = fund.transact({"from": chain.accounts[5], "gas": 400_000})
        else:
            spend_hash = fund.transact({"from": chain.accounts[5], "gas": 400_000})
            revoke_hash = revoke.transact({"from": owner.address, "gas": 100_000})
        chain.rpc("evm_mine")
    finally:
        chain.rpc("evm_setAutomine", True)
    revoked = chain.w3.eth.wait_for_transaction_receipt(revoke_hash)
    spent = chain.w3.eth.wait_for_transaction_receipt(spend_hash)
    assert revoked["blockNumber"] == spent["blockNumber"]
    assert (revoked["transactionIndex"] < spent["transactionIndex"]) is revoke_first
    assert revoked["status"] == 1 and _grant(escrow, grant_id)["revoked"] is True
    if revoke_first:
        assert spent["status"] == 0
        with reverts("GrantRevokedError(uint256)", grant_id):  # what it met: the grant revoked before it
            fund.call({"from": chain.accounts[5]})
        assert escrow.functions.jobState(spend.job_id).call() == [0, bytes(32)]
        assert usdc.functions.balanceOf(owner.address).call() == 100 * USDC
    else:
        assert spent["status"] == 1
        entry = (owner.address, spend.provider, spend.validator.address, spend.amount, spend.deadline)
        assert escrow.functions.jobState(spend.job_id).call() == [1, terms_hash(*entry)]
        assert usdc.functions.balanceOf(owner.address).call() == 96 * USDC


# --- spends that must not fund ------------------------------------------------------------------------


def test_spends_not_signed_by_the_agent_for_these_terms(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    owner = _owner(chain, usdc, escrow)
    terms = _terms(chain)
    grant_id, _ = open_grant(chain, escrow, owner.address, terms)
    spend = _spend(chain, grant_id, USDC)
    intruder = new_account()
    with reverts("NotGrantAgent(address,address)", intruder.address, terms.agent.address):
        spend.call(escrow, spend.signed(escrow, intruder)).transact({"from": chain.accounts[5]})
    with reverts("NotGrantAgent(address,address)", owner.address, terms.agent.address):
        spend.call(escrow, spend.signed(escrow, owner)).transact({"from": chain.accounts[5]})
    with reverts("NotGrantAgent(address,address)"):  # not a signature at all
        spend.call(escrow, b"\x01" * 65).transact({"from": chain.accounts[5]})

    signature = spend.signed(escrow, terms.agent)
    other_escrow = chain.deploy("HearthEscrow", usdc.address)
    elsewhere = sign_spend(
        terms.agent, escrow=other_escrow.address, grant_id=grant_id, job_id=spend.job_id,
        provider=spend.provider, validator=spend.validator.address, amount=USDC, deadline=spend.deadline,
    )  # fmt: skip
    replays = {
        "another job id": replace(spend, job_id=secrets.token_bytes(32)),
        "another grant of the same agent": replace(
            spend, grant_id=open_grant(chain, escrow, owner.address, terms)[0]
        ),
        "another provider": replace(spend, provider=chain.accounts[7]),
        "another validator": replace(spend, validator=new_account()),
        "a larger amount": replace(spend, amount=2 * USDC),
        "a later deadline": replace(spend, deadline=spend.deadline + 1),
    }
    for why, other in replays.items():
        with reverts("NotGrantAgent(address,address)"):
            other.call(escrow, signature).transact({"from": chain.accounts[5]})
            pytest.fail(f"the spend funded {why}")
    with reverts("NotGrantAgent(address,address)"):
        spend.call(escrow, elsewhere).transact({"from": chain.accounts[5]})

    chain.transact(spend.call(escrow, signature), chain.accounts[5])
    with reverts("JobExists(bytes32)", spend.job_id):  # the same spend again
        spend.call(escrow, signature).transact({"from": chain.accounts[5]})
    assert _grant(escrow, grant_id)["spent"] == USDC
    assert usdc.functions.balanceOf(owner.address).call() == 99 * USDC


def test_a_spend_for_a_job_id_in_use_funds_nothing(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    owner = _owner(chain, usdc, escrow)
    terms = _terms(chain)
    grant_id, _ = open_grant(chain, escrow, owner.address, terms)
    spend = _spend(chain, grant_id, 2 * USDC)
    payer = chain.accounts[1]
    chain.transact(usdc.functions.mint(payer, USDC), chain.deployer)
    chain.transact(usdc.functions.approve(escrow.address, USDC), payer)
    chain.transact(escrow.functions.fund(spend.job_id, spend.provider, spend.validator.address, USDC,
                                         spend.deadline), payer)  # fmt: skip
    with reverts("JobExists(bytes32)", spend.job_id):
        spend.call(escrow, spend.signed(escrow, terms.agent)).transact({"from": chain.accounts[5]})
    assert _grant(escrow, grant_id)["spent"] == 0  # the whole spend reverted, its count included
    entry = (payer, spend.provider, spend.validator.address, USDC, spend.deadline)
    assert escrow.functions.jobState(spend.job_id).call() == [1, terms_hash(*entry)]  # the payer's own
    assert usdc.functions.balanceOf(owner.address).call() == 100 * USDC


def test_a_spend_the_owner_cannot_cover_counts_nothing(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    owner = _owner(chain, usdc, escrow, balance=USDC)
    terms = _terms(chain)
    grant_id, _ = open_grant(chain, escrow, owner.address, terms)
    spend = _spend(chain, grant_id, 2 * USDC)
    with reverts("ERC20InsufficientBalance(address,uint256,uint256)", owner.address, USDC, 2 * USDC):
        spend.call(escrow, spend.signed(escrow, terms.agent)).transact({"from": chain.accounts[5]})
    chain.transact(usdc.functions.approve(escrow.address, USDC - 1), owner.address)
    small = _spend(chain, grant_id, USDC)
    with reverts("ERC20InsufficientAllowance(address,uint256,uint256)", escrow.address, USDC - 1, USDC):
        small.call(escrow, small.signed(escrow, terms.agent)).transact({"from": chain.accounts[5]})
    assert _grant(escrow, grant_id)["spent"] == 0


def test_python_spend_typed_data_hashes_as_the_contract_does(chain: Chain, escrow: Contract) -> None:
    spend = _spend(chain, 7, 3 * USDC)
    grant_id, job_id, provider, validator, amount, deadline = spend.terms
    data = spend_typed_data(
        escrow=escrow.address, grant_id=grant_id, job_id=job_id, provider=provider, validator=validator,
        amount=amount, deadline=deadline,
    )  # fmt: skip
    assert bytes(escrow.functions.spendDigest(*spend.terms).call()) == typed_data_digest(data)


# --- permit ------------------------------------------------------------------------------------------


def test_open_grant_with_permit_needs_no_approve(chain: Chain, usdc: Contract, escrow: Contract) -> None:
    owner = new_account()
    chain.rpc("anvil_setBalance", owner.address, hex(10**18))
    chain.rpc("anvil_impersonateAccount", owner.address)
    chain.transact(usdc.functions.mint(owner.address, 50 * USDC), chain.deployer)
    terms = _terms(chain)
    deadline = chain.now() + 600
    v, r, s = sign_permit(owner, token=usdc, token_name=TOKEN_NAME, spender=escrow.address, value=30 * USDC,
                          deadline=deadline)  # fmt: skip
    receipt = chain.transact(
        escrow.functions.openGrantWithPermit(*terms.args, 30 * USDC, deadline, v, r, s), owner.address
    )
    (opened,) = events(escrow, "GrantOpened", receipt)
    assert opened["owner"] == owner.address and opened["agent"] == terms.agent.address
    assert usdc.functions.allowance(owner.address, escrow.address).call() == 30 * USDC
    _fund(chain, escrow, terms.agent, _spend(chain, opened["grantId"], 5 * USDC))
    assert usdc.functions.balanceOf(owner.address).call() == 45 * USDC
    assert usdc.functions.allowance(owner.address, escrow.address).call() == 25 * USDC

    # The same permit submitted first by someone else (front-run, or sent twice): the grant still opens.
    deadline = chain.now() + 600
    v, r, s = sign_permit(owner, token=usdc, token_name=TOKEN_NAME, spender=escrow.address, value=40 * USDC,
                          deadline=deadline)  # fmt: skip
    chain.transact(usdc.functions.permit(owner.address, escrow.address, 40 * USDC, deadline, v, r, s),
                   chain.accounts[6])  # fmt: skip
    chain.transact(
        escrow.functions.openGrantWithPermit(*terms.args, 40 * USDC, deadline, v, r, s), owner.address
    )
    # A permit that fails with no allowance behind it stops the grant.
    forged = sign_permit(new_account(), token=usdc, token_name=TOKEN_NAME, spender=escrow.address,
                         value=60 * USDC, deadline=deadline)  # fmt: skip
    with reverts("PermitFailed(uint256,uint256)", 40 * USDC, 60 * USDC):
        escrow.functions.openGrantWithPermit(*terms.args, 60 * USDC, deadline, *forged).transact(
            {"from": owner.address}
        )
    assert escrow.functions.grantCount().call() >= 2


# --- gas -----------------------------------------------------------------------------------------------


def test_gas_figures(chain: Chain, usdc: Contract) -> None:
    """Gas of the grant calls in steady state (printed with ``-s``); bounded so a regression fails the test.

    A fresh escrow with one grant and one job already in it, so neither the grant counter nor the escrow's
    token balance is a fresh storage slot (each would add 17,100 gas once per escrow, not per call)."""
    escrow = chain.deploy("HearthEscrow", usdc.address)
    warm = _owner(chain, usdc, escrow)
    warm_terms = _terms(chain)
    _fund(
        chain,
        escrow,
        warm_terms.agent,
        _spend(chain, open_grant(chain, escrow, warm.address, warm_terms)[0], 1),
    )

    gas: dict[str, int] = {}
    owner = _owner(chain, usdc, escrow)  # approved the escrow for an unlimited amount
    terms = _terms(chain)
    receipt = chain.transact(escrow.functions.openGrant(*terms.args), owner.address)
    gas["openGrant"] = int(receipt["gasUsed"])
    (grant_id,) = (e["grantId"] for e in events(escrow, "GrantOpened", receipt))
    gas["fundFromGrant"] = int(_fund(chain, escrow, terms.agent, _spend(chain, grant_id, USDC))["gasUsed"])
    gas["revokeGrant"] = int(chain.transact(escrow.functions.revokeGrant(grant_id), owner.address)["gasUsed"])

    permit_owner = new_account()
    chain.rpc("anvil_setBalance", permit_owner.address, hex(10**18))
    chain.rpc("anvil_impersonateAccount", permit_owner.address)
    chain.transact(usdc.functions.mint(permit_owner.address, 10 * USDC), chain.deployer)
    deadline = chain.now() + 600
    v, r, s = sign_permit(permit_owner, token=usdc, token_name=TOKEN_NAME, spender=escrow.address,
                          value=10 * USDC, deadline=deadline)  # fmt: skip
    permit_terms = _terms(chain)
    call = escrow.functions.openGrantWithPermit(*permit_terms.args, 10 * USDC, deadline, v, r, s)
    receipt = chain.transact(call, permit_owner.address)
    gas["openGrantWithPermit"] = int(receipt["gasUsed"])
    (grant_id,) = (e["grantId"] for e in events(escrow, "GrantOpened", receipt))
    # A finite allowance (the permit's) is written down by each spend.
    spend = _spend(chain, grant_id, USDC)
    gas["fundFromGrant (finite allowance)"] = int(_fund(chain, escrow, permit_terms.agent, spend)["gasUsed"])
    print("\nHearthEscrow grant gas used:", ", ".join(f"{k}={v}" for k, v in gas.items()))
    for name, used in gas.items():
        assert 21_000 < used <= MAX_GAS[name.split(" ")[0]], f"{name} used {used} gas"
