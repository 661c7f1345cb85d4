"""Reputation and routing by reputation on the escrow's real events, made by real node daemons.

Two ``hearth run`` daemons on a devnet (anvil, the committed escrow and registry), each with a wallet of its
own, list themselves in the registry at start: A asks 0.010 USDC a transcode, B 0.030. B earns a record
through its HTTP API with real Docker transcodes of a tiny clip: a job paid against a passing receipt
(released) and one refunded against a failing receipt. Routing by reputation then passes over A (no record)
for B, while the cheapest strategy picks A; exactly one escrow is funded per job. Last, B takes a job whose
receipt never comes; the chain's clock is moved past the escrow deadline and a stranger refunds it. Every
field of each wallet's record, from :class:`requester.reputation.ReputationCache` and from ``hearth market
reputation --json``, equals what the escrow's own logs say (read here with ``eth_getLogs``) and what the test
did. The last test moves the chain's clock a day ahead: it runs last, and funds nothing after that.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from eth_utils.address import to_checksum_address
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.contract import Contract
from web3.exceptions import ContractLogicError

from core.envelope import node_job_id, parse_envelope
from payments import devnet
from payments.escrow_build import load_artifact
from payments.keys import Ed25519Signer, EthSigner, new_ed25519, save_key
from payments.receipts import escrow_job_id
from payments.registry_chain import RegistryChain
from requester.client import NodeClient
from requester.market import discover
from requester.reputation import Reputation, ReputationCache
from requester.routing import route
from requester.routing_decision import Strategy
from sandbox.ffmpeg import make_test_clip
from tests.conftest import REPO, DaemonProcess
from tests.payments.paid import PaidHome, paid_envelope, paid_home, quote_and_fund, receipt_for, wait_for
from tests.requester.marketnet import Market, NodeHome
from tests.requester.test_routing_market import ROOMY, _wait_ready, offer_of, pricing, wait_funded

ASKS = {"a": "0.010", "b": "0.030"}  # A is the cheaper, B the dearer
LIMITS = {"timeout_seconds": 120, "max_output_mb": 50, "cpus": 1, "memory_mb": 256, "gpus": 0}
USDC = 10**6
STRANGER = 9  # the anvil account that refunds after the deadline: neither payer, provider nor validator


@dataclass
class Funding:
    """One escrow entry this module had a node fund, and how it ended (None: still open)."""

    job_id: bytes
    provider: str
    payer: str
    validator: str
    outcome: str | None = None
    paid: int = 0


@dataclass
class Net:
    ph: PaidHome
    homes: dict[str, NodeHome]
    dids: dict[str, str]
    requester: Ed25519Signer
    requester_key: Path
    payer2: EthSigner  # a second payer (TestUSDC minted), its key file for --wallet
    payer2_key: Path
    validator2: EthSigner
    cid: str
    fundings: list[Funding] = field(default_factory=list)

    def escrow(self) -> Contract:
        abi = load_artifact("HearthEscrow").abi
        return self.ph.w3.eth.contract(address=to_checksum_address(self.ph.net.escrow), abi=abi)

    def wallet(self, name: str) -> str:
        return to_checksum_address(self.homes[name].wallet.address)

    def payer(self, payer: EthSigner) -> PaidHome:
        """The devnet with ``payer`` in the payer's place (envelopes and authorizations name it)."""
        return replace(self.ph, payer=payer)

    def mine(self, blocks: int = 3) -> None:
        """Bury the last events under the confirmations a reputation refresh waits for."""
        self.ph.w3.provider.make_request("anvil_mine", [blocks])  # type: ignore[arg-type]


def _registered(ph: PaidHome, wallets: list[str], limit: float = 60.0) -> None:
    """Wait until every wallet in ``wallets`` has its record in the devnet's registry."""
    registry = ph.w3.eth.contract(
        address=to_checksum_address(ph.net.registry), abi=load_artifact("HearthRegistry").abi
    )
    deadline = time.monotonic() + limit
    while int(registry.functions.providerCount().call()) < len(wallets):
        assert time.monotonic() < deadline, "the nodes did not register themselves"
        time.sleep(0.2)


