"""``hearth market providers`` on a real devnet: the registry and chain from ``--home``'s node.toml (as
``hearth devnet`` writes them), a real node registered by its wallet, a squatter, reputation from a job the
escrow funded; the table, ``--json``, the filters and the refusals.

The CLI runs in a worker thread (``main`` runs its own event loop) while the node serves in the test's.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from cli.main import main
from cli.market import short_did
from core.config import load_config
from payments import devnet
from payments.escrow_build import load_artifact
from requester.reputation import default_path
from tests.conftest import write_home
from tests.payments.paid import PaidHome, paid_home
from tests.requester.marketnet import Market, serving


@pytest.fixture
def ph(tmp_path: Path) -> Iterator[PaidHome]:
    home = paid_home(tmp_path / "requester")
    try:
        yield home
    finally:
        devnet.stop(home.home)


@pytest.fixture
async def market(ph: PaidHome, tmp_path: Path) -> AsyncIterator[Market]:
    registry = load_config(ph.home).market.registry
    assert registry == ph.net.registry  # what `hearth devnet` wrote: the command's default
    m = Market(ph, tmp_path, registry)
    try:
        yield m
    finally:
        await m.close()


def fund_job(ph: PaidHome, provider: str, amount: int) -> None:
    """The devnet's payer funds an escrow job for ``provider`` (approve + fund), then 5 blocks are mined so
    the reputation scan (3 confirmations) sees it."""
    token = ph.w3.eth.contract(address=ph.net.token, abi=load_artifact("TestUSDC").abi)
    escrow = ph.w3.eth.contract(address=ph.net.escrow, abi=load_artifact("HearthEscrow").abi)
    deadline = ph.w3.eth.get_block("latest")["timestamp"] + 3600
    calls = (
        token.functions.approve(ph.net.escrow, amount),
        escrow.functions.fund(secrets.token_bytes(32), provider, ph.validator.address, amount, deadline),
    )
    for call in calls:
        nonce = ph.w3.eth.get_transaction_count(ph.payer.address)
        tx = call.build_transaction({"from": ph.payer.address, "nonce": nonce})
        signed = Account.sign_transaction(tx, ph.payer.private_key_bytes())
        receipt = ph.w3.eth.wait_for_transaction_receipt(
            ph.w3.eth.send_raw_transaction(signed.raw_transaction)
        )
        assert receipt["status"] == 1
    ph.w3.provider.make_request("anvil_mine", [5])  # type: ignore[arg-type]


async def hearth(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_providers_lists_the_bound_provider_with_reputation_and_the_squatter_left_out(
    market: Market, ph: PaidHome, capsys: pytest.CaptureFixture[str]
) -> None:
    a = market.node_home()
    squatter, prankster = market.wallet(), market.wallet()
    fund_job(ph, a.wallet.address, 1_500_000)
    home = str(ph.home)
    async with serving(a) as node:
        await market.register(a.wallet, node.did, a.url)
        await market.register(squatter, node.did, a.url)

        code, out, err = await hearth(
            capsys, "market", "providers", "--home", home, "--json", "--allow-private-endpoints"
        )
        assert code == 0, err
        doc: dict[str, Any] = json.loads(out)
        assert doc["registry"] == ph.net.registry and doc["chain_id"] == ph.net.chain_id
        assert doc["escrow"] == ph.net.escrow and doc["registered"] == 2 and doc["unread"] == 0
        [kept] = doc["providers"]
        assert (kept["wallet"], kept["did"], kept["endpoint"]) == (a.wallet.address, node.did, a.url)
        assert kept["reputation"]["jobs_funded"] == 1 and kept["reputation"]["jobs_open"] == 1
        assert [(d["wallet"], d["reason"]) for d in doc["dropped"]] == [(squatter.address, "wallet_mismatch")]
        assert "offers 1/1" in err and "reputation: block" in err
        assert default_path(ph.home).exists()

        code, out, err = await hearth(
            capsys, "market", "providers", "--home", home, "--allow-private-endpoints"
        )
        assert code == 0, err
        assert short_did(node.did) in out and a.url in out and "ffmpeg_transcode" in out
        assert "0 settled, 0% failed, 0 USDC, 1 open" in out
        assert "left out (1):" in out and "wallet_mismatch" in out and "1 of 2 registered providers" in out

        code, out, _ = await hearth(
            capsys, "market", "providers", "--home", home, "--json", "--allow-private-endpoints",
            "--kind", "vllm_batch", "--model", "no-such-model", "--no-reputation",
        )  # fmt: skip
        doc = json.loads(out)
        assert code == 0 and doc["providers"] == []
        assert {d["wallet"]: d["reason"] for d in doc["dropped"]} == {
            a.wallet.address: "no_model",
            squatter.address: "wallet_mismatch",
        }

        # What the chain says is printed as text: no terminal escapes, no rich markup or emoji codes.
        await market.register(prankster, "did:key:[red]z6Mk:key:", "http://192.0.2.1/\x1b[2J[bold]hi\u202e")
        code, out, _ = await hearth(capsys, "market", "providers", "--home", home)  # 127.0.0.1 is private
        assert code == 0
        assert out.count("endpoint_refused") == 3 and "--allow-private-endpoints" in out
        assert "\x1b" not in out and "\u202e" not in out and "did:key:[red]" in out
        assert "192.0.2.1/\\x1b[2J[bold]hi\\u202e" in out

    code, _, err = await hearth(capsys, "market", "providers", "--home", home, "--registry", "0x12")
    assert code == 2 and "not an address" in err


async def test_providers_needs_a_registry_and_an_rpc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = write_home(tmp_path / "bare")
    code, _, err = await hearth(capsys, "market", "providers", "--home", str(home))
    assert code == 2 and "no registry" in err
    code, _, err = await hearth(
        capsys, "market", "providers", "--home", str(home), "--registry", "0x" + "1" * 40
    )
    assert code == 2 and "no chain RPC" in err


async def test_reputation_lists_every_registered_wallet_and_the_unregistered_ones_the_escrow_names(
    market: Market, ph: PaidHome, capsys: pytest.CaptureFixture[str]
) -> None:
    a = market.node_home()
    squatter, stranger = market.wallet(), market.wallet()
    fund_job(ph, a.wallet.address, 1_500_000)
    fund_job(ph, a.wallet.address, 500_000)
    fund_job(ph, stranger.address, 700_000)  # paid for but never listed
    await market.register(a.wallet, "did:key:z6MkA", a.url)
    await market.register(squatter, "did:key:z6MkA", a.url)
    home = str(ph.home)

    code, out, err = await hearth(capsys, "market", "reputation", "--home", home, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["escrow"], doc["chain_id"], doc["registry"]) == (
        ph.net.escrow,
        ph.net.chain_id,
        ph.net.registry,
    )
    rows = {row["wallet"]: row for row in doc["providers"]}
    assert set(rows) == {a.wallet.address, squatter.address, stranger.address}
    assert rows[a.wallet.address]["registered"] and rows[a.wallet.address]["endpoint"] == a.url
    assert rows[a.wallet.address]["reputation"]["jobs_funded"] == 2
    assert rows[a.wallet.address]["reputation"]["distinct_payers"] == 1
    # the squatter named the same DID, but the escrow never funded a job for its wallet
    assert rows[squatter.address]["registered"] and rows[squatter.address]["reputation"]["jobs_funded"] == 0
    assert not rows[stranger.address]["registered"] and rows[stranger.address]["did"] is None
    assert rows[stranger.address]["reputation"]["jobs_funded"] == 1

    code, out, err = await hearth(capsys, "market", "reputation", "--home", home)
    assert code == 0, err
    assert a.wallet.address in out and "(not registered)" in out and "reputation from escrow" in out

    code, _, err = await hearth(capsys, "market", "reputation", "--home", home, "--escrow", "0xzz")
    assert code == 2 and "--escrow" in err
