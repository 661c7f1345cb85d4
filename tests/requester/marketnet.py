"""Helpers for market tests: a devnet (anvil, the committed contracts), fresh registries on it, funded
wallets that register, and real nodes serving their signed offers at the endpoint they name.

Registering is done here directly with each wallet's key (``RegistryChain.register`` signed and sent), so
the tests do not depend on how a node registers itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer
from eth_account import Account
from web3 import AsyncHTTPProvider, AsyncWeb3

from core.config import load_config
from node.daemon import Node
from node.server import build_app
from payments import devnet
from payments.escrow_build import load_artifact
from payments.keys import EthSigner, save_key
from payments.registry_chain import RegistryChain
from tests.conftest import free_port, write_home
from tests.payments.paid import PaidHome

GAS_WEI = 10**18


@dataclass
class NodeHome:
    """A node's home on the devnet: its wallet (payout and registering key), its URL and port."""

    home: Path
    wallet: EthSigner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Market:
    """A ``HearthRegistry`` on the devnet of ``ph`` (a fresh one unless ``address`` names one), and the
    means to fill it."""

    def __init__(self, ph: PaidHome, root: Path, address: str | None = None) -> None:
        self.ph = ph
        self.root = root
        if address is None:
            art = load_artifact("HearthRegistry")
            w3 = ph.w3
            contract = w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
            tx = contract.constructor().transact({"from": w3.eth.accounts[0]})
            address = w3.eth.wait_for_transaction_receipt(tx)["contractAddress"]
            assert address is not None
        self.address = str(address)
        self.aw3: AsyncWeb3[Any] = AsyncWeb3(AsyncHTTPProvider(ph.net.rpc_url))
        self.registry = RegistryChain(self.aw3, self.address, rpc_url=ph.net.rpc_url)
        self._homes = 0

    async def close(self) -> None:
        await self.aw3.provider.disconnect()

    def wallet(self) -> EthSigner:
        """A new wallet with gas."""
        signer = EthSigner.generate(self.ph.net.chain_id)
        w3 = self.ph.w3
        tx = w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": signer.address, "value": GAS_WEI})
        assert w3.eth.wait_for_transaction_receipt(tx)["status"] == 1
        return signer

    async def register(self, wallet: EthSigner, did: str, endpoint: str) -> None:
        """``wallet`` lists ``did`` at ``endpoint`` (a signed transaction, mined)."""
        call = self.registry.register(did, endpoint)
        nonce = await self.aw3.eth.get_transaction_count(wallet.address)
        tx = await call.build_transaction(
            {"from": wallet.address, "nonce": nonce, "chainId": self.ph.net.chain_id}
        )
        signed = Account.sign_transaction(tx, wallet.private_key_bytes())
        sent = await self.aw3.eth.send_raw_transaction(signed.raw_transaction)
        assert (await self.aw3.eth.wait_for_transaction_receipt(sent))["status"] == 1

    def node_home(self, *, public_url: str | None = None, config: dict[str, Any] | None = None) -> NodeHome:
        """A node home on the devnet's chain with a wallet of its own; it will serve on ``port``, and its
        offer names ``public_url`` (default ``http://127.0.0.1:<port>``) as its endpoint."""
        self._homes += 1
        port = free_port()
        home = self.root / f"node-{self._homes}"
        url = public_url or f"http://127.0.0.1:{port}"
        write_home(home, {"node": {"public_url": url}, **(config or {})}, port=port)
        wallet = self.wallet()
        save_key(wallet, home / "wallet.key")
        chain = load_config(self.ph.home).chain
        assert chain is not None
        devnet.set_chain_config(home, chain.model_copy(update={"wallet_key_file": "wallet.key"}))
        return NodeHome(home, wallet, port)


@asynccontextmanager
async def serving(node_home: NodeHome) -> AsyncIterator[Node]:
    """The node of ``node_home`` behind a real HTTP server on its port."""
    node = Node.from_home(node_home.home)
    server = TestServer(build_app(node), host="127.0.0.1", port=node_home.port)
    await server.start_server()
    try:
        yield node
    finally:
        await server.close()
