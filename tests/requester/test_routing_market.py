"""Routing a paid job among real node daemons on a devnet (anvil, the committed escrow and registry).

Six daemons (``hearth run``), each with a wallet of its own: three that quote 0.012, 0.015 and 0.020 USDC, one
asking more than the envelope's max_price, one denying the requester by policy, one without the capacity
the job needs; and an endpoint nobody listens on. The cheapest wins and is funded; the others are listed with
their asks or reasons. Then the unknown outcomes, through a reverse proxy in front of the cheapest node: an
answer lost after the node took the request (retried on the same node, the same job back, exactly one
escrow funded), and a node that never answers (outcome_unknown, no other node asked). Then the requester
home: a budget at exactly the winner's ask funds once and a replay of its key spends nothing, one base unit
less refuses before anything is signed, and a routing cut off after the node took the job resumes on that
node only. Last, the command, with and without an idempotency key and a workflow budget.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from eth_account import Account
from eth_utils.address import to_checksum_address
from web3 import AsyncHTTPProvider, AsyncWeb3

from core.envelope import node_job_id, parse_envelope
from core.errors import ConflictError
from payments import devnet
from payments.escrow_build import load_artifact
from payments.keys import Ed25519Signer, new_ed25519, save_key
from payments.receipts import escrow_job_id
from payments.registry_chain import RegistryChain
from requester.budgets import Budgets
from requester.client import NodeClient
from requester.home import RequesterHome, default_path
from requester.home_route import route_once
from requester.market import Provider
from requester.routing import route
from tests.conftest import REPO, DaemonProcess, free_port
from tests.payments.paid import PaidHome, paid_envelope, paid_home
from tests.requester.marketnet import Market, NodeHome
from tests.requester.proxy import Proxy

PRICED = {"a": "0.012", "b": "0.015", "c": "0.020"}
ROOMY = {"reserve_cpus": 0, "overcommit": 16, "quote_hold_share": 1.0, "per_requester_hold_share": 1.0}
LIMITS = {"timeout_seconds": 600, "max_output_mb": 200, "cpus": 0.25, "memory_mb": 256, "gpus": 0}


def pricing(minimum: str, **policy: Any) -> dict[str, Any]:
    """Every transcode at ``minimum`` USDC (rates at zero), and room for this module's many jobs."""
    return {
        "pricing": {"cpu_second": "0", "output_mb": "0", "minimum_per_job": minimum},
        "policy": {"per_did_concurrency": 100, **policy},
    }


@dataclass
class Net:
    ph: PaidHome
    requester: Ed25519Signer
    homes: dict[str, NodeHome]
    dids: dict[str, str]


