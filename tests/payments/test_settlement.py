"""The node is paid only against funded escrow and a validator's receipt: real anvil, real transcodes.

Each test runs an in-process node whose ``[chain]`` points at a devnet (``payments.devnet.up``) and drives
it over HTTP the way a requester and a validator would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from payments import devnet
from payments.credentials import issue_credential
from payments.keys import Signer
from payments.receipts import FundingTerms, Receipt
from requester.client import NodeClient, NodeError, sign_request
from sandbox.ffmpeg import make_test_clip
from tests.conftest import LiveNode, live
from tests.payments.paid import (
    PaidHome,
    paid_envelope,
    paid_home,
    quote_and_fund,
    receipt_for,
    set_chain,
    wait_for,
)

RUN = {"scheduler": {"paused": False}}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_clip(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=2, width=320, height=240)


@pytest.fixture
def ph(tmp_path: Path, sandbox_images: dict[str, str]) -> Iterator[PaidHome]:
    home = paid_home(tmp_path / "home", RUN, chain={"funding_timeout_seconds": 30})
    try:
        yield home
    finally:
        devnet.stop(home.home)


@pytest.fixture
async def node(ph: PaidHome) -> AsyncIterator[LiveNode]:
    async with live(ph.home) as ln:
        yield ln


async def test_gasless_funding_transcode_receipt_and_release_pay_the_provider_exactly_once(
    node: LiveNode, ph: PaidHome, requester: Signer, clip: Path
) -> None:
    before = ph.balances()
    async with NodeClient(node.url) as client:
        cid = (await client.put_blob(clip))["cid"]
        env = paid_envelope(ph, "paid-1", cid)
        job, terms = await quote_and_fund(client, node.did, requester, ph, env)
        assert terms.provider == ph.node_wallet.address and terms.validator == ph.validator.address
        view = await wait_for(client, job, {"completed", "failed", "expired"})
        assert view["state"] == "completed", view
        payment = view["payment"]
        assert payment["funding"]["state"] == "funded" and payment["funding"]["gasless"] is True
        assert payment["funding"]["tx"]["state"] == "confirmed"
        # the payer paid no gas: the node sent fundWithAuthorization
        assert ph.w3.eth.get_transaction_count(ph.payer.address) == 0

        body = await receipt_for(client, job, terms, ph.validator)
        # the receipt also travels as a W3C Verifiable Credential, which the node verifies with didkit
        body["credential"] = await issue_credential(
            ph.validator, Receipt.from_json(body["receipt"]), bytes.fromhex(body["signature"][2:])
        )
        amount = int(body["receipt"]["amount"])
        assert 0 < amount <= terms.amount
        answer = await client.post_receipt(job, body)
        assert answer["job"]["state"] == "validated"
        again = await client.post_receipt(job, body)  # the same receipt twice is idempotent
        assert again["job"]["state"] in ("validated", "settled")
        view = await wait_for(client, job, {"settled"})
        release = view["payment"]["settlement"]["tx"]
        assert release["purpose"] == "release" and release["state"] == "confirmed"

    after = ph.balances()
    assert after["provider"] - before["provider"] == amount
    assert before["payer"] - after["payer"] == amount  # the remainder of the quote went back
    assert after["escrow"] == before["escrow"] == 0
    assert ph.released_events(terms.to_json()["escrow_job_id"]) == 1
    metrics = node.node.metrics.render().decode()
    assert f"hearth_earnings_usdc_total {amount / 1_000_000}" in metrics
    assert 'hearth_gas_spent_wei_total{purpose="release"}' in metrics


async def test_an_unfunded_job_waits_then_expires_and_never_runs(
    ph: PaidHome, requester: Signer, clip: Path, tmp_path: Path
) -> None:
    set_chain(ph.home, funding_timeout_seconds=2)
    async with live(ph.home) as node, NodeClient(node.url) as client:
        cid = (await client.put_blob(clip))["cid"]
        env = paid_envelope(ph, "unfunded-1", cid)
        body = await client.submit(sign_request(requester, node.did, {"job": env}))
        job = body["job"]["id"]
        view = await wait_for(client, job, {"expired", "running", "completed"}, limit=30)
        assert view["state"] == "expired"
        assert view["payment"]["funding"]["state"] == "refused"
        events = node.node.journal.events(job)
        assert not any(e.to_state == "running" for e in events)
        assert job not in {hold.key for hold in node.node.ledger.holds()}  # its capacity was given back


async def test_quotes_refuse_payment_terms_the_node_cannot_take(
    node: LiveNode, ph: PaidHome, requester: Signer
) -> None:
    cases = {
        "chain_id": {"chain_id": 1},
        "escrow": {"escrow": "0x" + "1" * 40},
        "validator": {"validator": "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"},
    }
    async with NodeClient(node.url) as client:
        for name, change in cases.items():
            env = paid_envelope(
                ph, f"terms-{name}", "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
            )
            env["payment"].update(change)
            with pytest.raises(NodeError) as info:
                await client.quote(sign_request(requester, node.did, {"job": env}))
            error = info.value.body["error"]
            assert info.value.status == 422 and error["code"] == "payment_terms_unsupported", error
            assert error["domain"] == "funding" and error["details"]["field"] == f"payment.{name}"


async def test_bad_receipts_are_refused_and_leave_the_job_completed_then_a_failing_one_refunds(
    node: LiveNode, ph: PaidHome, requester: Signer, clip: Path
) -> None:
    from payments.keys import new_eth

    before = ph.balances()
    async with NodeClient(node.url) as client:
        cid = (await client.put_blob(clip))["cid"]
        job, terms = await quote_and_fund(
            client, node.did, requester, ph, paid_envelope(ph, "disputed-1", cid)
        )
        assert (await wait_for(client, job, {"completed", "failed"}))["state"] == "completed"
        bad = {
            "receipt_signer_mismatch": await receipt_for(client, job, terms, new_eth(31337)),
            "receipt_digest_mismatch": await receipt_for(
                client, job, terms, ph.validator, result_digest=b"\x01" * 32
            ),
            "receipt_amount_above_quote": await receipt_for(
                client, job, terms, ph.validator, amount=terms.amount + 1
            ),
            "receipt_domain_mismatch": await receipt_for(client, job, terms, ph.validator, chain_id=1),
            "receipt_provider_mismatch": await receipt_for(
                client, job, terms, ph.validator, provider=ph.payer.address
            ),
        }
        failing = await receipt_for(client, job, terms, ph.validator, passed=False)
        wrapped_other = await receipt_for(client, job, terms, ph.validator)
        wrapped_other["credential"] = await issue_credential(
            ph.validator, Receipt.from_json(failing["receipt"]), bytes.fromhex(failing["signature"][2:])
        )
        bad["credential_mismatch"] = wrapped_other
        for code, body in bad.items():
            with pytest.raises(NodeError) as info:
                await client.post_receipt(job, body)
            assert info.value.status == 422 and info.value.body["error"]["code"] == code, info.value.body
        assert (await client.status(job))["job"]["state"] == "completed"

        assert (await client.post_receipt(job, failing))["job"]["state"] == "disputed"
        view = await wait_for(client, job, {"refunded"})
        assert view["payment"]["settlement"]["tx"]["purpose"] == "refund"
    after = ph.balances()
    assert after == before  # the payer got everything back; the provider got nothing


async def test_funding_and_release_count_only_once_they_are_n_blocks_deep(
    ph: PaidHome, requester: Signer, clip: Path
) -> None:
    set_chain(ph.home, confirmations=3)

    def mine(blocks: int) -> None:
        for _ in range(blocks):
            ph.w3.provider.make_request("evm_mine", [])

    async def tx_state(client: NodeClient, job: str, purpose: str, want: str) -> dict[str, object]:
        for _ in range(200):
            view = (await client.status(job))["job"]
            txs = [t for t in view["payment"]["txs"] if t["purpose"] == purpose]
            if txs and txs[-1]["state"] == want:
                return view  # type: ignore[no-any-return]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {purpose} tx reached {want}: {view['payment']}")

    async with live(ph.home) as node, NodeClient(node.url) as client:
        cid = (await client.put_blob(clip))["cid"]
        job, terms = await quote_and_fund(client, node.did, requester, ph, paid_envelope(ph, "deep-1", cid))
        await tx_state(client, job, "fund", "mined")
        await asyncio.sleep(1.0)  # several polls: one block deep is not funded
        view = (await client.status(job))["job"]
        assert view["state"] == "accepted" and view["payment"]["funding"]["state"] == "awaiting"
        mine(2)
        assert (await wait_for(client, job, {"completed", "failed"}))["state"] == "completed"

        await client.post_receipt(job, await receipt_for(client, job, terms, ph.validator))
        await tx_state(client, job, "release", "mined")
        await asyncio.sleep(1.0)
        assert (await client.status(job))["job"]["state"] == "validated"
        mine(2)
        view = await wait_for(client, job, {"settled"})
        assert view["payment"]["settlement"]["tx"]["state"] == "confirmed"


def _fund_directly(ph: PaidHome, terms: FundingTerms, amount: int) -> None:
    """The payer funds the escrow itself (approve + fund, paying gas) with ``amount``."""
    from eth_account import Account

    from payments.escrow_build import load_artifact

    token = ph.w3.eth.contract(address=ph.net.token, abi=load_artifact("TestUSDC").abi)
    escrow = ph.w3.eth.contract(address=ph.net.escrow, abi=load_artifact("HearthEscrow").abi)
    calls = (
        token.functions.approve(ph.net.escrow, amount),
        escrow.functions.fund(terms.job_id, terms.provider, terms.validator, amount, terms.deadline),
    )
    for call in calls:
        tx = call.build_transaction(
            {"from": ph.payer.address, "nonce": ph.w3.eth.get_transaction_count(ph.payer.address)}
        )
        signed = Account.sign_transaction(tx, ph.payer.private_key_bytes())
        receipt = ph.w3.eth.wait_for_transaction_receipt(
            ph.w3.eth.send_raw_transaction(signed.raw_transaction)
        )
        assert receipt["status"] == 1


async def test_a_payer_funding_the_escrow_itself_is_accepted_and_other_terms_fail_the_job(
    node: LiveNode, ph: PaidHome, requester: Signer, clip: Path
) -> None:
    async with NodeClient(node.url) as client:
        cid = (await client.put_blob(clip))["cid"]
        jobs = {}
        for name in ("exact", "short"):
            env = paid_envelope(ph, f"direct-{name}", cid)
            quote = await client.quote(sign_request(requester, node.did, {"job": env}))
            terms = FundingTerms.from_json(quote["quote"]["funding_terms"])
            body = await client.submit(sign_request(requester, node.did, {"job": env}), quote["jwt"])
            jobs[name] = (body["job"]["id"], terms)
        # in a thread: the node shares this event loop and must keep answering meanwhile
        await asyncio.to_thread(_fund_directly, ph, jobs["exact"][1], jobs["exact"][1].amount)
        await asyncio.to_thread(
            _fund_directly, ph, jobs["short"][1], jobs["short"][1].amount - 1
        )  # 1 unit short

        exact = await wait_for(client, jobs["exact"][0], {"completed", "failed", "expired"})
        assert exact["state"] == "completed" and exact["payment"]["funding"]["state"] == "funded"
        assert exact["payment"]["funding"]["gasless"] is False and exact["payment"]["txs"] == []
        short = await wait_for(client, jobs["short"][0], {"completed", "failed", "expired"})
        assert short["state"] == "failed" and short["failure"]["code"] == "funding_mismatch", short
        assert short["failure"]["domain"] == "funding" and short["payment"]["funding"]["state"] == "refused"
        assert not any(e.to_state == "running" for e in node.node.journal.events(jobs["short"][0]))
