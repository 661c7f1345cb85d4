"""A reorg deeper than ``confirmations`` removes a transaction the node had counted final: it is sent again.

Real anvil (``anvil_reorg``), a real transcode, the node's HTTP API. With the devnet's one confirmation,
a one-block reorg is already past the node's finality rule; the node must notice that its wallet's nonce
went back, send the same bytes again, and pay the provider exactly once, and the next job's transaction
must not queue behind a nonce gap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_utils.address import to_checksum_address

from core.config import load_config
from payments import devnet
from payments.keys import Signer
from requester.client import NodeClient
from sandbox.ffmpeg import make_test_clip
from tests.conftest import live
from tests.payments.paid import PaidHome, paid_envelope, paid_home, quote_and_fund, receipt_for, wait_for

SMALL = {"timeout_seconds": 120, "max_output_mb": 20, "cpus": 0.5, "memory_mb": 256, "gpus": 0}


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


def _receipt_block(ph: PaidHome, tx_hash: str) -> int | None:
    from web3.exceptions import TransactionNotFound

    try:
        return int(ph.w3.eth.get_transaction_receipt(tx_hash)["blockNumber"])  # type: ignore[arg-type]
    except TransactionNotFound:
        return None


async def _eventually(check: Any, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def test_a_final_release_removed_by_a_reorg_is_sent_again_and_pays_once(
    ph: PaidHome, requester: Signer, clip: Path
) -> None:
    chain = load_config(ph.home).chain
    assert chain is not None and chain.confirmations == 1  # the devnet's: one block is final
    before = ph.balances()
    async with live(ph.home) as node, NodeClient(node.url) as client:
        cid = (await client.put_blob(clip))["cid"]
        job, terms = await quote_and_fund(
            client, node.did, requester, ph, paid_envelope(ph, "deep-1", cid, limits=SMALL)
        )
        assert (await wait_for(client, job, {"completed", "failed"}))["state"] == "completed"
        body = await receipt_for(client, job, terms, ph.validator)
        amount = int(body["receipt"]["amount"])
        await client.post_receipt(job, body)
        view = await wait_for(client, job, {"settled"})
        release = view["payment"]["settlement"]["tx"]
        assert release["state"] == "confirmed"
        escrow_id = terms.to_json()["escrow_job_id"]
        assert ph.released_events(escrow_id) == 1

        # the block holding the final release is replaced by an empty one: the provider is unpaid again
        depth = ph.w3.eth.block_number - release["block_number"] + 1
        assert ph.w3.provider.make_request("anvil_reorg", [depth, []]).get("error") is None  # type: ignore[arg-type]
        assert _receipt_block(ph, release["hash"]) is None
        assert ph.released_events(escrow_id) == 0

        await _eventually(
            lambda: _receipt_block(ph, release["hash"]) is not None, "the release was not resent"
        )
        await _eventually(lambda: ph.released_events(escrow_id) == 1, "no Released event after the resend")
        await _eventually(
            lambda: node.node.journal.txs(job)[-1].state == "confirmed", "the resent release was not resolved"
        )
        txs = (await client.status(job))["job"]["payment"]["txs"]
        assert (await client.status(job))["job"]["state"] == "settled"
        assert [(t["purpose"], t["hash"], t["state"]) for t in txs if t["purpose"] == "release"] == [
            ("release", release["hash"], "confirmed")
        ]  # the same bytes, one record: never a second release
        events = node.node.journal.events(job)
        assert sum(1 for e in events if e.to_state == "settled") == 1
        assert any("reorged out after it was final" in e.reason for e in events)

        # the wallet's nonce is whole again: the next job's funding lands instead of queueing behind a gap
        second, _ = await quote_and_fund(
            client, node.did, requester, ph, paid_envelope(ph, "deep-2", cid, limits=SMALL)
        )
        view = await wait_for(client, second, {"running", "completed", "failed", "expired"}, limit=60)
        assert view["payment"]["funding"]["state"] == "funded", view["payment"]
        await wait_for(client, second, {"completed", "failed"})

    after = ph.balances()
    assert after["provider"] - before["provider"] == amount
    assert (
        ph.w3.eth.get_transaction_count(to_checksum_address(ph.node_wallet.address)) == 3
    )  # fund, release, fund
