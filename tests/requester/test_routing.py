"""Routing's choice among real nodes (in-process, each behind its own HTTP server, no chain): the strategies,
the tie-break, who is asked and who is not, and how a node's answer is read.

Reputation values are given in the Provider objects here (the choice logic under test); the market tests
on anvil (tests/requester/test_routing_market.py) read everything from real daemons and the chain.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from core.envelope import node_job_id, parse_envelope
from payments.keys import Signer
from requester.client import NodeClient, NodeError
from requester.market import Provider
from requester.reputation import Reputation
from requester.routing import _classify, route
from requester.routing_decision import Strategy
from tests.conftest import LiveNode, live, make_envelope, write_home
from tests.requester.proxy import Proxy

PRICES = ("0.012", "0.015", "0.020")


def priced(minimum: str) -> dict[str, object]:
    """A node config whose every transcode costs ``minimum`` (rates at zero, no surge)."""
    return {"pricing": {"cpu_second": "0", "output_mb": "0", "minimum_per_job": minimum}}


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[LiveNode]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(live(write_home(tmp_path / f"n{i}", priced(price))))
            for i, price in enumerate(PRICES)
        ]


async def providers_of(nodes: list[LiveNode], *reps: Reputation | None) -> list[Provider]:
    """Providers as discovery would give them: each node's own signed offer, and the reputation given."""
    out = []
    for i, ln in enumerate(nodes):
        async with NodeClient(ln.url) as c:
            offer = await c.capacity()
        wallet = "0x" + f"{i + 1:040x}"
        out.append(Provider(wallet, ln.did, ln.url, offer, reps[i] if i < len(reps) else None))
    return out


def rep(wallet: str, released: int, failed: int = 0) -> Reputation:
    return Reputation(
        wallet, jobs_funded=released + failed, jobs_released=released, jobs_refunded_failed=failed
    )


async def job_state(ln: LiveNode, requester: Signer, job_id: str) -> str | None:
    """The node's state of the requester's job ``job_id``, None when the node never heard of it."""
    async with NodeClient(ln.url) as c:
        try:
            return str((await c.status(node_job_id(requester.did, job_id)))["job"]["state"])
        except NodeError as exc:
            assert exc.status == 404
            return None


async def test_cheapest_wins_and_the_others_keep_only_their_quotes(
    nodes: list[LiveNode], requester: Signer
) -> None:
    env = parse_envelope(make_envelope("cheap-1"))
    decision = await route(env, requester, await providers_of(nodes))
    assert decision.outcome == "submitted", decision.to_json()
    assert decision.winner == nodes[0].did
    asks = {c.did: c.ask for c in decision.candidates}
    assert asks == {ln.did: Decimal(p) for ln, p in zip(nodes, PRICES, strict=True)}
    assert decision.reason.startswith("cheapest of 3 quotes: 0.012 USDC vs 0.015, 0.02")
    assert [(a.node, a.step, a.outcome) for a in decision.attempts] == [(nodes[0].did, "accept", "ok")]
    assert decision.job is not None and decision.job.state == "accepted" and decision.job.accepted_now
    assert decision.job.id == node_job_id(requester.did, "cheap-1")
    states = [await job_state(ln, requester, "cheap-1") for ln in nodes]
    assert states == ["accepted", "priced", "priced"]
    doc = decision.to_json()
    assert doc["error"] is None and sorted(Decimal(c["ask"]) for c in doc["candidates"]) == [
        Decimal(p) for p in PRICES
    ]


async def test_reputation_picks_the_cheapest_qualified_and_asks_no_one_else(
    nodes: list[LiveNode], requester: Signer
) -> None:
    wallets = ["0x" + f"{i + 1:040x}" for i in range(3)]
    reps = (rep(wallets[0], 1), rep(wallets[1], 5), rep(wallets[2], 5, failed=5))
    strategy = Strategy("reputation", min_settled=3, max_failure_rate=0.1)
    env = parse_envelope(make_envelope("rep-1"))
    decision = await route(env, requester, await providers_of(nodes, *reps), strategy=strategy)
    assert decision.outcome == "submitted" and decision.winner == nodes[1].did
    by_did = {c.did: c for c in decision.candidates}
    assert by_did[nodes[0].did].status == "ineligible" and "1 settled jobs" in by_did[nodes[0].did].message
    assert by_did[nodes[2].did].status == "ineligible" and "failure rate 50%" in by_did[nodes[2].did].message
    assert "the only quote: 0.015 USDC" in decision.reason and ">= 3 settled jobs" in decision.reason
    # the ineligible were never asked: they have no quote, no job
    assert [await job_state(ln, requester, "rep-1") for ln in nodes] == [None, "accepted", None]


