"""``hearth grant open|show|revoke`` (the owner) and ``hearth job submit --grant`` (the agent) on a real
devnet with a real node.

The CLI runs in a worker thread (``main`` runs its own event loop) against anvil and an in-process node
whose ``[chain]`` points at it; the scheduler stays paused (funding happens before a job runs). The devnet
payer is the owner, a fresh Ethereum key the agent: it has no USDC and sends no transaction.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from web3 import Web3

from cli.main import main
from payments import devnet
from payments.keys import EthSigner, new_eth, save_key
from requester.client import NodeClient, sign_request
from tests.conftest import LiveNode, live
from tests.payments.paid import PaidHome, grant_events, grant_view, paid_envelope, paid_home

INPUT = "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"


@pytest.fixture
def ph(tmp_path: Path) -> Iterator[PaidHome]:
    home = paid_home(tmp_path / "home", chain={"funding_timeout_seconds": 60})
    try:
        yield home
    finally:
        devnet.stop(home.home)


@pytest.fixture
async def node(ph: PaidHome) -> AsyncIterator[LiveNode]:
    async with live(ph.home) as ln:
        yield ln


async def _hearth(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    """``hearth ARGS --json``: exit code, the JSON document printed, stderr."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, [*args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


def _key(ph: PaidHome, role: str) -> str:
    return next(a.key_file for a in ph.net.accounts if a.role == role)


async def test_owner_opens_shows_and_revokes_grants_and_the_agent_submits_against_one(
    node: LiveNode, ph: PaidHome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = str(ph.home)
    agent = new_eth(31337)
    assert isinstance(agent, EthSigner)
    save_key(agent, tmp_path / "agent.key")
    owner_key = _key(ph, "requester")

    # open with approve + openGrant; the agent given as its did:pkh
    code, opened, err = await _hearth(
        capsys,
        *("grant", "open", "--home", home, "--owner-key", owner_key, "--agent", agent.did),
        *("--per-job", "5", "--per-period", "20", "--period", "1h", "--expires", "1d"),
    )
    assert code == 0, err
    grant = opened["grant"]
    assert grant["grant"] == "1" and grant["agent"] == agent.address and grant["owner"] == ph.payer.address
    assert grant["per_job_max"] == "5000000" and grant["period_max"] == "20000000"
    assert grant["period_seconds"] == 3600 and grant["left_this_period"] == "20000000"
    assert [t["purpose"] for t in opened["txs"]] == ["approve", "openGrant"]
    assert all(t["success"] and t["gas_used"] > 21_000 and t["hash"].startswith("0x") for t in opened["txs"])
    assert opened["allowance"] == str(20_000_000 * 24)  # what the grant can spend over its day of life

    # the permit form: one transaction, the allowance grows by this grant's lifetime cap
    code, permitted, err = await _hearth(
        capsys,
        *("grant", "open", "--home", home, "--owner-key", owner_key, "--agent", agent.address),
        *("--per-job", "1", "--per-period", "1", "--period", "1d", "--expires", "2d", "--permit"),
    )
    assert code == 0, err
    assert permitted["grant"]["grant"] == "2" and permitted["permit"] is True
    assert [t["purpose"] for t in permitted["txs"]] == ["openGrantWithPermit"]
    assert permitted["allowance"] == str(20_000_000 * 24 + 1_000_000 * 2)

    # show, for people too
    code, shown, _ = await _hearth(capsys, "grant", "show", "1", "--home", home)
    assert code == 0 and shown["grant"]["left_this_period"] == "20000000"
    assert time.time() < shown["grant"]["period_ends"] <= time.time() + 3600 + 5
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["grant", "show", "1", "--home", home]) == 0
    human = capsys.readouterr().out
    assert "grant 1  (open)" in human and "20 left" in human

    # the agent submits a job funded from grant 1, and waits for the escrow to be funded
    env = paid_envelope(ph, "grant-cli-1", INPUT)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(env))
    code, submitted, err = await _hearth(
        capsys,
        *("job", "submit", str(tmp_path / "job.yaml"), "--node", node.url),
        *("--grant", "1", "--agent-key", str(tmp_path / "agent.key"), "--wait"),
    )
    assert code == 0, (err, submitted)
    amount = int(submitted["funding_terms"]["amount"])
    assert submitted["funding"]["grant"] == "1" and submitted["job"]["requester"] == agent.did
    funding = submitted["status"]["job"]["payment"]["funding"]
    assert funding["state"] == "funded" and funding["grant"] == "1"
    assert len(grant_events(ph, "GrantSpent", grantId=1)) == 1
    code, shown, _ = await _hearth(capsys, "grant", "show", "1", "--home", home)
    assert shown["grant"]["spent_this_period"] == str(amount)
    assert shown["grant"]["left_this_period"] == str(20_000_000 - amount)

    # only the owner revokes
    code, refused, _ = await _hearth(
        capsys, "grant", "revoke", "1", "--home", home, "--owner-key", _key(ph, "validator")
    )
    assert code == 2 and refused["error"]["code"] == "not_grant_owner"
    code, revoked, err = await _hearth(
        capsys, "grant", "revoke", "1", "--home", home, "--owner-key", owner_key
    )
    assert code == 0, err
    assert revoked["grant"]["revoked"] is True and revoked["grant"]["left_this_period"] == "0"
    assert [t["purpose"] for t in revoked["txs"]] == ["revokeGrant"] and revoked["txs"][0]["gas_used"] > 0
    assert grant_view(ph, 1)[6] is True

    # the funded job's acceptance again, after the revocation: the job as it is (its entry exists)
    async with NodeClient(node.url) as client:
        request = sign_request(agent, node.did, {"job": paid_envelope(ph, "grant-cli-1", INPUT)})
        again = await client.submit(request, None, submitted["funding"])
    assert again["accepted_now"] is False and again["job"]["state"] == "accepted"

    # a second job against the revoked grant: the node's 402, exit 1, nothing signed by the owner
    env = paid_envelope(ph, "grant-cli-2", INPUT)
    (tmp_path / "job2.yaml").write_text(yaml.safe_dump(env))
    code, refused, _ = await _hearth(
        capsys,
        *("job", "submit", str(tmp_path / "job2.yaml"), "--node", node.url),
        *("--grant", "1", "--agent-key", str(tmp_path / "agent.key")),
    )
    assert code == 1 and refused["error"]["code"] == "grant_revoked"
    assert refused["error"]["details"]["left_this_period"] == "0"
    assert ph.w3.eth.get_transaction_count(Web3.to_checksum_address(agent.address)) == 0


