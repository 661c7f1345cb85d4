"""Spending grants against Circle's own USDC (FiatToken v2.2), not only TestUSDC.

The owner opens the grant with an EIP-2612 permit signed in USDC's domain ("USD Coin", version "2"), the
agent's spends pull 6-decimal USDC from the owner, and the jobs settle with USDC's own transfer rules.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from eth_abi.abi import encode
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3.contract import Contract
from web3.exceptions import ContractLogicError

from payments.escrow_build import terms_hash
from tests.payments.contracts.chain import CHAIN_ID, Chain, anvil, events, new_account, reverts, sign_receipt
from tests.payments.contracts.fiat_token import USDC_DECIMALS, USDC_NAME, deploy_usdc, require_package
from tests.payments.contracts.grants import GrantTerms, sign_permit, sign_spend

USDC = 10**USDC_DECIMALS
DAY = 86_400
# USDC's transferFrom (a proxy, blacklist checks, an allowance write) costs more than TestUSDC's.
MAX_FUND_FROM_GRANT_GAS = 195_000


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    require_package()
    with anvil() as c:
        yield c


@pytest.fixture(scope="module")
def usdc(chain: Chain) -> Contract:
    return deploy_usdc(chain, admin=chain.accounts[9], operator=chain.deployer)


@pytest.fixture(scope="module")
def escrow(chain: Chain, usdc: Contract) -> Contract:
    return chain.deploy("HearthEscrow", usdc.address)


def _owner(chain: Chain, usdc: Contract, balance: int) -> LocalAccount:
    owner = new_account()
    chain.rpc("anvil_setBalance", owner.address, hex(10**18))
    chain.rpc("anvil_impersonateAccount", owner.address)
    chain.transact(usdc.functions.mint(owner.address, balance), chain.deployer)
    return owner


def _spend_call(escrow: Contract, agent: LocalAccount, grant_id: int, job_id: bytes, provider: str,
                validator: str, amount: int, deadline: int) -> object:  # fmt: skip
    signature = sign_spend(
        agent, escrow=escrow.address, grant_id=grant_id, job_id=job_id, provider=provider,
        validator=validator, amount=amount, deadline=deadline,
    )  # fmt: skip
    return escrow.functions.fundFromGrant(grant_id, job_id, provider, validator, amount, deadline, signature)


def test_usdc_is_the_token_the_grant_path_signs_for(chain: Chain, usdc: Contract) -> None:
    assert (usdc.functions.name().call(), usdc.functions.decimals().call()) == (USDC_NAME, USDC_DECIMALS)
    assert usdc.functions.version().call() == "2"
    domain_type = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    separator = keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [keccak(text=domain_type), keccak(text=USDC_NAME), keccak(text="2"), CHAIN_ID, usdc.address],
        )
    )
    assert bytes(usdc.functions.DOMAIN_SEPARATOR().call()) == separator
    permit_owner = new_account()
    v, r, s = sign_permit(permit_owner, token=usdc, token_name=USDC_NAME, spender=chain.accounts[3], value=7,
                          deadline=chain.now() + 600)  # fmt: skip
    chain.transact(
        usdc.functions.permit(permit_owner.address, chain.accounts[3], 7, chain.now() + 600, v, r, s),
        chain.accounts[4],
    )
    assert usdc.functions.allowance(permit_owner.address, chain.accounts[3]).call() == 7


def test_a_grant_opened_with_a_usdc_permit_funds_jobs_from_the_owner(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    owner = _owner(chain, usdc, 40 * USDC)
    agent = new_account()
    terms = GrantTerms(agent, 5 * USDC, 8 * USDC, DAY, chain.now() + 7 * DAY)
    deadline = chain.now() + 600
    v, r, s = sign_permit(owner, token=usdc, token_name=USDC_NAME, spender=escrow.address, value=10 * USDC,
                          deadline=deadline)  # fmt: skip
    receipt = chain.transact(
        escrow.functions.openGrantWithPermit(*terms.args, 10 * USDC, deadline, v, r, s), owner.address
    )
    (opened,) = events(escrow, "GrantOpened", receipt)
    grant_id = opened["grantId"]
    assert usdc.functions.allowance(owner.address, escrow.address).call() == 10 * USDC

    provider, validator = new_account().address, new_account()
    job_id, job_deadline = secrets.token_bytes(32), chain.now() + DAY
    call = _spend_call(escrow, agent, grant_id, job_id, provider, validator.address, 5 * USDC, job_deadline)
    receipt = chain.transact(call, chain.accounts[5])  # a node relays it; the agent holds no ether
    first_gas = receipt["gasUsed"]  # the escrow's USDC balance goes from zero: a fresh storage slot
    (spent,) = events(escrow, "GrantSpent", receipt)
    assert spent["spentThisPeriod"] == 5 * USDC
    entry = (owner.address, provider, validator.address, 5 * USDC, job_deadline)
    assert escrow.functions.jobState(job_id).call() == [1, terms_hash(*entry)]  # open, the owner pays
    assert usdc.functions.balanceOf(owner.address).call() == 35 * USDC
    assert usdc.functions.balanceOf(escrow.address).call() == 5 * USDC
    assert chain.w3.eth.get_balance(agent.address) == 0

    paid = 3 * USDC + 250_000  # 3.25 USDC: the 6 decimals carry through to the provider
    result = secrets.token_bytes(32)
    receipt_signature = sign_receipt(validator, escrow=escrow.address, job_id=job_id, result_digest=result,
                                     passed=True, amount=paid, provider=provider)  # fmt: skip
    chain.transact(
        escrow.functions.release(job_id, entry, paid, result, receipt_signature), chain.accounts[5]
    )
    assert usdc.functions.balanceOf(provider).call() == paid
    assert usdc.functions.balanceOf(owner.address).call() == 35 * USDC + 5 * USDC - paid

    # The period cap stops the next spend before USDC moves; the allowance left (5 USDC) stops a larger one.
    over = _spend_call(escrow, agent, grant_id, secrets.token_bytes(32), provider, validator.address,
                       4 * USDC, job_deadline)  # fmt: skip
    with reverts("OverPeriodCap(uint256,uint256)", 4 * USDC, 3 * USDC):
        over.transact({"from": chain.accounts[5]})  # type: ignore[attr-defined]
    assert escrow.functions.grantOf(grant_id).call()[7:9] == [5 * USDC, 3 * USDC]
    chain.transact(usdc.functions.approve(escrow.address, 2 * USDC), owner.address)
    short = _spend_call(escrow, agent, grant_id, secrets.token_bytes(32), provider, validator.address,
                        3 * USDC, job_deadline)  # fmt: skip
    with pytest.raises(ContractLogicError, match="transfer amount exceeds allowance"):
        short.transact({"from": chain.accounts[5]})  # type: ignore[attr-defined]
    assert escrow.functions.grantOf(grant_id).call()[7] == 5 * USDC
    last = _spend_call(escrow, agent, grant_id, secrets.token_bytes(32), provider, validator.address,
                       2 * USDC, job_deadline)  # fmt: skip
    gas = chain.transact(last, chain.accounts[5])["gasUsed"]
    print(f"\nfundFromGrant on FiatToken v2.2: {first_gas} gas (first job), {gas} (escrow holding USDC)")
    assert gas <= MAX_FUND_FROM_GRANT_GAS
    assert usdc.functions.allowance(owner.address, escrow.address).call() == 0
    assert escrow.functions.grantOf(grant_id).call()[7:9] == [7 * USDC, USDC]