async def test_reputation_with_no_qualified_provider_is_a_structured_refusal(
    nodes: list[LiveNode], requester: Signer
) -> None:
    wallets = ["0x" + f"{i + 1:040x}" for i in range(3)]
    providers = await providers_of(nodes, rep(wallets[0], 2), None, rep(wallets[2], 9, failed=1))
    strategy = Strategy("reputation", min_settled=3, max_failure_rate=0.05)
    decision = await route(parse_envelope(make_envelope("rep-2")), requester, providers, strategy=strategy)
    assert decision.outcome == "no_provider" and decision.winner is None and decision.job is None
    assert decision.error is not None and decision.error.code == "no_qualified_provider"
    listed = decision.to_json()["error"]["details"]["candidates"]
    assert sorted(c["did"] for c in listed) == sorted(ln.did for ln in nodes)
    assert {c["status"] for c in listed} == {"ineligible"}
    messages = {c.did: c.message for c in decision.candidates}
    assert messages[nodes[1].did] == "no reputation record on chain"
    assert "failure rate 10% above 5%" in messages[nodes[2].did]
    assert decision.attempts == []
    assert [await job_state(ln, requester, "rep-2") for ln in nodes] == [None, None, None]


async def test_a_tie_on_price_goes_to_the_better_record_then_the_lower_did(
    tmp_path: Path, requester: Signer
) -> None:
    async with (
        live(write_home(tmp_path / "a", priced("0.015"))) as a,
        live(write_home(tmp_path / "b", priced("0.015"))) as b,
    ):
        plain = await providers_of([a, b])
        by_did = sorted(plain, key=lambda p: p.did)
        decision = await route(parse_envelope(make_envelope("tie-1")), requester, plain)
        assert decision.winner == by_did[0].did and "tie on price broken" in decision.reason
        # the higher DID with more settled jobs wins the same tie
        better = [replace(p, reputation=rep(p.wallet, 4 if p is by_did[1] else 1)) for p in plain]
        decision = await route(parse_envelope(make_envelope("tie-2")), requester, better)
        assert decision.winner == by_did[1].did


def test_answers_are_read_as_accepted_refused_or_unknown() -> None:
    err = b'{"error": {"code": "%s", "domain": "%s", "message": "m"}}'
    assert _classify(200, b'{"job": {}}').heard == "ok"
    assert _classify(402, err % (b"price_above_max", b"pricing")).heard == "refused"
    assert _classify(503, err % (b"capacity_busy", b"scheduling")).heard == "refused"
    # an answer that may follow a commit, or is not the node's at all, decides nothing
    assert _classify(500, err % (b"internal", b"internal")).heard == "unknown"
    assert _classify(503, err % (b"chain_unavailable", b"settlement")).heard == "unknown"
    assert _classify(502, b"<html>Bad Gateway</html>").heard == "unknown"
    assert _classify(404, b"not found").heard == "unknown"
    assert _classify(200, b"accepted").heard == "unknown"


@pytest.mark.parametrize("fault", ["refused", "gone"])
async def test_a_definite_refusal_or_a_connection_never_made_moves_on_to_the_next(
    nodes: list[LiveNode], requester: Signer, fault: str
) -> None:
    """The cheapest node refuses the submission for real (the proxy spoils its quote, the node answers 401
    ``invalid_quote``), or its endpoint stops listening after quoting: the next cheapest gets the job."""
    found = await providers_of(nodes)
    async with Proxy(nodes[0].url, spoil=fault == "refused", vanish=fault == "gone") as proxy:
        first = replace(found[0], endpoint=proxy.url)
        decision = await route(parse_envelope(make_envelope(f"next-{fault}")), requester, [first, *found[1:]])
    assert decision.outcome == "submitted" and decision.winner == nodes[1].did, decision.to_json()
    expected = ("refused", "invalid_quote") if fault == "refused" else ("not_sent", None)
    assert [(a.node, a.outcome, a.code) for a in decision.attempts] == [
        (nodes[0].did, *expected),
        (nodes[1].did, "ok", None),
    ]
    refused = decision.candidates[0]
    assert refused.did == nodes[0].did and refused.message.startswith("at submission: ")
    code = "invalid_quote" if fault == "refused" else "unreachable"
    assert decision.reason == (
        f"cheapest of 2 quotes left: 0.015 USDC vs 0.02; passed over at submission: {nodes[0].did} at "
        f"0.012 USDC ({code})"
    )
    states = [await job_state(ln, requester, f"next-{fault}") for ln in nodes]
    assert states == ["priced", "accepted", "priced"]
