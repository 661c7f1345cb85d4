"""Jobs funded from a spending grant, on a real devnet (anvil) and a real node over HTTP (DESIGN §12).

The devnet payer is the grant's owner and opens grants the way ``hearth grant open`` does; a fresh agent
key (no USDC, no gas) requests jobs as ``did:pkh`` and signs each ``Spend``; the node checks the grant on
chain, simulates ``fundFromGrant``, accepts, and submits it through its transaction outbox.

- A grant-funded transcode runs, the validator's receipt releases it: the provider is paid, the owner
  paid exactly that, the agent paid nothing and sent nothing, the grant counts the spend.
- Refusals before acceptance, each with no side effect (the job stays ``priced``, no payment is
  recorded, no transaction sent, and the same signed request is judged the same way again, so its jti
  was not recorded): a spend signed by another key, a request by another agent, a spend for other terms,
  an unknown grant, a payer other than the grant's owner; a revoked, an expiring, an over-cap and an
  exhausted grant are 402s saying what is left.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from web3 import Web3

from core.config import load_config
from payments import devnet
from payments.grant_owner import GrantOwner
from payments.keys import EthSigner
from requester.client import NodeClient, NodeError, sign_request
from sandbox.ffmpeg import make_test_clip
from tests.conftest import LiveNode, live
from tests.payments.paid import (
    PaidHome,
    grant_events,
    grant_spend,
    grant_view,
    open_grant,
    paid_envelope,
    paid_home,
    quote_for_grant,
    receipt_for,
    wait_for,
)

DEVNET_CHAIN_ID = 31337


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_clip(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=1, width=160, height=120)


@pytest.fixture
def ph(tmp_path: Path, sandbox_images: dict[str, str]) -> Iterator[PaidHome]:
    home = paid_home(tmp_path / "home", {"scheduler": {"paused": False}})
    try:
        yield home
    finally:
        devnet.stop(home.home)


@pytest.fixture
async def node(ph: PaidHome) -> AsyncIterator[LiveNode]:
    async with live(ph.home) as ln:
        yield ln


def _agent() -> EthSigner:
    return EthSigner.generate(DEVNET_CHAIN_ID)


async def test_a_grant_funded_job_runs_and_is_released_the_owner_pays_the_agent_nothing(
    node: LiveNode, ph: PaidHome, clip: Path
) -> None:
    agent = _agent()
    async with NodeClient(node.url) as client:
        cid = (await client.put_blob(clip))["cid"]
        env = paid_envelope(ph, "grant-paid-1", cid)
        quote, terms = await quote_for_grant(client, node.did, agent, env)
        grant = await open_grant(ph, agent, per_job=terms.amount, per_period=2 * terms.amount)
        before = ph.balances()
        body = await client.submit(
            sign_request(agent, node.did, {"job": env}), quote, grant_spend(agent, grant, terms)
        )
        job = str(body["job"]["id"])
        assert body["accepted_now"] is True and body["job"]["requester"] == agent.did
        view = await wait_for(client, job, {"completed", "failed", "expired"})
        assert view["state"] == "completed", view
        funding = view["payment"]["funding"]
        assert funding["state"] == "funded" and funding["grant"] == str(grant)
        assert funding["tx"]["purpose"] == "fund" and funding["tx"]["state"] == "confirmed"

        receipt = await receipt_for(client, job, terms, ph.validator)
        amount = int(receipt["receipt"]["amount"])
        assert (await client.post_receipt(job, receipt))["job"]["state"] == "validated"
        view = await wait_for(client, job, {"settled"})
        assert view["payment"]["settlement"]["tx"]["state"] == "confirmed"

    after = ph.balances()
    assert after["provider"] - before["provider"] == amount
    assert before["payer"] - after["payer"] == amount  # the owner paid; the rest of the quote went back
    assert after["escrow"] == before["escrow"]
    assert (
        ph.w3.eth.get_transaction_count(Web3.to_checksum_address(agent.address)) == 0
        and ph.token_balance(agent.address) == 0
    )
    escrow_job = terms.to_json()["escrow_job_id"]
    spent = grant_events(ph, "GrantSpent", grantId=grant)
    assert [(bytes(e["args"]["jobId"]).hex(), e["args"]["amount"]) for e in spent] == [
        (escrow_job[2:], terms.amount)
    ]
    assert ph.escrow_job(escrow_job) == (2, terms.terms_hash)  # released, and funded with the quote's terms
    funded = ph.funded(escrow_job)
    assert funded is not None and funded["payer"] == ph.payer.address  # the entry's payer is the owner
    assert ph.released_events(escrow_job) == 1
    assert grant_view(ph, grant)[7] == terms.amount  # spent this period: the quote, held when funded
    txs = node.node.journal.txs(job)
    assert sorted((tx.purpose, tx.state) for tx in txs) == [("fund", "confirmed"), ("release", "confirmed")]


async def _refused(client: NodeClient, token: str, quote: str, funding: dict[str, Any]) -> dict[str, Any]:
    """POST the acceptance; it must be refused. The refusal's error body."""
    with pytest.raises(NodeError) as info:
        await client.submit(token, quote, funding)
    exc = info.value
    assert exc.domain == "funding", exc.body
    return {"status": exc.status, "code": exc.code, "details": exc.details, "retryable": exc.retryable}


