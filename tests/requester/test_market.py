"""Provider discovery on a real devnet (anvil, the committed HearthRegistry and escrow) with real nodes
serving their signed offers: the binding both ways (DID, payout wallet, endpoint, chain), what an
endpoint may be, how long and how much a stranger's answer may take, and :func:`requester.market.fits`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from payments import devnet
from requester.market import Discovery, discover
from requester.reputation import Reputation
from tests.payments.paid import PaidHome, paid_home
from tests.requester.marketnet import Market, serving


@pytest.fixture(scope="module")
def ph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidHome]:
    home = paid_home(tmp_path_factory.mktemp("market") / "devnet")
    try:
        yield home
    finally:
        devnet.stop(home.home)


@pytest.fixture
async def market(ph: PaidHome, tmp_path: Path) -> AsyncIterator[Market]:
    m = Market(ph, tmp_path)
    try:
        yield m
    finally:
        await m.close()


def reasons(found: Discovery) -> dict[str, str]:
    """Dropped wallets and their reason codes."""
    return {d.wallet: d.reason for d in found.dropped}


async def test_bound_providers_are_kept_and_a_squatter_is_dropped(market: Market, ph: PaidHome) -> None:
    a, b = market.node_home(), market.node_home()
    squatter = market.wallet()
    async with serving(a) as node_a, serving(b) as node_b:
        await market.register(a.wallet, node_a.did, a.url)
        await market.register(b.wallet, node_b.did, b.url + "/")  # a trailing slash is the same endpoint
        await market.register(squatter, node_a.did, a.url)  # someone else's DID and endpoint
        progress: list[tuple[int, int]] = []
        rep = {a.wallet.address: Reputation(a.wallet.address, jobs_funded=3, jobs_released=2, earned=5)}
        found = await discover(
            market.registry,
            chain_id=ph.net.chain_id,
            escrow=ph.net.escrow,
            allow_private=True,
            on_progress=lambda done, total: progress.append((done, total)),
            reputation=rep,
        )
    assert [(p.wallet, p.did) for p in found.providers] == [
        (a.wallet.address, node_a.did),
        (b.wallet.address, node_b.did),
    ]
    assert reasons(found) == {squatter.address: "wallet_mismatch"}
    assert found.registered == 3 and found.unread == 0 and found.registry == market.address
    assert found.fetched == 2  # a.url, listed twice, is asked once (b's slash is its own listing's string)
    assert progress[0] == (0, 2) and progress[-1] == (2, 2)
    kept_a, kept_b = found.providers
    assert kept_a.offer["payout_address"] == a.wallet.address and kept_a.offer["endpoint"] == a.url
    assert kept_a.offer["payment"]["escrow"] == ph.net.escrow and "jwt" in kept_a.offer
    assert kept_a.reputation == rep[a.wallet.address]
    assert kept_b.reputation == Reputation(b.wallet.address)  # no history: an empty record
    doc = json.loads(json.dumps(found.to_json()))
    assert doc["block"] == found.block and len(doc["providers"]) == 2
    assert (
        doc["dropped"][0]["reason"] == "wallet_mismatch"
        and doc["providers"][0]["reputation"]["earned"] == "5"
    )
