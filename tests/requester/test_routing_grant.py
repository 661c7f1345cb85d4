"""Routing a job paid from a spending grant among real node daemons on a devnet (anvil, DESIGN §11, §12).

Three daemons (``hearth run``) listed in the devnet's registry, each with a wallet of its own: two that quote
0.012 and 0.015 USDC, and one that denies the agent by policy. The owner (the devnet payer) opens a grant for
a fresh agent key (no USDC, no gas). Routing quotes everywhere as the agent, the cheapest accepts the job
unfunded, and only then the agent's ``Spend`` is signed, for that node's terms: one ``GrantSpent``, one
escrow entry (payer: the owner), nothing at the others. Then the command: ``hearth job submit --market
--grant ID --agent-key K --wait``, and the same key again spends nothing. Last, ``hearth mcp`` through the
market (the SDK's client over stdio, then streamable HTTP): providers, uploads to each, quotes, submissions
until the grant's period cap on chain refuses the next one with what is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from web3 import Web3

from core.config import load_config
from core.envelope import node_job_id, parse_envelope
from payments import devnet
from payments.escrow_build import terms_hash
from payments.keys import EthSigner, save_key
from payments.receipts import escrow_job_id
from requester.market import Provider
from requester.routing import GrantFunder, route
from tests.conftest import REPO, DaemonProcess, free_port
from tests.payments.paid import PaidHome, grant_events, grant_view, open_grant, paid_envelope, paid_home
from tests.requester.marketnet import Market, NodeHome
from tests.requester.test_mcp import Agent, mcp_server
from tests.requester.test_routing_market import LIMITS, ROOMY, _wait_ready, offer_of, pricing, wait_funded

PRICED = {"a": "0.012", "b": "0.015"}
INPUT = "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"


@dataclass
class GrantNet:
    ph: PaidHome
    agent: EthSigner
    grant: int
    homes: dict[str, NodeHome]
    dids: dict[str, str]


async def _list(market: Market, homes: dict[str, NodeHome]) -> dict[str, str]:
    """Each node's DID, once it is registered at its endpoint by its wallet."""
    dids = {name: str((await offer_of(h.url))["node"]) for name, h in homes.items()}
    for name, h in homes.items():
        await market.register(h.wallet, dids[name], h.url)
    await market.close()
    return dids


@pytest.fixture(scope="module")
def gnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrantNet]:
    root = tmp_path_factory.mktemp("routing-grant")
    ph = paid_home(root / "devnet")
    agent = EthSigner.generate(ph.net.chain_id)
    daemons: list[DaemonProcess] = []
    try:
        market = Market(ph, root, address=ph.net.registry)
        configs = {
            **{name: {**pricing(price), "capacity": ROOMY} for name, price in PRICED.items()},
            "deny": {**pricing("0.010", deny_dids=[agent.did]), "capacity": ROOMY},
        }
        homes = {name: market.node_home(config=cfg) for name, cfg in configs.items()}
        daemons = [DaemonProcess(h.home, h.port) for h in homes.values()]
        for d in daemons:
            d.spawn()
        _wait_ready(daemons)
        dids = asyncio.run(_list(market, homes))
        grant = asyncio.run(open_grant(ph, agent, per_job=20_000, per_period=30_000))
        yield GrantNet(ph, agent, grant, homes, dids)
    finally:
        for d in daemons:
            d.stop()
        devnet.stop(ph.home)


def _spent(g: GrantNet) -> list[tuple[str, int]]:
    return [
        ("0x" + bytes(e["args"]["jobId"]).hex(), int(e["args"]["amount"]))
        for e in grant_events(g.ph, "GrantSpent", grantId=g.grant)
    ]


def _escrow_id(g: GrantNet, name: str, job_id: str) -> str:
    return "0x" + escrow_job_id(g.dids[name], node_job_id(g.agent.did, job_id)).hex()


