"""A node lists itself in the on-chain registry at start, through its transaction outbox; it leaves by
``hearth market leave``. Real anvil (``hearth devnet``), the committed HearthRegistry, real daemons.

- started with ``[market]`` set, the node registers: the wallet's record names its DID and endpoint, and
  its signed offer names the same endpoint and that wallet as payout address;
- restarted unchanged, it sends nothing (the wallet's nonce stays); with another endpoint, one update;
- ``hearth market leave`` removes the record (hash, block, gas used printed); a second leave is refused
  ``not_registered``;
- killed with SIGKILL right after recording the registration, or right after broadcasting it, then
  restarted: exactly one registration landed and the journal shows it confirmed.
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
from pathlib import Path
from typing import Any

import pytest
from eth_utils.address import to_checksum_address
from web3.contract import Contract

from core.journal import Journal, TxRecord
from payments import devnet
from payments.escrow_build import load_artifact
from payments.outbox import AFTER_BROADCAST, AFTER_RECORD
from requester.client import NodeClient
from tests.conftest import REPO, DaemonProcess, free_port
from tests.payments.paid import PaidHome, paid_home

LISTED_TIMEOUT_SECONDS = 60


@pytest.fixture
def listed_home(tmp_path: Path) -> Iterator[tuple[PaidHome, DaemonProcess]]:
    port = free_port()
    config = {
        "api": {"host": "127.0.0.1", "port": port},
        "market": {"endpoint": f"http://127.0.0.1:{port}"},
    }
    ph = paid_home(tmp_path / "home", config)
    daemon = DaemonProcess(ph.home, port)
    try:
        yield ph, daemon
    finally:
        daemon.stop()
        devnet.stop(ph.home)


def _registry(ph: PaidHome) -> Contract:
    abi = load_artifact("HearthRegistry").abi
    return ph.w3.eth.contract(address=to_checksum_address(ph.net.registry), abi=abi)


def _record(ph: PaidHome) -> tuple[bool, str, str]:
    registered, did, endpoint, _, _ = _registry(ph).functions.provider(ph.node_wallet.address).call()
    return bool(registered), str(did), str(endpoint)


def _nonce(ph: PaidHome) -> int:
    return int(ph.w3.eth.get_transaction_count(to_checksum_address(ph.node_wallet.address)))


def _registry_events(ph: PaidHome, name: str) -> int:
    event = getattr(_registry(ph).events, name)
    return len(event().get_logs(from_block=0, argument_filters={"wallet": ph.node_wallet.address}))


def _registry_txs(ph: PaidHome) -> list[TxRecord]:
    with Journal.open(ph.home / "state" / "journal.sqlite3") as journal:
        return journal.txs(purposes=("register", "leave"))


async def _market(daemon: DaemonProcess, *, until: str) -> dict[str, Any]:
    """The overview's ``market`` block once its state is ``until``."""
    deadline = time.monotonic() + LISTED_TIMEOUT_SECONDS
    async with NodeClient(daemon.url) as client:
        while True:
            market: dict[str, Any] = (await client.overview(recent=0))["node"]["market"]
            if market["state"] == until:
                return market
            assert market["state"] != "failed", market
            assert time.monotonic() < deadline, f"listing stuck: {market}"
            await asyncio.sleep(0.1)


def _metrics(daemon: DaemonProcess) -> str:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _spawn_crashing(daemon: DaemonProcess, point: str) -> subprocess.Popen[bytes]:
    """``hearth run`` through tests.crashnode, dying at fault ``point``; no wait."""
    argv = ["run", "--home", str(daemon.home), "--port", str(daemon.port)]
    with daemon.log.open("a") as log:  # a file, not a pipe: a full pipe would stall the daemon
        return subprocess.Popen(
            [sys.executable, "-m", "tests.crashnode", point, *argv],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )


def _hearth(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *argv, "--home", str(home)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_register_at_start_follow_restarts_update_and_leave(
    listed_home: tuple[PaidHome, DaemonProcess],
) -> None:
    ph, daemon = listed_home
    endpoint = daemon.url
    assert _record(ph) == (False, "", "") and _nonce(ph) == 0

    # 1. First start: the node registers its DID and the endpoint its offer names.
    daemon.start()
    market = await _market(daemon, until="listed")
    async with NodeClient(daemon.url) as client:
        offer = await client.capacity()
    metrics = await asyncio.to_thread(_metrics, daemon)
    did = str(offer["node"])
    assert _record(ph) == (True, did, endpoint)
    assert offer["endpoint"] == endpoint and offer["payout_address"] == ph.node_wallet.address
    assert market["wallet"] == ph.node_wallet.address and market["endpoint"] == endpoint
    assert market["registry"] == ph.net.registry and market["error"] is None
    assert 'hearth_market_listing{state="listed"} 1.0' in metrics
    assert 'hearth_market_listing{state="pending"} 0.0' in metrics
    daemon.stop()
    [register] = _registry_txs(ph)
    assert (register.purpose, register.job, register.state, register.hash) == (
        "register",
        None,
        "confirmed",
        market["tx"],
    )
    assert register.gas_used is not None and _nonce(ph) == 1
    print(f"\ngas used: register {register.gas_used}")

    # 2. Restarted unchanged: the record is read, nothing is sent.
    daemon.start()
    again = await _market(daemon, until="listed")
    daemon.stop()
    assert again["tx"] is None and _nonce(ph) == 1 and len(_registry_txs(ph)) == 1

    # 3. Another endpoint: one update, and the offer names the new one.
    moved = f"{endpoint}/hearth"
    daemon.start(env={"HEARTH_MARKET__ENDPOINT": moved})
    await _market(daemon, until="listed")
    async with NodeClient(daemon.url) as client:
        assert (await client.capacity())["endpoint"] == moved
    daemon.stop()
    assert _record(ph) == (True, did, moved) and _nonce(ph) == 2
    assert _registry_events(ph, "Registered") == 1 and _registry_events(ph, "Updated") == 1
    update = _registry_txs(ph)[-1]
    assert (update.purpose, update.state) == ("register", "confirmed") and update.gas_used is not None
    print(f"gas used: update {update.gas_used}")

    # 4. `hearth market leave`: the record goes; the journal holds the leave, confirmed.
    left = _hearth(ph.home, "market", "leave", "--json")
    assert left.returncode == 0, left.stderr + left.stdout
    result = json.loads(left.stdout)
    assert result["left"] is True and result["wallet"] == ph.node_wallet.address
    assert result["registers_again_at_start"] is True
    tx = result["tx"]
    assert tx["purpose"] == "leave" and tx["state"] == "confirmed" and tx["block_number"] > 0
    assert tx["gas_used"] > 0
    print(f"gas used: leave {tx['gas_used']}")
    assert _record(ph) == (False, "", "") and _nonce(ph) == 3
    assert [t.purpose for t in _registry_txs(ph)] == ["register", "register", "leave"]

    # 5. Leaving again: refused, structured, exit code 1; nothing sent.
    human = _hearth(ph.home, "market", "leave")
    assert human.returncode == 1 and "not_registered" in human.stderr, human.stderr
    again_json = _hearth(ph.home, "market", "leave", "--json")
    assert again_json.returncode == 1
    error = json.loads(again_json.stdout)["error"]
    assert error["code"] == "not_registered" and error["details"]["wallet"] == ph.node_wallet.address
    assert _nonce(ph) == 3


def test_leave_prints_progress_and_the_transaction_for_people(
    listed_home: tuple[PaidHome, DaemonProcess],
) -> None:
    ph, daemon = listed_home
    daemon.start()
    asyncio.run(_market(daemon, until="listed"))
    status = _hearth(ph.home, "status")
    assert status.returncode == 0, status.stderr
    assert "registry listing listed" in status.stdout, status.stdout
    # the node is still running: the leave shares its journal and nonces
    left = _hearth(ph.home, "market", "leave")
    assert left.returncode == 0, left.stderr
    assert "leave transaction 0x" in left.stderr and "confirmed" in left.stderr
    assert "left the registry" in left.stdout and "gas used" in left.stdout and "block" in left.stdout
    assert "registers again at its next start" in left.stdout
    assert _record(ph) == (False, "", "") and _nonce(ph) == 2


@pytest.mark.parametrize("point", [AFTER_RECORD, AFTER_BROADCAST])
async def test_kill_9_during_registration_lands_exactly_one(
    listed_home: tuple[PaidHome, DaemonProcess], point: str
) -> None:
    ph, daemon = listed_home
    proc = _spawn_crashing(daemon, point)
    assert proc.wait(LISTED_TIMEOUT_SECONDS) == -9, daemon.log.read_text()[-3000:]
    assert f"fault point {point}: killing the node" in daemon.log.read_text()
    [recorded] = _registry_txs(ph)
    assert recorded.purpose == "register" and recorded.state == "signed"  # recorded, outcome unknown

    daemon.start()
    market = await _market(daemon, until="listed")
    async with NodeClient(daemon.url) as client:
        did = str((await client.capacity())["node"])
    daemon.stop()
    assert market["tx"] == recorded.hash  # followed, not sent again
    assert _record(ph) == (True, did, daemon.url)
    assert _nonce(ph) == 1 and _registry_events(ph, "Registered") == 1
    [register] = _registry_txs(ph)
    assert register.hash == recorded.hash and register.state == "confirmed"


async def test_a_chain_that_does_not_answer_never_holds_up_serving(
    listed_home: tuple[PaidHome, DaemonProcess],
) -> None:
    ph, daemon = listed_home
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: every call is refused
    daemon.start(env={"HEARTH_CHAIN__RPC_URL": dead})  # ready although the registry cannot be read
    market = await _market(daemon, until="chain_unavailable")
    assert dead in market["error"] and market["tx"] is None
    async with NodeClient(daemon.url) as client:  # and it serves
        assert (await client.capacity())["endpoint"] == daemon.url
    daemon.stop()
    assert _registry_txs(ph) == [] and _nonce(ph) == 0

    daemon.start()  # the chain answers again: listed
    await _market(daemon, until="listed")
    daemon.stop()
    assert _nonce(ph) == 1 and _record(ph)[0] is True