async def _no_side_effect(
    node: LiveNode, client: NodeClient, token: str, quote: str, funding: dict[str, Any], code: str
) -> dict[str, Any]:
    """The acceptance is refused with ``code``, twice with the same token (its jti was not recorded), and
    left nothing: the job is still only priced, with no payment and no transaction."""
    first = await _refused(client, token, quote, funding)
    assert first["code"] == code, first
    again = await _refused(client, token, quote, funding)
    assert again["code"] == code, again  # not replayed_jti
    journal = node.node.journal
    for record in journal.list_jobs(limit=1000):
        if record.job_id.startswith("grant-refused"):
            assert record.state == "priced", (record.id, record.state)
            assert journal.payment(record.id) is None
            assert journal.txs(record.id) == []
    return first


async def test_grant_refusals_before_acceptance_leave_no_trace(
    node: LiveNode, ph: PaidHome, clip: Path
) -> None:
    agent, stranger = _agent(), _agent()
    async with NodeClient(node.url) as client:
        cid = (await client.put_blob(clip))["cid"]
        env = paid_envelope(ph, "grant-refused-1", cid)
        quote, terms = await quote_for_grant(client, node.did, agent, env)
        price = terms.amount
        grant = await open_grant(ph, agent, per_job=price, per_period=price + price // 2)
        token = sign_request(agent, node.did, {"job": env})

        # a spend signed by a key that is not the grant's agent
        forged = grant_spend(stranger, grant, terms)
        err = await _no_side_effect(node, client, token, quote, forged, "grant_spend_signature_invalid")
        assert err["status"] == 422 and err["details"]["agent"] == agent.address
        # a job requested by another key than the grant's agent (even with the agent's spend)
        s_env = paid_envelope(ph, "grant-refused-2", cid)
        s_quote, s_terms = await quote_for_grant(client, node.did, stranger, s_env)
        err = await _no_side_effect(
            node,
            client,
            sign_request(stranger, node.did, {"job": s_env}),
            s_quote,
            grant_spend(agent, grant, s_terms),
            "grant_not_agent",
        )
        assert err["status"] == 403 and err["details"]["agent"] == agent.address
        # a spend for other terms than the quote's
        other = {**grant_spend(agent, grant, terms)}
        other["spend"] = {**other["spend"], "amount": str(price - 1)}
        err = await _no_side_effect(node, client, token, quote, other, "grant_spend_mismatch")
        assert [m["field"] for m in err["details"]["mismatches"]] == ["amount"]
        # a grant the escrow does not know
        err = await _no_side_effect(
            node, client, token, quote, grant_spend(agent, 10_000, terms), "grant_unknown"
        )
        # an envelope whose payer is not the grant's owner
        p_env = {**paid_envelope(ph, "grant-refused-3", cid)}
        p_env["payment"] = {**p_env["payment"], "payer": ph.validator.address}
        p_quote, p_terms = await quote_for_grant(client, node.did, agent, p_env)
        err = await _no_side_effect(
            node,
            client,
            sign_request(agent, node.did, {"job": p_env}),
            p_quote,
            grant_spend(agent, grant, p_terms),
            "grant_owner_not_payer",
        )
        assert err["details"]["owner"] == ph.payer.address

        # over the per-job cap: a grant whose per-job cap is one base unit under the price
        small = await open_grant(ph, agent, per_job=price - 1, per_period=10 * price)
        err = await _no_side_effect(
            node, client, token, quote, grant_spend(agent, small, terms), "grant_exceeds_job_cap"
        )
        assert err["status"] == 402 and err["details"]["per_job_max"] == str(price - 1)
        # a grant that ends within the node's margin
        ending = await open_grant(ph, agent, per_job=price, per_period=price, expires_in=20)
        err = await _no_side_effect(
            node, client, token, quote, grant_spend(agent, ending, terms), "grant_expired"
        )
        assert err["status"] == 402 and err["details"]["expiry"] <= time.time() + 20

        # exhausted: a first job takes the period's money, a second finds half a price left
        first = paid_envelope(ph, "grant-first-1", cid)
        f_quote, f_terms = await quote_for_grant(client, node.did, agent, first)
        body = await client.submit(
            sign_request(agent, node.did, {"job": first}), f_quote, grant_spend(agent, grant, f_terms)
        )
        await wait_for(client, str(body["job"]["id"]), {"running", "completed"})
        err = await _no_side_effect(
            node, client, token, quote, grant_spend(agent, grant, terms), "grant_exhausted"
        )
        left = price + price // 2 - f_terms.amount
        assert err["status"] == 402 and err["retryable"] is False
        assert err["details"]["left_this_period"] == str(left)
        assert err["details"]["per_job_max"] == str(price)
        assert err["details"]["period_ends"] > time.time()
        # the first job's acceptance again, with its spend: the job as it is, not a refusal
        again = await client.submit(
            sign_request(agent, node.did, {"job": first}), f_quote, grant_spend(agent, grant, f_terms)
        )
        assert again["accepted_now"] is False and again["job"]["id"] == body["job"]["id"]

        # revoked by its owner: refused, saying so
        cfg = load_config(ph.home).chain
        assert cfg is not None
        owner = GrantOwner(cfg, ph.payer)
        try:
            await owner.revoke(grant)
        finally:
            await owner.close()
        err = await _no_side_effect(
            node, client, token, quote, grant_spend(agent, grant, terms), "grant_revoked"
        )
        assert err["status"] == 402 and err["details"]["revoked"] is True
        assert err["details"]["left_this_period"] == "0"

    assert len(grant_events(ph, "GrantSpent")) == 1  # the first job's, and nothing else
    assert ph.w3.eth.get_transaction_count(Web3.to_checksum_address(agent.address)) == 0