async def _put_clip(urls: list[str], clip: Path) -> str:
    cids: set[str] = set()
    for url in urls:
        async with NodeClient(url) as c:
            cids.add(str((await c.put_blob(clip))["cid"]))
    assert len(cids) == 1  # content-addressed: the same CID on every node
    return cids.pop()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, sandbox_images: dict[str, str]) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("market-reputation")
    ph = paid_home(root / "devnet")
    daemons: list[DaemonProcess] = []
    try:
        market = Market(ph, root, address=ph.net.registry)
        listed = {"market": {"registry": ph.net.registry}, "scheduler": {"paused": False}}
        homes = {
            name: market.node_home(config={**pricing(ask), "capacity": ROOMY, **listed})
            for name, ask in ASKS.items()
        }
        daemons = [DaemonProcess(h.home, h.port) for h in homes.values()]
        for d in daemons:
            d.spawn()
        clip = make_test_clip(root / "clip.mp4", seconds=1.5, width=160, height=120, fps=10)
        requester_key, payer2_key = root / "requester.key", root / "payer2.key"
        requester = new_ed25519()
        save_key(requester, requester_key)
        payer2 = EthSigner.generate(ph.net.chain_id)
        save_key(payer2, payer2_key)
        token = ph.w3.eth.contract(
            address=to_checksum_address(ph.net.token), abi=load_artifact("TestUSDC").abi
        )
        minted = token.functions.mint(payer2.address, 10 * USDC).transact({"from": ph.w3.eth.accounts[0]})
        assert ph.w3.eth.wait_for_transaction_receipt(minted)["status"] == 1
        _wait_ready(daemons)
        _registered(ph, [h.wallet.address for h in homes.values()])
        cid = asyncio.run(_put_clip([h.url for h in homes.values()], clip))
        dids = asyncio.run(_dids(homes))
        validator2 = EthSigner.generate(ph.net.chain_id)
        yield Net(ph, homes, dids, requester, requester_key, payer2, payer2_key, validator2, cid)
    finally:
        for d in daemons:
            d.stop()
        devnet.stop(ph.home)


async def _dids(homes: dict[str, NodeHome]) -> dict[str, str]:
    return {name: str((await offer_of(h.url))["node"]) for name, h in homes.items()}


@pytest.fixture(scope="module")
def record(net: Net) -> list[Funding]:
    """B's record through its API: a job released against a passing receipt, and one refunded against
    a failing receipt from another validator (both transcoded for real)."""
    return asyncio.run(_earn_record(net))


async def _earn_record(net: Net) -> list[Funding]:
    requester = net.requester
    async with NodeClient(net.homes["b"].url) as c:
        paid_env = paid_envelope(net.ph, "rep-paid", net.cid, limits=LIMITS)
        failed_env = paid_envelope(net.ph, "rep-failed", net.cid, limits=LIMITS)
        failed_env["payment"]["validator"] = net.validator2.did
        paid_job, paid_terms = await quote_and_fund(c, net.dids["b"], requester, net.ph, paid_env)
        failed_job, failed_terms = await quote_and_fund(c, net.dids["b"], requester, net.ph, failed_env)
        for job in (paid_job, failed_job):
            view = await wait_for(c, job, {"completed", "failed", "expired"})
            assert view["state"] == "completed", view
        passing = await receipt_for(c, paid_job, paid_terms, net.ph.validator)
        assert (await c.post_receipt(paid_job, passing))["job"]["state"] == "validated"
        failing = await receipt_for(c, failed_job, failed_terms, net.validator2, passed=False)
        assert (await c.post_receipt(failed_job, failing))["job"]["state"] == "disputed"
        released = await wait_for(c, paid_job, {"settled"})
        refunded = await wait_for(c, failed_job, {"refunded"})
    assert released["payment"]["settlement"]["tx"]["purpose"] == "release"
    assert refunded["payment"]["settlement"]["tx"]["purpose"] == "refund"
    paid = int(passing["receipt"]["amount"])
    assert paid == 30_000  # B's ask, in USDC base units
    b_wallet, payer = net.wallet("b"), net.ph.payer.address
    done = [
        Funding(paid_terms.job_id, b_wallet, payer, net.ph.validator.address, "released", paid),
        Funding(failed_terms.job_id, b_wallet, payer, net.validator2.address, "refunded_failed"),
    ]
    net.fundings.extend(done)
    return done


def _funded_logs(net: Net, job_id: str) -> dict[str, int]:
    """Funded events, per node, of the escrow entry that node would fund for the requester's ``job_id``."""
    key = node_job_id(net.requester.did, job_id)
    logs = net.escrow().events.Funded().get_logs(from_block=0)
    ids = {name: escrow_job_id(did, key) for name, did in net.dids.items()}
    return {name: sum(bytes(log["args"]["jobId"]) == jid for log in logs) for name, jid in ids.items()}