async def test_routing_signs_the_agents_spend_for_the_accepting_node_only(gnet: GrantNet) -> None:
    g = gnet
    found = []
    for name, h in g.homes.items():
        offer = await offer_of(h.url)
        found.append(Provider(h.wallet.address, g.dids[name], h.url, offer))
    env = parse_envelope(paid_envelope(g.ph, "grant-route-1", INPUT, limits=LIMITS))
    decision = await route(env, g.agent, found, grant=GrantFunder(g.grant, g.agent))
    assert decision.outcome == "submitted", decision.to_json()
    assert decision.winner == g.dids["a"]
    by_did = {c.did: c for c in decision.candidates}
    assert (by_did[g.dids["deny"]].status, by_did[g.dids["deny"]].code) == ("refused", "did_denied")
    assert by_did[g.dids["b"]].status == "quoted"
    assert [(a.node, a.step, a.outcome) for a in decision.attempts] == [
        (g.dids["a"], "accept", "ok"),
        (g.dids["a"], "fund", "ok"),
    ]
    assert decision.job is not None and decision.job.funding is not None
    spend = decision.job.funding["grant"]
    assert spend["grant"] == str(g.grant) and spend["spend"]["amount"] == "12000"
    assert spend["spend"]["provider"].lower() == g.homes["a"].wallet.address.lower()
    view = await wait_funded(g.homes["a"].url, decision.job.id)
    funding = view["payment"]["funding"]
    assert funding["state"] == "funded" and funding["grant"] == str(g.grant)
    escrow_a = _escrow_id(g, "a", "grant-route-1")
    assert _spent(g) == [(escrow_a, 12_000)]
    funded = g.ph.funded(escrow_a)
    assert funded is not None and funded["payer"] == g.ph.payer.address  # the owner pays
    fields = (funded[k] for k in ("payer", "provider", "validator", "amount", "deadline"))
    assert g.ph.escrow_job(escrow_a)[1] == terms_hash(*fields)  # the hash of exactly the terms funded
    assert g.ph.escrow_job(_escrow_id(g, "b", "grant-route-1")) == (0, bytes(32))  # never funded
    assert grant_view(g.ph, g.grant)[7] == 12_000
    assert g.ph.w3.eth.get_transaction_count(Web3.to_checksum_address(g.agent.address)) == 0
    # the agent is the only one a grant-funded job may be requested by
    with pytest.raises(Exception, match="grant's agent"):
        await route(env, EthSigner.generate(g.ph.net.chain_id), found, grant=GrantFunder(g.grant, g.agent))


def _submit(g: GrantNet, tmp: Path, job_id: str, *extra: str) -> tuple[int, dict[str, Any]]:
    path = tmp / f"{job_id}.json"
    path.write_text(json.dumps(paid_envelope(g.ph, job_id, INPUT, limits=LIMITS)))
    key = tmp / "agent.key"
    if not key.exists():
        save_key(g.agent, key)
    argv = [
        "job", "submit", str(path), "--market", "--home", str(g.ph.home), "--allow-private-endpoints",
        "--grant", str(g.grant), "--agent-key", str(key), "--json",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *argv, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )
    return done.returncode, json.loads(done.stdout) if done.returncode != 2 else {
        "out": done.stdout + done.stderr
    }


async def test_job_submit_market_with_a_grant_waits_for_funding_and_a_replay_spends_nothing(
    gnet: GrantNet, tmp_path: Path
) -> None:
    g = gnet
    before = len(_spent(g))
    code, first = _submit(g, tmp_path, "grant-cli-1", "--idempotency-key", "G1", "--wait")
    assert code == 0, first
    assert first["decision"]["winner"] == g.dids["a"]
    assert first["status"]["job"]["payment"]["funding"]["state"] == "funded"
    assert first["status"]["job"]["payment"]["funding"]["grant"] == str(g.grant)
    code, again = _submit(g, tmp_path, "grant-cli-1", "--idempotency-key", "G1")
    assert code == 0 and again["idempotency"]["replayed"] is True, again
    assert again["decision"] == first["decision"]
    spent = _spent(g)
    assert len(spent) == before + 1 and spent[-1] == (_escrow_id(g, "a", "grant-cli-1"), 12_000)
    # a wallet beside the grant is a usage error, nothing sent
    code, doc = _submit(g, tmp_path, "grant-cli-2", "--wallet", str(tmp_path / "agent.key"))
    assert code == 2 and "two ways to pay" in doc["out"], doc


