"""The provider registry on chain (``HearthRegistry``): read listings, build ``register``/``leave`` calls.

A thin async layer over web3.py, in the manner of :mod:`payments.chain` and sharing its connection
(:meth:`RegistryChain.from_chain`) or taking any ``AsyncWeb3``:

- reads: :meth:`RegistryChain.provider` (one wallet's record), :meth:`RegistryChain.page` (one page of
  listings), :meth:`RegistryChain.listings` (every listing, all pages read at one block so a provider leaving
  mid-read neither hides nor repeats another);
- writes are built, never sent: :meth:`RegistryChain.register` and :meth:`RegistryChain.leave` return the
  contract call for the caller to simulate, sign and broadcast (the node through
  :meth:`payments.chain.Chain.sign` and its transaction outbox), after checking locally the bounds the
  contract enforces; ``leave`` reverts ``NotRegistered(wallet)`` for a wallet with no record;
- an RPC failure is :class:`ChainError` (``chain_unavailable``, or ``chain_rpc_error`` when the node answered
  with an error); a read that fails as a contract call (no code at the address, or not this contract) is
  ``ConfigError("invalid_config")`` naming ``market.registry``.

The registry records what each wallet says; whether the DID it names agrees (its signed offer names that
wallet and endpoint) is for the reader to check.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from eth_utils.address import to_checksum_address
from web3 import AsyncWeb3
from web3.contract.async_contract import AsyncContractFunction
from web3.exceptions import (
    BadFunctionCallOutput,
    ContractCustomError,
    ContractLogicError,
    ContractPanicError,
)
from web3.types import BlockIdentifier

from core.errors import ConfigError
from payments.chain import Chain, rpc_errors
from payments.escrow_build import load_artifact

CONTRACT_NAME: Final = "HearthRegistry"
# The contract's own bounds (HearthRegistry.MAX_DID_BYTES, MAX_ENDPOINT_BYTES, MAX_PAGE).
MAX_DID_BYTES: Final = 256
MAX_ENDPOINT_BYTES: Final = 2048
MAX_PAGE: Final = 100


@dataclass(frozen=True, slots=True)
class Listing:
    """One registered provider as a page lists it: the wallet that registered, its DID and endpoint."""

    wallet: str
    did: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """One wallet's record: what it registered, when (block timestamps) it registered and last changed it."""

    wallet: str
    did: str
    endpoint: str
    since: int
    updated: int

    def differs(self, did: str, endpoint: str) -> bool:
        """Whether registering ``did`` and ``endpoint`` would change this record."""
        return (self.did, self.endpoint) != (did, endpoint)


def check_listing(did: str, endpoint: str) -> None:
    """Raises ``ValueError`` for what ``register`` would revert on for its size (``DidLength``,
    ``EndpointLength``). ``[market] endpoint`` is validated to these bounds and a node's DID is far shorter,
    so this only catches a caller's mistake."""
    for name, value, limit in (("did", did, MAX_DID_BYTES), ("endpoint", endpoint, MAX_ENDPOINT_BYTES)):
        size = len(value.encode())
        if not 0 < size <= limit:
            raise ValueError(f"the registry takes a {name} of 1 to {limit} bytes, not {size}")


class RegistryChain:
    """``HearthRegistry`` at one address, read and called through one ``AsyncWeb3`` connection."""

    def __init__(self, w3: AsyncWeb3[Any], address: str, *, rpc_url: str = "") -> None:
        self.w3 = w3
        self.rpc_url = rpc_url
        abi = load_artifact(CONTRACT_NAME).abi
        self.contract = w3.eth.contract(address=to_checksum_address(address), abi=abi)
        self.address = self.contract.address

    @classmethod
    def from_chain(cls, chain: Chain, address: str) -> RegistryChain:
        """The registry at ``address`` on the node's settlement chain, over the same connection."""
        return cls(chain.w3, address, rpc_url=chain.cfg.rpc_url)

    # -- reads ----------------------------------------------------------------------------------------

    async def count(self, block: BlockIdentifier = "latest") -> int:
        """How many wallets are registered at ``block``."""
        async with self._rpc("providerCount"):
            return int(await self.contract.functions.providerCount().call(block_identifier=block))

    async def provider(self, wallet: str, block: BlockIdentifier = "latest") -> ProviderRecord | None:
        """The record ``wallet`` registered, or None when it has none at ``block``."""
        address = to_checksum_address(wallet)
        async with self._rpc("provider"):
            registered, did, endpoint, since, updated = await self.contract.functions.provider(address).call(
                block_identifier=block
            )
        if not registered:
            return None
        return ProviderRecord(address, str(did), str(endpoint), int(since), int(updated))

    async def page(
        self, start: int, limit: int = MAX_PAGE, block: BlockIdentifier = "latest"
    ) -> list[Listing]:
        """Up to ``limit`` (at most :data:`MAX_PAGE`) listings from position ``start``; empty past the end."""
        if not 0 < limit <= MAX_PAGE or start < 0:
            raise ValueError(f"a page is 1 to {MAX_PAGE} listings from a position >= 0")
        async with self._rpc("providers"):
            wallets, dids, endpoints = await self.contract.functions.providers(start, limit).call(
                block_identifier=block
            )
        return [
            Listing(to_checksum_address(w), str(d), str(e))
            for w, d, e in zip(wallets, dids, endpoints, strict=True)
        ]

    async def listings(self, page_size: int = MAX_PAGE) -> tuple[int, list[Listing]]:
        """``(block, every listing)``: all pages read at the latest block number, so they agree."""
        async with self._rpc("eth_blockNumber"):
            block = int(await self.w3.eth.block_number)
        total = await self.count(block)
        found: list[Listing] = []
        while len(found) < total:
            page = await self.page(len(found), page_size, block)
            if not page:
                break
            found.extend(page)
        return block, found

    # -- calls ----------------------------------------------------------------------------------------

    def register(self, did: str, endpoint: str) -> AsyncContractFunction:
        """The call listing the sender with ``did`` and ``endpoint`` (or updating its listing to them)."""
        check_listing(did, endpoint)
        return self.contract.functions.register(did, endpoint)

    def leave(self) -> AsyncContractFunction:
        """The call delisting the sender."""
        return self.contract.functions.leave()

    # -- errors ---------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _rpc(self, what: str) -> AsyncIterator[None]:
        async with rpc_errors(what, self.rpc_url):
            try:
                yield
            except (BadFunctionCallOutput, ContractCustomError, ContractLogicError, ContractPanicError):
                # the views never revert and always answer: no HearthRegistry at this address on this chain
                raise ConfigError(
                    "invalid_config",
                    f"market.registry: no HearthRegistry at {self.address} answers {what} on {self.rpc_url}",
                    details={"problems": [f"market.registry: no HearthRegistry at {self.address}"]},
                ) from None
