"""``hearth mcp`` driven by the MCP SDK's own client over stdio, end to end on a devnet (DESIGN §12).

A real node (its HTTP API, Docker transcodes) on anvil; the devnet payer opens a spending grant for a fresh
agent key (no USDC, no gas); the agent's requester home names the key and the grant and caps the day at
exactly one job. Through the tools only, the agent uploads a clip, submits a transcode, waits, reads the
artifact CID; the next job is refused before anything is signed, as a tool result with ``isError`` and the
JSON error shape saying what is left. Then the server is restarted: the same idempotency key returns the
same job without a second spend, and the budget still refuses.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from web3 import Web3

from core.config import load_config
from payments import devnet
from payments.keys import EthSigner, save_key
from payments.receipts import usdc_units
from requester.agent_tools import TOOLS
from requester.client import NodeClient
from sandbox.ffmpeg import make_test_clip
from tests.conftest import REPO, LiveNode, live
from tests.payments.paid import (
    PaidHome,
    grant_events,
    open_grant,
    paid_envelope,
    paid_home,
    quote_for_grant,
)


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


class Agent:
    """One MCP session with ``hearth mcp``: call a tool, get its JSON and whether it is an error."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def call(self, name: str, **arguments: Any) -> tuple[bool, dict[str, Any]]:
        result = await self.session.call_tool(name, arguments)
        assert len(result.content) == 1 and result.content[0].type == "text", result
        doc: dict[str, Any] = json.loads(result.content[0].text)
        return bool(result.isError), doc

    async def ok(self, name: str, **arguments: Any) -> dict[str, Any]:
        error, doc = await self.call(name, **arguments)
        assert not error, doc
        return doc

    async def refused(self, name: str, **arguments: Any) -> dict[str, Any]:
        error, doc = await self.call(name, **arguments)
        assert error, doc
        err: dict[str, Any] = doc["error"]
        assert set(err) == {"code", "domain", "message", "retryable", "details"}, err
        return err


@asynccontextmanager
async def mcp_server(home: Path, *args: str) -> AsyncIterator[Agent]:
    """``hearth mcp --home HOME ARGS`` over stdio, started by the SDK's client; its session."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "cli.main", "mcp", "--home", str(home), *args],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=str(REPO),
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield Agent(session)


def agent_home(ph: PaidHome, root: Path, agent: EthSigner, grant: int, per_day: str) -> Path:
    """A requester home: the agent's key and grant, the day capped at ``per_day``, the devnet's chain."""
    (root / "requester").mkdir(parents=True)
    save_key(agent, root / "requester" / "agent.key")
    (root / "requester" / "requester.toml").write_text(
        f'[budgets]\nper_day = "{per_day}"\n\n[agent]\nkey_file = "agent.key"\ngrant = {grant}\n'
    )
    chain = load_config(ph.home).chain
    assert chain is not None
    devnet.set_chain_config(root, chain)
    return root


async def test_an_agent_with_a_grant_submits_waits_hits_its_cap_and_a_restart_keeps_its_budget(
    node: LiveNode, ph: PaidHome, clip: Path, tmp_path: Path
) -> None:
    agent = EthSigner.generate(ph.net.chain_id)
    async with NodeClient(node.url) as client:  # the price of one job, to cap the day at exactly one
        cid0 = (await client.put_blob(clip))["cid"]
        _, terms = await quote_for_grant(client, node.did, agent, paid_envelope(ph, "mcp-price", cid0))
    price = terms.amount
    grant = await open_grant(ph, agent, per_job=price, per_period=10 * price)
    home = agent_home(ph, tmp_path / "agent", agent, grant, terms.to_json()["amount_usdc"])

    async with mcp_server(home, "--node", node.url) as a:
        listed = await a.session.list_tools()
        assert {t.name for t in listed.tools} == set(TOOLS)
        assert all(t.inputSchema["type"] == "object" for t in listed.tools)
        submit_schema = next(t.inputSchema for t in listed.tools if t.name == "submit_job")
        assert "idempotency_key" in submit_schema["required"]

        put = await a.ok("put_input", path=str(clip), idempotency_key="in-1")
        assert put["cid"] == cid0 and put["replayed"] is False
        again = await a.ok("put_input", path=str(clip), idempotency_key="in-1")
        assert again["cid"] == cid0 and again["replayed"] is True

        env = paid_envelope(ph, "mcp-1", put["uri"])
        sub = await a.ok("submit_job", envelope=env, workflow="clips", idempotency_key="job-1")
        assert sub["grant"] == str(grant) and sub["replayed"] is False and sub["node"] == node.did
        job = sub["job"]
        waited = await a.ok("wait_job", job=job, timeout_seconds=120)
        assert waited["done"] and waited["state"] == "completed", waited
        result = await a.ok("job_result", job=job)
        assert result["artifact_cid"].startswith("baf") and result["checks"]["passed"] is True
        assert result["gateway_url"] == f"{node.url}/ipfs/{result['artifact_cid']}"
        status = await a.ok("job_status", job=job)
        assert status["job"]["payment"]["funding"]["grant"] == str(grant)

        left = await a.ok("budget", workflow="clips")
        assert left["local"]["per_day"]["left"] == 0 and left["agent"] == agent.address
        assert int(left["grant"]["left_this_period"]) == 9 * price

        env2 = paid_envelope(ph, "mcp-2", put["uri"])
        err = await a.refused("submit_job", envelope=env2, workflow="clips", idempotency_key="job-2")
        assert (err["code"], err["domain"], err["details"]["budget"]) == (
            "budget_exceeded",
            "budget",
            "per_day",
        )
        assert err["details"]["left"]["per_day"]["left"] == 0 and err["retryable"] is False
        bad = await a.refused("submit_job", envelope=env2)  # no idempotency key
        assert bad["code"] == "invalid_arguments" and bad["details"]["tool"] == "submit_job"
        unknown = await a.refused("job_status", job="hj_nothing")
        assert unknown["code"] in ("job_not_found", "not_found")

    spent = grant_events(ph, "GrantSpent", grantId=grant)
    assert len(spent) == 1 and int(spent[0]["args"]["amount"]) == price

    async with mcp_server(home, "--node", node.url) as a:  # a restart keeps idempotency and budgets
        same = await a.ok("submit_job", envelope=env, workflow="clips", idempotency_key="job-1")
        assert same["job"] == job and same["replayed"] is True
        err = await a.refused("submit_job", envelope=env2, workflow="clips", idempotency_key="job-2")
        assert err["code"] == "budget_exceeded"
        clash = await a.refused("submit_job", envelope=env2, workflow="clips", idempotency_key="job-1")
        assert clash["code"] == "idempotency_key_conflict"
        assert (await a.ok("job_result", job=job))["artifact_cid"] == result["artifact_cid"]
        left = await a.ok("budget")
        assert left["local"]["per_day"]["used"] == price

    assert len(grant_events(ph, "GrantSpent", grantId=grant)) == 1  # never a second spend
    assert ph.w3.eth.get_transaction_count(Web3.to_checksum_address(agent.address)) == 0
    assert usdc_units(terms.to_json()["amount_usdc"]) == price
