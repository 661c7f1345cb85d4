"""Settlement survives crashes and chain outages: nothing is paid twice, nothing is lost.

- ``kill -9`` between broadcast and recording, 20 times: the daemon (a real ``hearth run`` process, started
  through :mod:`tests.crashnode` with the ``after_broadcast`` fault point) kills itself with SIGKILL right
  after ``eth_sendRawTransaction`` returned and before it recorded the fact, once per life, for 10 gasless
  fundings and then 10 releases. Every restart resolves the transaction by hash. At the end every job is
  settled exactly once: one ``settled`` transition each, one ``Released`` event each on chain, the
  provider's balance up by exactly the receipts' sum, and the node's wallet sent exactly 20 transactions.
- The RPC stopped for 30 s mid-settlement (anvil frozen with SIGSTOP): the receipt is still taken, the
  node reports the chain down and retries with backoff, and the release completes once anvil is back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.journal import Journal
from payments import devnet
from payments.outbox import AFTER_BROADCAST
from payments.receipts import FundingTerms
from requester.client import NodeClient
from sandbox.ffmpeg import make_test_clip
from tests.conftest import REPO, DaemonProcess, free_port, live
from tests.payments.paid import PaidHome, paid_envelope, paid_home, quote_and_fund, receipt_for, wait_for

JOBS = 10
LIFE_TIMEOUT_SECONDS = 60
OUTAGE_SECONDS = 30
# ten jobs held at once must fit a 2-core machine
SMALL = {"timeout_seconds": 120, "max_output_mb": 20, "cpus": 0.1, "memory_mb": 128, "gpus": 0}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_clip(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=1, width=160, height=120)


@pytest.fixture
def crash_home(tmp_path: Path, sandbox_images: dict[str, str]) -> Iterator[tuple[PaidHome, DaemonProcess]]:
    port = free_port()
    config = {
        "api": {"host": "127.0.0.1", "port": port},
        "scheduler": {"paused": True},
        "policy": {"per_did_concurrency": JOBS},
    }
    ph = paid_home(tmp_path / "home", config)
    daemon = DaemonProcess(ph.home, port)
    try:
        yield ph, daemon
    finally:
        daemon.stop()
        devnet.stop(ph.home)


def _env(*, rpc_url: str, paused: bool) -> dict[str, str]:
    return {"HEARTH_CHAIN__RPC_URL": rpc_url, "HEARTH_SCHEDULER__PAUSED": "true" if paused else "false"}


def _spawn_crashing(daemon: DaemonProcess, point: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``daemon``'s ``hearth run`` through tests.crashnode, dying at fault ``point``; no wait."""
    argv = ["run", "--home", str(daemon.home), "--port", str(daemon.port)]
    with daemon.log.open("a") as log:  # a file, not a pipe: a full pipe would stall the daemon
        daemon.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crashnode", point, *argv],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    return daemon.proc


def _dead_rpc() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: every call is refused


def _crash_lives(daemon: DaemonProcess, rpc_url: str, count: int) -> list[int]:
    """Run ``count`` daemon lives that each die at their first broadcast; their exit codes."""
    codes = []
    for _ in range(count):
        proc = _spawn_crashing(daemon, AFTER_BROADCAST, _env(rpc_url=rpc_url, paused=True))
        try:
            codes.append(proc.wait(LIFE_TIMEOUT_SECONDS))
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"a life did not reach a broadcast: {daemon.log.read_text()[-3000:]}")
    return codes


def _journal_view(ph: PaidHome) -> tuple[dict[str, str], dict[str, int], list[Any]]:
    with Journal.open(ph.home / "state" / "journal.sqlite3") as journal:
        jobs = {j.id: j.state for j in journal.list_jobs(limit=100)}
        settled = {j: sum(1 for e in journal.events(j) if e.to_state == "settled") for j in jobs}
        txs = journal.txs()
    return jobs, settled, txs