async def test_grant_commands_refuse_bad_arguments_before_sending(
    ph: PaidHome, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home, owner_key = str(ph.home), _key(ph, "requester")
    agent = new_eth(31337).did
    base = ["grant", "open", "--home", home, "--owner-key", owner_key, "--agent", agent]
    for extra, code_name in (
        (["--per-job", "abc", "--per-period", "1"], "usage"),
        (["--per-job", "0.0000001", "--per-period", "1"], "usage"),
        (["--per-job", "1", "--per-period", "1", "--period", "0"], "usage"),
        (["--per-job", "1", "--per-period", "1", "--expires", "1y"], "usage"),
        (["--per-job", "2", "--per-period", "1"], "invalid_grant_terms"),
        (["--per-job", "0", "--per-period", "1"], "invalid_grant_terms"),
    ):
        code, doc, _ = await _hearth(capsys, *base, *extra)
        assert code == 2 and doc["error"]["code"] == code_name, (extra, doc)
    code, doc, _ = await _hearth(
        capsys, *base[:-1], "did:pkh:eip155:1:" + ph.payer.address, "--per-job", "1", "--per-period", "1"
    )
    assert code == 2 and doc["error"]["code"] == "usage"
    code, doc, _ = await _hearth(capsys, "grant", "show", "7", "--home", home)
    assert code == 2 and doc["error"]["code"] == "grant_unknown"
    assert (
        ph.w3.eth.get_transaction_count(Web3.to_checksum_address(ph.payer.address)) == 0
    )  # nothing was sent