def _hearth(*argv: str) -> dict[str, Any]:
    """``hearth ARGV`` as a child process; its JSON answer (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return dict(json.loads(done.stdout))


def _submit_market(net: Net, job_id: str, *extra: str) -> dict[str, Any]:
    """``hearth job submit --market`` of a transcode paid by the second payer; its JSON answer."""
    path = net.requester_key.parent / f"{job_id}.json"
    path.write_text(json.dumps(paid_envelope(net.payer(net.payer2), job_id, net.cid, limits=LIMITS)))
    home, key = str(net.ph.home), str(net.requester_key)
    return _hearth("job", "submit", str(path), "--market", "--home", home, "--key", key, *extra)


async def test_routing_by_reputation_passes_over_the_cheaper_node_without_a_record(
    net: Net, record: list[Funding]
) -> None:
    net.mine()  # the settlements under the cache's confirmations
    rep = "--strategy reputation --min-settled 1 --max-failure-rate 0.5 --allow-private-endpoints"
    doc = _submit_market(net, "route-rep", *rep.split(), "--wallet", str(net.payer2_key), "--wait", "--json")
    decision = doc["decision"]
    assert decision["outcome"] == "submitted" and decision["winner"] == net.dids["b"], decision
    assert decision["strategy"] == {"name": "reputation", "min_settled": 1, "max_failure_rate": 0.5}
    assert decision["reason"] == (
        "the only quote: 0.03 USDC (among providers with >= 1 settled jobs and failure rate <= 50%)"
    )
    by_did = {c["did"]: c for c in decision["candidates"]}
    a, b = by_did[net.dids["a"]], by_did[net.dids["b"]]
    assert (a["status"], a["code"], a["message"]) == (
        "ineligible",
        "below_reputation_threshold",
        "0 settled jobs, fewer than 1",
    )
    assert a["reputation"] == {"jobs_settled": 0, "jobs_funded": 0, "failure_rate": 0.0}  # no event names it
    assert a["ask"] is None  # left out unasked
    assert (b["status"], Decimal(b["ask"])) == ("quoted", Decimal(ASKS["b"]))
    assert b["reputation"] == {"jobs_settled": 2, "jobs_funded": 2, "failure_rate": 0.5}
    assert doc["status"]["job"]["payment"]["funding"]["state"] == "funded"
    assert _funded_logs(net, "route-rep") == {"a": 0, "b": 1}
    key = node_job_id(net.requester.did, "route-rep")
    net.fundings.append(
        Funding(
            escrow_job_id(net.dids["b"], key), net.wallet("b"), net.payer2.address, net.ph.validator.address
        )
    )

    # the same market, the cheapest strategy: A, in process through discovery and route()
    aw3: AsyncWeb3[Any] = AsyncWeb3(AsyncHTTPProvider(net.ph.net.rpc_url))
    try:
        found = await discover(
            RegistryChain(aw3, net.ph.net.registry, rpc_url=net.ph.net.rpc_url),
            kind="ffmpeg_transcode",
            chain_id=net.ph.net.chain_id,
            escrow=net.ph.net.escrow,
            allow_private=True,
        )
    finally:
        await aw3.provider.disconnect()
    assert {p.did for p in found.providers} == set(net.dids.values()) and found.dropped == []
    env = parse_envelope(paid_envelope(net.payer(net.payer2), "route-cheap", net.cid, limits=LIMITS))
    cheap = await route(env, net.requester, found.providers, strategy=Strategy("cheapest"), wallet=net.payer2)
    assert cheap.outcome == "submitted" and cheap.winner == net.dids["a"], cheap.to_json()
    assert cheap.reason == "cheapest of 2 quotes: 0.01 USDC vs 0.03"
    assert cheap.job is not None
    assert (await wait_funded(net.homes["a"].url, cheap.job.id))["payment"]["funding"]["state"] == "funded"
    assert _funded_logs(net, "route-cheap") == {"a": 1, "b": 0}
    key = node_job_id(net.requester.did, "route-cheap")
    net.fundings.append(
        Funding(
            escrow_job_id(net.dids["a"], key), net.wallet("a"), net.payer2.address, net.ph.validator.address
        )
    )


def _record_in_logs(net: Net, wallet: str) -> Reputation:
    """``wallet``'s record read straight from the escrow's logs: its ``Funded`` and ``Released`` (both name
    the provider), the ``Refunded`` of those jobs, after the deadline when the block's time says so."""
    escrow, w3 = net.escrow(), net.ph.w3
    funded = escrow.events.Funded().get_logs(from_block=0, argument_filters={"provider": wallet})
    if not funded:
        return Reputation(wallet)
    deadlines = {bytes(log["args"]["jobId"]): int(log["args"]["deadline"]) for log in funded}
    released = escrow.events.Released().get_logs(from_block=0, argument_filters={"provider": wallet})
    refunded = escrow.events.Refunded().get_logs(from_block=0, argument_filters={"jobId": list(deadlines)})
    expired = [
        log
        for log in refunded
        if int(w3.eth.get_block(log["blockNumber"])["timestamp"]) > deadlines[bytes(log["args"]["jobId"])]
    ]
    blocks = [int(log["blockNumber"]) for log in (*funded, *released, *refunded)]
    return Reputation(
        provider=wallet,
        jobs_funded=len(deadlines),
        jobs_released=len(released),
        jobs_refunded_failed=len(refunded) - len(expired),
        jobs_refunded_expired=len(expired),
        earned=sum(int(log["args"]["paid"]) for log in released),
        distinct_payers=len({log["args"]["payer"] for log in funded}),
        distinct_validators=len({log["args"]["validator"] for log in funded}),
        first_block=min(blocks),
        last_block=max(blocks),
    )