async def test_kill_9_between_broadcast_and_recording_20_times_settles_every_job_exactly_once(
    crash_home: tuple[PaidHome, DaemonProcess], requester: Any, clip: Path
) -> None:
    ph, daemon = crash_home
    before = ph.balances()

    # 1. With the RPC unreachable, the node accepts 10 jobs and their gasless authorizations (it cannot
    #    simulate them now; it will before sending).
    daemon.start(env=_env(rpc_url=_dead_rpc(), paused=True))
    terms: dict[str, FundingTerms] = {}
    async with NodeClient(daemon.url) as client:
        node_did = await client.node_did()
        cid = (await client.put_blob(clip))["cid"]
        for n in range(JOBS):
            env = paid_envelope(ph, f"crash-{n}", cid, limits=SMALL)
            job, t = await quote_and_fund(client, node_did, requester, ph, env)
            terms[job] = t
    daemon.stop()

    # 2. Ten lives, each killed right after broadcasting one fundWithAuthorization.
    codes = _crash_lives(daemon, ph.net.rpc_url, JOBS)
    assert codes == [-signal.SIGKILL] * JOBS

    # 3. A calm life: the last funding is resolved by hash, all ten run and complete.
    daemon.start(env=_env(rpc_url=ph.net.rpc_url, paused=False))
    async with NodeClient(daemon.url) as client:
        for job in terms:
            view = await wait_for(client, job, {"completed", "failed", "expired"}, limit=180)
            assert view["state"] == "completed", view
            assert view["payment"]["funding"]["state"] == "funded"
    daemon.stop()

    # 4. With the RPC unreachable again, the validator's ten receipts are taken (simulated later).
    daemon.start(env=_env(rpc_url=_dead_rpc(), paused=True))
    amounts = {}
    async with NodeClient(daemon.url) as client:
        for job, t in terms.items():
            body = await receipt_for(client, job, t, ph.validator)
            amounts[job] = int(body["receipt"]["amount"])
            assert (await client.post_receipt(job, body))["job"]["state"] == "validated"
    daemon.stop()

    # 5. Ten lives, each killed right after broadcasting one release.
    codes = _crash_lives(daemon, ph.net.rpc_url, JOBS)
    assert codes == [-signal.SIGKILL] * JOBS

    # 6. A calm life resolves the last release; everything is settled.
    daemon.start(env=_env(rpc_url=ph.net.rpc_url, paused=True))
    async with NodeClient(daemon.url) as client:
        for job in terms:
            await wait_for(client, job, {"settled"}, limit=60)
    daemon.stop()

    assert daemon.log.read_text().count(f"fault point {AFTER_BROADCAST}: killing the node") == 2 * JOBS
    jobs, settled, txs = _journal_view(ph)
    assert set(jobs.values()) == {"settled"} and all(n == 1 for n in settled.values())
    for job, t in terms.items():
        assert ph.released_events(t.to_json()["escrow_job_id"]) == 1, job
    assert sorted((tx.purpose, tx.state) for tx in txs) == sorted(
        [("fund", "confirmed")] * JOBS + [("release", "confirmed")] * JOBS
    )
    # the wallet sent exactly the 20 recorded transactions, with nonces 0..19
    assert ph.w3.eth.get_transaction_count(ph.node_wallet.address) == 2 * JOBS
    assert sorted(tx.nonce for tx in txs) == list(range(2 * JOBS))
    after = ph.balances()
    paid = sum(amounts.values())
    assert after["provider"] - before["provider"] == paid
    assert before["payer"] - after["payer"] == paid
    assert after["escrow"] == 0
    assert ph.w3.eth.get_transaction_count(ph.payer.address) == 0  # gasless for the payer throughout


async def test_rpc_stopped_for_30s_mid_settlement_settles_after_it_returns(
    tmp_path: Path, sandbox_images: dict[str, str], requester: Any, clip: Path
) -> None:
    ph = paid_home(tmp_path / "home", {"scheduler": {"paused": False}})
    anvil = ph.net.pid
    try:
        from tests.payments.paid import set_chain

        set_chain(ph.home, rpc_timeout_seconds=2.0, rpc_backoff_max_seconds=4.0)
        async with live(ph.home) as node, NodeClient(node.url) as client:
            cid = (await client.put_blob(clip))["cid"]
            job, terms = await quote_and_fund(
                client, node.did, requester, ph, paid_envelope(ph, "outage-1", cid)
            )
            assert (await wait_for(client, job, {"completed", "failed"}))["state"] == "completed"
            body = await receipt_for(client, job, terms, ph.validator)
            before = ph.balances()

            os.kill(anvil, signal.SIGSTOP)  # the RPC stops answering; connections hang until they time out
            stopped_at = time.monotonic()
            try:
                answer = await client.post_receipt(job, body)
                assert answer["job"]["state"] == "validated"  # taken; the release waits for the chain
                while time.monotonic() - stopped_at < OUTAGE_SECONDS:
                    await asyncio.sleep(1)
                    view = (await client.status(job))["job"]
                    assert view["state"] == "validated"
                assert node.node.settlement is not None and node.node.settlement.chain_up is False
                assert "hearth_chain_up 0.0" in node.node.metrics.render().decode()
            finally:
                os.kill(anvil, signal.SIGCONT)
            resumed_at = time.monotonic()
            view = await wait_for(client, job, {"settled"}, limit=30)
            assert time.monotonic() - resumed_at < 30
            assert node.node.settlement.chain_up is True
        release = view["payment"]["settlement"]["tx"]
        assert release["state"] == "confirmed"
        assert [tx["purpose"] for tx in view["payment"]["txs"]] == ["fund", "release"]  # sent once
        after = ph.balances()
        assert after["provider"] - before["provider"] == int(body["receipt"]["amount"])
        assert ph.released_events(terms.to_json()["escrow_job_id"]) == 1
    finally:
        devnet.stop(ph.home)


def test_the_crash_launcher_refuses_a_fault_point_that_does_not_exist() -> None:
    """A misspelt point would never fire and the crash test would wait out its lives: it is refused."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.crashnode", "after_nothing", "run", "--home", "/nonexistent"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "usage: python -m tests.crashnode {after_record,after_broadcast}" in done.stderr
