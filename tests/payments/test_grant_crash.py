"""A grant-funded job survives ``kill -9`` between broadcasting ``fundFromGrant`` and recording it.

The short variant of :mod:`tests.payments.test_crash_safety`'s run for grants: a real ``hearth run``
process (through :mod:`tests.crashnode`, fault point ``after_broadcast``) accepts a job funded from a
spending grant and dies by SIGKILL right after ``eth_sendRawTransaction`` returned for its
``fundFromGrant``, before it recorded that. The next life resolves the transaction by hash: the job is
funded exactly once (one ``GrantSpent``, one ``Funded``, one fund transaction), runs, and is released
once against the validator's receipt; the owner paid exactly the receipt's amount.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from web3 import Web3

from core.journal import Journal
from payments import devnet
from payments.keys import EthSigner
from payments.outbox import AFTER_BROADCAST
from requester.client import NodeClient, NodeUnreachable, sign_request
from sandbox.ffmpeg import make_test_clip
from tests.conftest import REPO, DaemonProcess, free_port
from tests.payments.paid import (
    PaidHome,
    grant_events,
    grant_spend,
    open_grant,
    paid_envelope,
    paid_home,
    quote_for_grant,
    receipt_for,
    wait_for,
)

LIFE_TIMEOUT_SECONDS = 60
SMALL = {"timeout_seconds": 120, "max_output_mb": 20, "cpus": 0.1, "memory_mb": 128, "gpus": 0}


@pytest.fixture
def crash_home(tmp_path: Path, sandbox_images: dict[str, str]) -> Iterator[tuple[PaidHome, DaemonProcess]]:
    port = free_port()
    ph = paid_home(tmp_path / "home", {"api": {"host": "127.0.0.1", "port": port}})
    daemon = DaemonProcess(ph.home, port)
    try:
        yield ph, daemon
    finally:
        daemon.stop()
        devnet.stop(ph.home)


def _start_crashing(daemon: DaemonProcess, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``hearth run`` through tests.crashnode, dying at its first broadcast; returns once it is ready."""
    argv = ["run", "--home", str(daemon.home), "--port", str(daemon.port)]
    with daemon.log.open("a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crashnode", AFTER_BROADCAST, *argv],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    daemon.proc = proc
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, daemon.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(daemon.url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.05)
    pytest.fail(f"the crashing daemon never became ready: {daemon.log.read_text()[-3000:]}")


async def test_kill_9_after_broadcasting_fund_from_grant_funds_and_settles_once(
    crash_home: tuple[PaidHome, DaemonProcess], tmp_path: Path
) -> None:
    ph, daemon = crash_home
    clip = make_test_clip(tmp_path / "clip.mp4", seconds=1, width=160, height=120)
    agent = EthSigner.generate(31337)
    paused = {"HEARTH_SCHEDULER__PAUSED": "true"}

    # 1. A life that accepts the grant-funded job, broadcasts fundFromGrant and is killed at once.
    proc = _start_crashing(daemon, paused)
    async with NodeClient(daemon.url) as client:
        node_did = await client.node_did()
        cid = (await client.put_blob(clip))["cid"]
        env = paid_envelope(ph, "grant-crash-1", cid, limits=SMALL)
        quote, terms = await quote_for_grant(client, node_did, agent, env)
        grant = await open_grant(ph, agent, per_job=terms.amount, per_period=terms.amount)
        before = ph.balances()
        try:
            body = await client.submit(
                sign_request(agent, node_did, {"job": env}), quote, grant_spend(agent, grant, terms)
            )
            job = str(body["job"]["id"])
        except NodeUnreachable:  # the kill may come before the answer: the acceptance was committed first
            job = ""
    assert proc.wait(LIFE_TIMEOUT_SECONDS) == -signal.SIGKILL
    assert daemon.log.read_text().count(f"fault point {AFTER_BROADCAST}: killing the node") == 1
    with Journal.open(ph.home / "state" / "journal.sqlite3") as journal:
        (accepted,) = journal.list_jobs(limit=10)
        assert job in ("", accepted.id) and accepted.state == "accepted"
        job = accepted.id
        (tx,) = journal.txs(job)
        assert tx.purpose == "fund" and tx.state == "signed"  # broadcast, but the journal never heard

    # 2. A calm life resolves it by hash, runs the job; the receipt releases it.
    daemon.start(env={"HEARTH_SCHEDULER__PAUSED": "false"})
    async with NodeClient(daemon.url) as client:
        view = await wait_for(client, job, {"completed", "failed", "expired"}, limit=120)
        assert view["state"] == "completed", view
        assert view["payment"]["funding"]["state"] == "funded"
        receipt = await receipt_for(client, job, terms, ph.validator)
        amount = int(receipt["receipt"]["amount"])
        assert (await client.post_receipt(job, receipt))["job"]["state"] == "validated"
        await wait_for(client, job, {"settled"}, limit=60)
    daemon.stop()

    escrow_job = terms.to_json()["escrow_job_id"]
    assert len(grant_events(ph, "GrantSpent", grantId=grant)) == 1
    assert len(grant_events(ph, "Funded", jobId=bytes.fromhex(escrow_job[2:]))) == 1
    assert ph.released_events(escrow_job) == 1
    with Journal.open(ph.home / "state" / "journal.sqlite3") as journal:
        txs = journal.txs()
        settled = [e for e in journal.events(job) if e.to_state == "settled"]
    assert sorted((t.purpose, t.state) for t in txs) == [("fund", "confirmed"), ("release", "confirmed")]
    assert len(settled) == 1
    assert (
        ph.w3.eth.get_transaction_count(Web3.to_checksum_address(ph.node_wallet.address)) == 2
    )  # one fund, one release
    after = ph.balances()
    assert before["payer"] - after["payer"] == amount
    assert after["provider"] - before["provider"] == amount
    assert ph.w3.eth.get_transaction_count(Web3.to_checksum_address(agent.address)) == 0