def _record_of_test(net: Net, wallet: str) -> Reputation:
    """``wallet``'s record as this module's own jobs make it (blocks left out: the nodes sent the funding)."""
    mine = [f for f in net.fundings if f.provider == wallet]
    return Reputation(
        provider=wallet,
        jobs_funded=len(mine),
        jobs_released=sum(f.outcome == "released" for f in mine),
        jobs_refunded_failed=sum(f.outcome == "refunded_failed" for f in mine),
        jobs_refunded_expired=sum(f.outcome == "refunded_expired" for f in mine),
        earned=sum(f.paid for f in mine),
        distinct_payers=len({f.payer for f in mine}),
        distinct_validators=len({f.validator for f in mine}),
    )


async def test_reputation_is_what_the_escrow_says_after_a_paid_a_refunded_and_an_expired_job(
    net: Net, record: list[Funding], tmp_path: Path
) -> None:
    payer2 = net.payer(net.payer2)
    async with NodeClient(net.homes["b"].url) as c:
        env = paid_envelope(payer2, "rep-expired", net.cid, limits=LIMITS)
        job, terms = await quote_and_fund(c, net.dids["b"], net.requester, payer2, env)
        view = await wait_for(c, job, {"completed", "failed", "expired"})
        assert view["state"] == "completed" and view["payment"]["funding"]["state"] == "funded", view
    # no receipt ever comes: before the deadline nobody may refund, after it anybody may
    w3, escrow = net.ph.w3, net.escrow()
    stranger = w3.eth.accounts[STRANGER]
    refund = escrow.functions.refund(terms.job_id, terms.entry, bytes(32), b"")
    with pytest.raises(ContractLogicError):
        refund.call({"from": stranger})
    now = int(w3.eth.get_block("latest")["timestamp"])
    w3.provider.make_request("evm_increaseTime", [terms.deadline - now + 1])  # type: ignore[arg-type]
    net.mine(1)
    receipt = w3.eth.wait_for_transaction_receipt(refund.transact({"from": stranger}))
    assert receipt["status"] == 1
    net.fundings.append(
        Funding(
            terms.job_id, net.wallet("b"), net.payer2.address, net.ph.validator.address, "refunded_expired"
        )
    )
    assert net.ph.escrow_job("0x" + terms.job_id.hex()) == (3, terms.terms_hash)  # Status.Refunded
    net.mine()

    with ReputationCache.open(tmp_path / "reputation.sqlite3") as cache:
        stats = await cache.refresh(net.ph.net.rpc_url, net.ph.net.escrow, chain_id=net.ph.net.chain_id)
        assert stats.unmatched == 0 and stats.funded == len(net.fundings)
        cached = {
            name: cache.reputation(net.wallet(name), chain_id=net.ph.net.chain_id, escrow=net.ph.net.escrow)
            for name in ASKS
        }
    for name, rep in cached.items():
        assert rep == _record_in_logs(net, net.wallet(name)), name
        assert replace(rep, first_block=None, last_block=None) == _record_of_test(net, net.wallet(name)), name
    b = cached["b"]
    assert (b.jobs_released, b.jobs_refunded_failed, b.jobs_refunded_expired) == (1, 1, 1)
    assert b.jobs_funded == 3 + b.jobs_open and b.earned == record[0].paid == 30_000
    assert (b.distinct_payers, b.distinct_validators) == (2, 2)
    assert b.last_block == receipt["blockNumber"] and b.failure_rate == pytest.approx(2 / 3)
    assert b.first_block is not None and b.first_block < b.last_block

    doc = _hearth("market", "reputation", "--home", str(net.ph.home), "--json")
    assert doc["escrow"] == net.ph.net.escrow and doc["chain_id"] == net.ph.net.chain_id
    rows = {row["wallet"]: row for row in doc["providers"]}
    assert set(rows) == {net.wallet(name) for name in ASKS}  # the payers and validators are no providers
    for name, rep in cached.items():
        row = rows[net.wallet(name)]
        assert (row["registered"], row["did"], row["endpoint"]) == (True, net.dids[name], net.homes[name].url)
        assert row["reputation"] == json.loads(json.dumps(rep.to_json())), name