def _agent_home(g: GrantNet, root: Path) -> Path:
    """A requester home for ``hearth mcp`` through the market: the agent's key and grant, the registry."""
    (root / "requester").mkdir(parents=True)
    save_key(g.agent, root / "requester" / "agent.key")
    (root / "requester" / "requester.toml").write_text(
        f'[agent]\nkey_file = "agent.key"\ngrant = {g.grant}\nregistry = "{g.ph.net.registry}"\n'
        f'rpc_url = "{g.ph.net.rpc_url}"\nallow_private_endpoints = true\n'
    )
    chain = load_config(g.ph.home).chain
    assert chain is not None
    devnet.set_chain_config(root, chain)
    return root


async def test_hearth_mcp_routes_through_the_market_and_the_grant_cap_on_chain_refuses(
    gnet: GrantNet, tmp_path: Path
) -> None:
    g = gnet
    home = _agent_home(g, tmp_path / "agent")
    blob = tmp_path / "input.bin"
    blob.write_bytes(b"hearth input " * 100)
    async with mcp_server(home) as a:
        found = await a.ok("find_providers", kind="ffmpeg_transcode")
        assert {p["did"] for p in found["providers"]} == set(g.dids.values())
        prices = {p["did"]: p["prices"]["minimum_per_job"] for p in found["providers"]}
        assert Decimal(prices[g.dids["a"]]) == Decimal("0.012")
        bad = await a.refused("budget", workflow="two words")
        assert (bad["code"], bad["domain"]) == ("invalid_workflow", "request")
        put = await a.ok("put_input", path=str(blob), idempotency_key="blob-1")
        assert {s["did"] for s in put["stored_at"]} == set(g.dids.values()) and put["failed"] == []
        env = paid_envelope(g.ph, "mcp-market-1", INPUT, limits=LIMITS)
        quotes = (await a.ok("quote_job", envelope=env))["quotes"]
        asks = [(q["did"], Decimal(q["price"])) for q in quotes[:2]]
        assert asks == [(g.dids["a"], Decimal("0.012")), (g.dids["b"], Decimal("0.015"))]
        assert quotes[2]["did"] == g.dids["deny"] and quotes[2]["error"]["code"] == "did_denied"

        n = 0
        while 30_000 - int(grant_view(g.ph, g.grant)[7]) >= 12_000:  # spend what the period allows
            n += 1
            env = paid_envelope(g.ph, f"mcp-market-{n}", INPUT, limits=LIMITS)
            sub = await a.ok("submit_job", envelope=env, idempotency_key=f"m{n}")
            assert sub["node"] == g.dids["a"] and sub["grant"] == str(g.grant), sub
            await wait_funded(g.homes["a"].url, sub["job"])
        left = 30_000 - int(grant_view(g.ph, g.grant)[7])
        assert int((await a.ok("budget"))["grant"]["left_this_period"]) == left
        spent = len(_spent(g))
        env = paid_envelope(g.ph, "mcp-market-over", INPUT, limits=LIMITS)
        err = await a.refused("submit_job", envelope=env, idempotency_key="over")
        assert (err["code"], err["details"]["code"]) == ("funding_refused", "grant_exhausted"), err
        assert err["details"]["refusal"]["left_this_period"] == str(left)
        assert len(_spent(g)) == spent  # the chain's cap held: nothing spent
        over = err["details"]["job"]  # taken by the node, never funded: the agent cancels it
        assert (await a.ok("job_status", job=over))["job"]["state"] == "accepted"
        cancel = await a.ok("cancel_job", job=over, idempotency_key="cancel-1")
        assert cancel["state"] == "cancelled" and cancel["replayed"] is False
        again = await a.ok("cancel_job", job=over, idempotency_key="cancel-1")
        assert again == {**cancel, "replayed": True}
        clash = await a.refused("cancel_job", job="hj_other", idempotency_key="cancel-1")
        assert clash["code"] == "idempotency_key_conflict"

    port = free_port()  # the same tools over streamable HTTP
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "cli.main", "mcp", "--home", str(home), "--http", str(port)],
        cwd=REPO,
        env={**os.environ},
        stdout=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.returncode is None and time.monotonic() < deadline, "never listened"
                await asyncio.sleep(0.2)
        async with streamable_http_client(url) as (read, write, _), ClientSession(read, write) as session:
            await session.initialize()
            http = Agent(session)
            assert int((await http.ok("budget"))["grant"]["left_this_period"]) == left
            again = await http.ok("put_input", path=str(blob), idempotency_key="blob-1")
            assert again["replayed"] is True and again["cid"] == put["cid"]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
