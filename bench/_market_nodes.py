"""A local market for ``market.py``'s routing part: a devnet and N real node daemons registered on it.

Private to ``bench/``, not a benchmark itself; ``market.py`` imports it after ``_common``.

- the chain: ``payments.devnet.up`` on a home of its own (anvil, ``TestUSDC``, ``HearthEscrow``,
  ``HearthRegistry``, the requester's and validator's funded wallets), stopped at the end;
- the nodes: ``python -m cli.main run`` each on a home of its own — its DID (``node.key``), its wallet
  (``wallet.key``, the payout address and the registering key, given gas), its price (``[pricing]
  cpu_second``), ``[node] public_url`` on its port, ``[chain]`` on the devnet, the scheduler paused (a job
  funded stays queued: nothing runs) and no input gateways (a quote prices on the envelope's limits, the
  input not fetched). All start at once; each is stopped by its own process (SIGTERM, then SIGKILL);
- the registry: a fresh ``HearthRegistry`` per market size, each of its nodes registered there by its own
  wallet (``RegistryChain.register``, a signed transaction).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import requests
from _common import REPO, free_port
from eth_account import Account
from eth_utils.address import to_checksum_address
from web3 import AsyncHTTPProvider, AsyncWeb3

from core.config import ChainSection, load_config
from payments import devnet
from payments.escrow_build import load_artifact
from payments.keys import EthSigner, load_key, new_ed25519, save_key
from payments.registry_chain import RegistryChain

READY_TIMEOUT_SECONDS = 180.0  # 16 daemons importing at once on 2 cores
STOP_TIMEOUT_SECONDS = 20.0
NODE_GAS_WEI = 10**18
BASE_CPU_SECOND = Decimal("0.0001")  # node i asks BASE * (1 + i/10): the cheapest is node 0


@dataclass
class NodeDaemon:
    """One node daemon: its home, port, DID, wallet and process."""

    home: Path
    port: int
    did: str
    wallet: EthSigner
    price: Decimal
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        with (self.home / "daemon.log").open("ab") as log:  # a file: a full pipe would stall the daemon
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "run", "--home", str(self.home), "--port", str(self.port)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HEARTH_LOGGING__LEVEL": "WARNING"},
            )

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = (self.home / "daemon.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the node at {self.home} exited:\n{tail}")
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to this daemon's own process, SIGKILL past the timeout."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Market:
    """The devnet, its chain section, the requester's and validator's wallets, and the nodes."""

    root: Path
    net: devnet.Devnet
    chain: ChainSection
    payer: EthSigner
    validator_did: str
    nodes: list[NodeDaemon]

    def rpc(self, method: str, *params: Any) -> Any:
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}
        answer = requests.post(self.net.rpc_url, json=body, timeout=30).json()
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def deploy_registry(self) -> str:
        """A fresh, empty ``HearthRegistry`` (from anvil's first dev account); its address."""
        deployer = self.rpc("eth_accounts")[0]
        tx = self.rpc(
            "eth_sendTransaction", {"from": deployer, "data": load_artifact("HearthRegistry").bytecode}
        )
        for _ in range(400):
            receipt = self.rpc("eth_getTransactionReceipt", tx)
            if receipt is not None:
                return to_checksum_address(receipt["contractAddress"])
            time.sleep(0.025)
        raise RuntimeError("the registry's deployment was not mined")

    async def register(self, registry: str, nodes: list[NodeDaemon]) -> None:
        """Each node's wallet lists its DID and URL in ``registry`` (signed transactions, all mined)."""
        w3: AsyncWeb3[Any] = AsyncWeb3(AsyncHTTPProvider(self.net.rpc_url))
        try:
            chain = RegistryChain(w3, registry, rpc_url=self.net.rpc_url)

            async def one(node: NodeDaemon) -> None:
                call = chain.register(node.did, node.url)
                sender = to_checksum_address(node.wallet.address)
                nonce = await w3.eth.get_transaction_count(sender)
                tx = await call.build_transaction(
                    {"from": sender, "nonce": nonce, "chainId": self.net.chain_id}
                )
                signed = Account.sign_transaction(tx, node.wallet.private_key_bytes())
                sent = await w3.eth.send_raw_transaction(signed.raw_transaction)
                receipt = await w3.eth.wait_for_transaction_receipt(sent)
                if receipt["status"] != 1:
                    raise RuntimeError(f"registering {node.did} failed")

            await asyncio.gather(*(one(n) for n in nodes))
        finally:
            await w3.provider.disconnect()


def _node_home(root: Path, i: int, chain: ChainSection, market_rpc: Any) -> NodeDaemon:
    home = root / f"node-{i:02d}"
    home.mkdir(parents=True)
    port = free_port()
    key = new_ed25519()
    save_key(key, home / "node.key")
    wallet = EthSigner.generate(chain.chain_id)
    save_key(wallet, home / "wallet.key")
    market_rpc("anvil_setBalance", wallet.address, hex(NODE_GAS_WEI))
    price = BASE_CPU_SECOND * (1 + Decimal(i) / 10)
    sections: dict[str, dict[str, Any]] = {
        "node": {"public_url": f"http://127.0.0.1:{port}", "name": f"bench-{i}"},
        "api": {"host": "127.0.0.1", "port": port},
        "scheduler": {"paused": True},
        "pricing": {"cpu_second": str(price)},
        "pricing.surge": {"max_factor": 1.0},  # asks stay put as the cheapest node's funded jobs queue up
        "capacity": {"overcommit": 100.0},  # room for every round's queued job (the scheduler is paused)
        "storage": {"gateways": []},
        "logging": {"level": "WARNING"},
    }
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    (home / "node.toml").write_text("\n".join(lines) + "\n")
    devnet.set_chain_config(home, chain.model_copy(update={"wallet_key_file": "wallet.key"}))
    return NodeDaemon(home, port, key.did, wallet, price)


def start_all(nodes: list[NodeDaemon]) -> float:
    """Spawn every daemon at once and wait until all answer /readyz; the seconds it took."""
    t0 = time.perf_counter()
    for node in nodes:
        node.spawn()
    waiting = list(nodes)
    while waiting:
        if time.perf_counter() - t0 > READY_TIMEOUT_SECONDS:
            raise TimeoutError(f"{len(waiting)} nodes not ready in {READY_TIMEOUT_SECONDS:.0f} s")
        waiting = [n for n in waiting if not n.ready()]
        if waiting:
            time.sleep(0.2)
    return time.perf_counter() - t0


@contextlib.contextmanager
def market(root: Path, count: int) -> Iterator[tuple[Market, float]]:
    """A devnet and ``count`` ready node daemons on it for the block, with the seconds they took to start;
    every daemon and the devnet's anvil stopped afterwards (by their own processes), however it ends."""
    dev_home = root / "devnet"
    dev_home.mkdir(parents=True)
    net = devnet.up(dev_home, port=free_port())
    nodes: list[NodeDaemon] = []
    try:
        chain = load_config(dev_home).chain
        assert chain is not None
        keys = {a.role: load_key(Path(a.key_file)) for a in net.accounts}
        payer, validator = keys["requester"], keys["validator"]
        assert isinstance(payer, EthSigner)
        m = Market(root, net, chain, payer, validator.did, nodes)
        nodes.extend(_node_home(root, i, chain, m.rpc) for i in range(count))
        started = start_all(nodes)
        yield m, started
    finally:
        for node in nodes:
            node.stop()
        devnet.stop(dev_home)
