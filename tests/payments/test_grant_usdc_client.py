"""The Python side of spending grants against Circle's own USDC (FiatToken v2.2), not only TestUSDC.

The owner's ``hearth grant open --permit`` path (:class:`payments.grant_owner.GrantOwner`) signs its
EIP-2612 permit in USDC's domain ("USD Coin", version "2") and opens the grant in one transaction; the
node's checks (:func:`payments.grant_terms.check_grant_funding`: grantOf, the agent's Spend, the
simulation) pass for a spend within the caps, its ``fundFromGrant`` pulls 6-decimal USDC from the owner
into an entry whose payer is the owner, and the next spend over what is left is a 402 saying so.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from web3 import Web3
from web3.contract import Contract

from core.config import ChainSection
from core.errors import FundingError
from node.http_errors import status_of
from payments.chain import Chain as NodeChain
from payments.chain import EscrowStatus
from payments.grant_owner import GrantOwner, GrantTerms
from payments.grant_terms import check_grant_funding, grant_fund_call
from payments.grants import Spend, sign_spend
from payments.keys import EthSigner
from payments.receipts import FundingTerms
from tests.payments.contracts.chain import CHAIN_ID, Chain, anvil
from tests.payments.contracts.fiat_token import USDC_DECIMALS, USDC_NAME, deploy_usdc, require_package

USDC = 10**USDC_DECIMALS
DAY = 86_400


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


def _funded_key(chain: Chain) -> EthSigner:
    signer = EthSigner(secrets.token_bytes(32), CHAIN_ID)
    chain.rpc("anvil_setBalance", signer.address, hex(10**18))
    return signer


def _terms(cfg: ChainSection, payer: str, provider: str, amount: int, deadline: int) -> FundingTerms:
    return FundingTerms(
        chain_id=CHAIN_ID,
        escrow=cfg.escrow,
        token=cfg.token,
        token_name=cfg.token_name,
        job_id=secrets.token_bytes(32),
        payer=payer,
        provider=provider,
        validator=Web3.to_checksum_address("0x" + "5" * 40),
        amount=amount,
        deadline=deadline,
    )


async def test_grant_open_with_a_usdc_permit_then_a_node_checks_and_sends_the_spend(
    chain: Chain, usdc: Contract, escrow: Contract
) -> None:
    owner, node, agent = _funded_key(chain), _funded_key(chain), EthSigner.generate(CHAIN_ID)
    chain.transact(usdc.functions.mint(owner.address, 10 * USDC), chain.deployer)
    cfg = ChainSection(
        rpc_url=chain.w3.provider.endpoint_uri,  # type: ignore[attr-defined]
        chain_id=CHAIN_ID,
        escrow=escrow.address,
        token=usdc.address,
        token_name=USDC_NAME,
    )
    now = chain.now()
    grant_terms = GrantTerms(
        agent=agent.address,
        per_job_max=2 * USDC,
        period_max=3 * USDC,
        period_seconds=DAY,
        expiry=now + 2 * DAY,
    )
    owner_client = GrantOwner(cfg, owner)
    try:
        opened = await owner_client.open(grant_terms, permit=True)
    finally:
        await owner_client.close()
    grant_id = int(opened["grant"]["grant"])
    assert [t["purpose"] for t in opened["txs"]] == ["openGrantWithPermit"]
    assert usdc.functions.allowance(owner.address, escrow.address).call() == int(opened["allowance"]) > 0
    assert usdc.functions.nonces(owner.address).call() == 1  # USDC took the permit

    node_chain = NodeChain(cfg, node)
    try:
        terms = _terms(cfg, owner.address, node.address, 2 * USDC, now + 3600)
        doc = sign_spend(agent, chain_id=CHAIN_ID, escrow=cfg.escrow, spend=Spend.for_terms(grant_id, terms))
        funding = await check_grant_funding(cfg, node_chain, terms, doc.to_json(), iss=agent.did, now=now)
        nonce = await node_chain.nonce()
        tx_hash, raw = await node_chain.sign(grant_fund_call(node_chain, funding), nonce, domain="funding")
        assert await node_chain.broadcast(raw) is None
        assert (await node_chain.wait_receipt(tx_hash, 30))["status"] == 1
        entry = await node_chain.escrow_job(terms.job_id)
        # open, with exactly the quote's terms: the owner pays 2 USDC
        assert entry.status == EscrowStatus.OPEN and entry.terms_hash == terms.terms_hash
        assert usdc.functions.balanceOf(owner.address).call() == 8 * USDC

        more = _terms(cfg, owner.address, node.address, 2 * USDC, now + 3600)
        doc = sign_spend(agent, chain_id=CHAIN_ID, escrow=cfg.escrow, spend=Spend.for_terms(grant_id, more))
        with pytest.raises(FundingError) as info:
            await check_grant_funding(cfg, node_chain, more, doc.to_json(), iss=agent.did, now=chain.now())
        assert info.value.code == "grant_exhausted" and status_of(info.value) == 402
        assert info.value.details["left_this_period"] == str(USDC)
    finally:
        await node_chain.close()