def _wait_ready(daemons: list[DaemonProcess], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    for d in daemons:
        while True:
            assert d.proc is not None
            if d.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {d.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(d.url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{d.url} not ready: {d.log.read_text()[-2000:]}"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("routing")
    ph = paid_home(root / "devnet")
    daemons: list[DaemonProcess] = []
    try:
        market = Market(ph, root)
        requester = new_ed25519()
        configs: dict[str, dict[str, Any]] = {
            **{name: {**pricing(price), "capacity": ROOMY} for name, price in PRICED.items()},
            "over": {**pricing("9.00"), "capacity": ROOMY},
            "deny": {**pricing("0.010", deny_dids=[requester.did]), "capacity": ROOMY},
            "full": {**pricing("0.010"), "capacity": {"cpus": 0.2}},
        }
        homes = {name: market.node_home(config=cfg) for name, cfg in configs.items()}
        daemons = [DaemonProcess(h.home, h.port) for h in homes.values()]
        for d in daemons:
            d.spawn()
        _wait_ready(daemons)
        dids = {}
        for name, h in homes.items():
            with urllib.request.urlopen(h.url + "/v1/capacity", timeout=5) as resp:
                dids[name] = json.loads(resp.read())["node"]
        yield Net(ph, requester, homes, dids)
    finally:
        for d in daemons:
            d.stop()
        devnet.stop(ph.home)


async def offer_of(url: str) -> dict[str, Any]:
    async with NodeClient(url) as c:
        return await c.capacity()


async def providers(net: Net, *names: str) -> dict[str, Provider]:
    """The named nodes as discovery gives them: their registered wallet, DID, endpoint and signed offer."""
    out = {}
    for name in names:
        h = net.homes[name]
        offer = await offer_of(h.url)
        out[name] = Provider(h.wallet.address, offer["node"], h.url, offer)
    return out


def envelope(net: Net, job_id: str) -> dict[str, Any]:
    return paid_envelope(
        net.ph, job_id, "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi", limits=LIMITS
    )


async def job_state(net: Net, name: str, job_id: str) -> str | None:
    key = node_job_id(net.requester.did, job_id)
    async with aiohttp.ClientSession() as s, s.get(f"{net.homes[name].url}/v1/jobs/{key}") as resp:
        if resp.status == 404:
            return None
        return str((await resp.json())["job"]["state"])


async def wait_funded(url: str, job: str, limit: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    async with NodeClient(url) as c:
        while True:
            view: dict[str, Any] = (await c.status(job))["job"]
            if view["payment"]["funding"]["state"] != "awaiting":
                return view
            assert time.monotonic() < deadline, view["payment"]
            await asyncio.sleep(0.2)


def escrow_entries(net: Net, job_id: str) -> dict[str, dict[str, Any] | None]:
    """The terms each priced node's escrow job for ``job_id`` was funded with (its ``Funded`` event; None
    when nothing funded it)."""
    key = node_job_id(net.requester.did, job_id)
    return {name: net.ph.funded("0x" + escrow_job_id(net.dids[name], key).hex()) for name in PRICED}


def funded_events(net: Net, job_id: str) -> int:
    key = node_job_id(net.requester.did, job_id)
    ids = {escrow_job_id(net.dids[name], key) for name in PRICED}
    escrow = net.ph.w3.eth.contract(
        address=to_checksum_address(net.ph.net.escrow), abi=load_artifact("HearthEscrow").abi
    )
    logs = escrow.events.Funded().get_logs(from_block=0, argument_filters={"payer": net.ph.payer.address})
    return sum(bytes(log["args"]["jobId"]) in ids for log in logs)


async def test_the_cheapest_of_three_is_funded_and_every_other_provider_is_explained(net: Net) -> None:
    found = await providers(net, *PRICED, "over", "deny", "full")
    closed = Provider("0x" + "d" * 40, new_ed25519().did, f"http://127.0.0.1:{free_port()}", found["a"].offer)
    env = parse_envelope(envelope(net, "market-1"))
    decision = await route(env, net.requester, [*found.values(), closed], wallet=net.ph.payer)
    assert decision.outcome == "submitted", decision.to_json()
    assert decision.winner == net.dids["a"]
    by_did = {c.did: c for c in decision.candidates}
    for name, price in PRICED.items():
        assert by_did[net.dids[name]].status == "quoted" and by_did[net.dids[name]].ask == Decimal(price)
    assert decision.reason == "cheapest of 3 quotes: 0.012 USDC vs 0.015, 0.02"
    over = by_did[net.dids["over"]]
    assert (over.status, over.code, over.ask) == ("refused", "price_above_max", Decimal("9.00"))
    deny = by_did[net.dids["deny"]]
    assert (deny.status, deny.code) == ("refused", "did_denied")
    assert (by_did[net.dids["full"]].status, by_did[net.dids["full"]].code) == ("unfit", "no_capacity")
    assert (by_did[closed.did].status, by_did[closed.did].code) == ("unreachable", "unreachable")
    assert [(a.node, a.step, a.attempt, a.outcome) for a in decision.attempts] == [
        (net.dids["a"], "accept", 1, "ok"),
        (net.dids["a"], "fund", 1, "ok"),
    ]
    assert decision.job is not None and decision.job.funding is not None
    view = await wait_funded(net.homes["a"].url, decision.job.id)
    assert view["payment"]["funding"]["state"] == "funded" and view["payment"]["funding"]["gasless"]
    entries = escrow_entries(net, "market-1")
    funded = entries["a"]
    assert funded is not None and (funded["provider"], funded["amount"]) == (
        net.homes["a"].wallet.address,
        12_000,
    )
    assert entries["b"] is entries["c"] is None  # nothing for the others
    assert funded_events(net, "market-1") == 1
    assert [await job_state(net, n, "market-1") for n in PRICED] == ["accepted", "priced", "priced"]
    assert await job_state(net, "over", "market-1") is None  # refused: nothing kept
    doc = json.loads(json.dumps(decision.to_json()))
    assert doc["winner"] == net.dids["a"] and len(doc["candidates"]) == 7


@pytest.mark.parametrize("lose", ["accept", "fund"])
async def test_a_lost_answer_is_retried_on_the_same_node_and_funds_one_escrow(net: Net, lose: str) -> None:
    job_id = f"lost-{lose}"
    found = await providers(net, *PRICED)
    async with Proxy(net.homes["a"].url, lose=lose) as proxy:
        via_proxy = replace(found["a"], endpoint=proxy.url)
        env = parse_envelope(envelope(net, job_id))
        decision = await route(
            env, net.requester, [via_proxy, found["b"], found["c"]], wallet=net.ph.payer, backoff=0.05
        )
    assert decision.outcome == "submitted", decision.to_json()
    assert decision.winner == net.dids["a"]
    tries = [(a.node, a.step, a.outcome) for a in decision.attempts]
    a = net.dids["a"]
    if lose == "accept":
        assert tries == [(a, "accept", "unknown"), (a, "accept", "ok"), (a, "fund", "ok")]
        assert decision.job is not None and decision.job.accepted_now is False  # the same job, back
    else:
        assert tries == [(a, "accept", "ok"), (a, "fund", "unknown"), (a, "fund", "ok")]
    assert proxy.posts.count(lose) == 2
    assert decision.job is not None and decision.job.id == node_job_id(net.requester.did, job_id)
    view = await wait_funded(net.homes["a"].url, decision.job.id)
    assert view["payment"]["funding"]["state"] == "funded"
    assert funded_events(net, job_id) == 1
    entries = escrow_entries(net, job_id)
    funded = entries["a"]
    assert funded is not None and funded["payer"] == net.ph.payer.address
    assert entries["b"] is entries["c"] is None
    assert [await job_state(net, n, job_id) for n in PRICED] == ["accepted", "priced", "priced"]


async def test_a_node_that_never_answers_stops_routing_with_outcome_unknown(net: Net) -> None:
    found = await providers(net, *PRICED)
    async with Proxy(net.homes["a"].url, hang=True) as proxy:
        env = parse_envelope(envelope(net, "hang-1"))
        decision = await route(
            env,
            net.requester,
            [replace(found["a"], endpoint=proxy.url), found["b"], found["c"]],
            wallet=net.ph.payer,
            submit_timeout=1.0,
            retries=2,
            backoff=0.05,
        )
    assert decision.outcome == "outcome_unknown" and decision.winner == net.dids["a"]
    assert proxy.posts == ["accept"] * 3
    assert [(a.node, a.outcome) for a in decision.attempts] == [(net.dids["a"], "unknown")] * 3
    assert decision.error is not None and decision.error.code == "outcome_unknown"
    assert decision.error.details["node"] == net.dids["a"]
    assert decision.error.details["job"] == node_job_id(net.requester.did, "hang-1")
    assert decision.job is not None and decision.job.funding is None  # nothing was signed
    # no other node was asked to take the job; nothing funded anywhere
    assert [await job_state(net, n, "hang-1") for n in PRICED] == ["priced", "priced", "priced"]
    assert funded_events(net, "hang-1") == 0


async def _register(net: Net, names: list[str]) -> None:
    """List ``names`` in the devnet's registry (the one --home's node.toml names), each from its wallet."""
    rpc = net.ph.net.rpc_url
    aw3: AsyncWeb3[Any] = AsyncWeb3(AsyncHTTPProvider(rpc))
    try:
        registry = RegistryChain(aw3, net.ph.net.registry, rpc_url=rpc)
        for name in names:
            h = net.homes[name]
            call = registry.register(net.dids[name], h.url)
            nonce = await aw3.eth.get_transaction_count(to_checksum_address(h.wallet.address))
            tx = await call.build_transaction(
                {"from": h.wallet.address, "nonce": nonce, "chainId": net.ph.net.chain_id}
            )
            signed = Account.sign_transaction(tx, h.wallet.private_key_bytes())
            sent = await aw3.eth.send_raw_transaction(signed.raw_transaction)
            assert (await aw3.eth.wait_for_transaction_receipt(sent))["status"] == 1
    finally:
        await aw3.provider.disconnect()


async def test_job_submit_market_discovers_routes_and_waits_for_funding(net: Net, tmp_path: Path) -> None:
    await _register(net, [*PRICED, "over", "deny", "full"])
    key = tmp_path / "requester.key"
    save_key(net.requester, key)
    payer = next(a.key_file for a in net.ph.net.accounts if a.role == "requester")

    def submit(job_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{job_id}.json"
        path.write_text(json.dumps(envelope(net, job_id)))
        argv = ["job", "submit", str(path), "--market", "--home", str(net.ph.home), "--key", str(key)]
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *argv, "--allow-private-endpoints", *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ},
        )

    done = submit("cli-1", "--wallet", payer, "--wait", "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    doc = json.loads(done.stdout)
    decision = doc["decision"]
    assert decision["winner"] == net.dids["a"]
    assert decision["reason"] == "cheapest of 3 quotes: 0.012 USDC vs 0.015, 0.02"
    codes = {c["did"]: (c["status"], c["code"]) for c in decision["candidates"]}
    assert codes[net.dids["over"]] == ("refused", "price_above_max")
    assert codes[net.dids["deny"]] == ("refused", "did_denied")
    assert codes[net.dids["full"]] == ("unfit", "no_capacity")
    assert doc["discovery"]["registered"] == 6 and doc["discovery"]["dropped"] == []
    assert doc["status"]["job"]["payment"]["funding"]["state"] == "funded"
    assert funded_events(net, "cli-1") == 1

    shown = submit("cli-2")  # no wallet: accepted, the payer funds the escrow some other way
    assert shown.returncode == 0, shown.stderr + shown.stdout
    assert f"chose {net.dids['a']}: cheapest of 3 quotes: 0.012 USDC vs 0.015, 0.02" in shown.stdout
    assert "refused price_above_max (asks 9 USDC)" in shown.stdout
    assert "refused did_denied" in shown.stdout and "unfit no_capacity" in shown.stdout
    assert f"job {node_job_id(net.requester.did, 'cli-2')} (cli-2)" in shown.stdout

    # reputation read from the chain through the requester's cache: nobody has settled a job yet
    strict = submit("cli-3", "--strategy", "reputation", "--min-settled", "1", "--json")
    assert strict.returncode == 1, strict.stderr + strict.stdout
    refused = json.loads(strict.stdout)["decision"]
    assert refused["outcome"] == "no_provider" and refused["error"]["code"] == "no_qualified_provider"
    reasons = {c["did"]: (c["status"], c["message"]) for c in refused["candidates"]}
    assert reasons[net.dids["a"]] == ("ineligible", "0 settled jobs, fewer than 1")
    assert reasons[net.dids["full"]][0] == "unfit"
    assert refused["attempts"] == [] and await job_state(net, "a", "cli-3") is None
    assert (net.ph.home / "requester" / "reputation.sqlite3").is_file()


async def test_a_home_budget_at_the_ask_funds_once_a_replay_spends_nothing_and_one_unit_less_signs_nothing(
    net: Net, tmp_path: Path
) -> None:
    found = await providers(net, *PRICED)
    discovered: list[int] = []

    async def discover() -> list[Provider]:
        discovered.append(1)
        return list(found.values())

    env = parse_envelope(envelope(net, "home-1"))
    with RequesterHome.open(default_path(tmp_path / "exact"), budgets=Budgets(per_day=12_000)) as home:
        routed = await route_once(
            home, "agent-1", env, net.requester, discover, workflow="clips", wallet=net.ph.payer
        )
        assert routed.outcome == "submitted" and not routed.replayed, routed.decision
        assert (routed.record.state, routed.record.node) == ("submitted", net.dids["a"])
        assert home.reservation("agent-1") == ("committed", 12_000)
        job = routed.decision["job"]["id"]
        assert (await wait_funded(net.homes["a"].url, job))["payment"]["funding"]["state"] == "funded"
        again = await route_once(
            home, "agent-1", env, net.requester, discover, workflow="clips", wallet=net.ph.payer
        )
        assert again.replayed and again.decision == routed.decision and again.routing is None
        assert discovered == [1]  # the replay neither discovered nor quoted
        with pytest.raises(ConflictError) as exc:
            other = parse_envelope(envelope(net, "home-other"))
            await route_once(home, "agent-1", other, net.requester, discover, workflow="clips")
        assert exc.value.code == "idempotency_key_conflict"
        assert home.left()["per_day"]["left"] == 0
    assert funded_events(net, "home-1") == 1
    funded = escrow_entries(net, "home-1")["a"]
    assert funded is not None and funded["amount"] == 12_000

    env = parse_envelope(envelope(net, "home-2"))
    with RequesterHome.open(default_path(tmp_path / "under"), budgets=Budgets(per_day=11_999)) as home:
        refused = await route_once(
            home, "agent-2", env, net.requester, discover, workflow="clips", wallet=net.ph.payer
        )
        assert refused.outcome == "refused" and refused.routing is not None
        err = refused.decision["error"]
        assert (err["code"], err["domain"], err["details"]["budget"]) == (
            "budget_exceeded",
            "budget",
            "per_day",
        )
        assert err["details"]["asked"] == 12_000 and err["details"]["left"]["per_day"]["left"] == 11_999
        assert (
            refused.decision["attempts"] == [] and refused.decision["job"] is None
        )  # nothing sent or signed
        assert refused.record.state == "failed" and home.reservation("agent-2") is None
    assert funded_events(net, "home-2") == 0
    assert all(entry is None for entry in escrow_entries(net, "home-2").values())
    # quoted everywhere (a quote is held until it lapses), taken nowhere
    assert [await job_state(net, n, "home-2") for n in PRICED] == ["priced", "priced", "priced"]


async def test_a_routing_cut_off_after_the_node_took_the_job_resumes_on_that_node_only(
    net: Net, tmp_path: Path
) -> None:
    found = await providers(net, *PRICED)
    env = parse_envelope(envelope(net, "home-crash"))
    path = default_path(tmp_path)
    async with Proxy(net.homes["a"].url, lose="accept") as proxy:
        via_proxy = replace(found["a"], endpoint=proxy.url)

        async def through_proxy() -> list[Provider]:
            return [via_proxy, found["b"], found["c"]]

        with RequesterHome.open(path, budgets=Budgets(per_day=50_000)) as home:
            cut = await route_once(
                home, "crash-1", env, net.requester, through_proxy, workflow="clips",
                wallet=net.ph.payer, retries=0,
            )  # fmt: skip
            assert cut.outcome == "outcome_unknown" and proxy.posts == ["accept"]
            assert (cut.record.state, cut.record.node) == ("routing", net.dids["a"])
            assert home.reservation("crash-1") == ("held", 12_000)
    assert await job_state(net, "a", "home-crash") == "accepted"  # the node took it; the answer was lost

    async def cheaper_first() -> list[Provider]:  # after the restart, whoever discovery lists first
        return [found["c"], found["b"], found["a"]]

    with RequesterHome.open(path, budgets=Budgets(per_day=50_000)) as home:  # a restart
        assert (
            home.claim(
                "crash-1", envelope_hash=cut.record.envelope_hash, job_id="home-crash", workflow="clips"
            ).kind
            == "in_flight"
        )
        resumed = await route_once(
            home, "crash-1", env, net.requester, cheaper_first, workflow="clips", wallet=net.ph.payer
        )
        assert resumed.outcome == "submitted", resumed.decision
        assert resumed.record.attempts == 2 and resumed.record.node == net.dids["a"]
        decision = resumed.decision
        assert [c["did"] for c in decision["candidates"]] == [net.dids["a"]]  # nobody else was asked
        assert [(a["node"], a["step"], a["outcome"]) for a in decision["attempts"]] == [
            (net.dids["a"], "accept", "ok"),
            (net.dids["a"], "fund", "ok"),
        ]
        assert decision["job"]["accepted_now"] is False  # the job the node already had
        assert home.reservation("crash-1") == ("committed", 12_000)
        assert home.left()["per_day"]["used"] == 12_000
        assert [d["outcome"] for d in home.decisions("crash-1")] == ["outcome_unknown", "submitted"]
        await wait_funded(net.homes["a"].url, decision["job"]["id"])
    assert funded_events(net, "home-crash") == 1
    assert [await job_state(net, n, "home-crash") for n in PRICED] == ["accepted", "priced", "priced"]


async def test_job_submit_market_with_an_idempotency_key_and_a_workflow_budget(
    net: Net, tmp_path: Path
) -> None:
    await _register(net, [*PRICED, "over", "deny", "full"])
    key = tmp_path / "requester.key"
    save_key(net.requester, key)
    payer = next(a.key_file for a in net.ph.net.accounts if a.role == "requester")
    home = tmp_path / "agent"
    (home / "requester").mkdir(parents=True)
    (home / "requester" / "requester.toml").write_text('[budgets.workflows]\nclips = "0.012"\n')

    def submit(job_id: str, *extra: str) -> tuple[int, dict[str, Any]]:
        path = tmp_path / f"{job_id}.json"
        path.write_text(json.dumps(envelope(net, job_id)))
        argv = [
            "job", "submit", str(path), "--market", "--home", str(home), "--key", str(key),
            "--registry", net.ph.net.registry, "--rpc", net.ph.net.rpc_url, "--allow-private-endpoints",
            "--wallet", payer, "--workflow", "clips", "--json",
        ]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", *argv, *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ},
        )
        return done.returncode, json.loads(done.stdout)

    code, first = submit("cli-h1", "--idempotency-key", "K1", "--wait")
    assert code == 0, first
    assert first["idempotency"]["replayed"] is False and first["decision"]["winner"] == net.dids["a"]
    assert first["status"]["job"]["payment"]["funding"]["state"] == "funded"
    assert first["budget"]["workflow"]["left"] == 0
    code, again = submit("cli-h1", "--idempotency-key", "K1", "--wait")
    assert code == 0, again
    assert again["idempotency"]["replayed"] is True and again["discovery"] is None
    assert again["decision"] == first["decision"]
    assert again["status"]["job"]["payment"]["funding"]["state"] == "funded"
    assert funded_events(net, "cli-h1") == 1

    code, clash = submit("cli-h2", "--idempotency-key", "K1")
    assert code == 1 and clash["error"]["code"] == "idempotency_key_conflict", clash
    code, over = submit("cli-h2", "--idempotency-key", "K2")
    assert code == 1, over
    err = over["decision"]["error"]
    assert (over["decision"]["outcome"], err["code"], err["details"]["budget"]) == (
        "refused", "budget_exceeded", "workflow"
    )  # fmt: skip
    assert err["details"]["left"]["workflow"]["left"] == 0 and over["decision"]["attempts"] == []
    assert funded_events(net, "cli-h2") == 0
    assert await job_state(net, "a", "cli-h2") == "priced"
