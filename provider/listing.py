"""The node's own listing in the on-chain provider registry (``HearthRegistry``): registered at start.

With ``[chain]``, ``[market] registry``, an endpoint (``[market] endpoint``, else ``[node] public_url``: the
one the signed offer names) and ``[market] register`` on, :class:`MarketListing` runs once per node life, in
the background, so serving never waits for the chain:

1. a registry transaction of the wallet still open in the journal (one sent before a crash, or by
   ``hearth market leave``) is followed, never doubled: settlement's loop resolves it by hash;
2. otherwise the wallet's record is read; when it names this node's DID and endpoint the node is listed;
3. otherwise ``register(did, endpoint)`` is simulated, then sent through settlement's transaction outbox
   (recorded before broadcast; the journal refuses a second open registry transaction) and followed to
   its confirmation, after which the record is read again.

While the chain does not answer, it retries with backoff. A registration the contract refuses (in
simulation or on chain) or a registry address that is not a ``HearthRegistry`` stops it for this life
(``failed``, logged with the reason); a transaction dropped for its nonce is sent again, a few times at
most. Where it stands is :meth:`MarketListing.view` (the ``market`` block of ``GET /v1/overview``) and
the ``on_state`` callback (the ``hearth_market_listing`` gauge).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal

from core.config import NodeConfig
from core.errors import ChainError, ConfigError, ConflictError, HearthError

if TYPE_CHECKING:
    from payments.registry_chain import RegistryChain
    from payments.settlement import Settlement

log = logging.getLogger("hearth.market")

ListingState = Literal["checking", "pending", "listed", "chain_unavailable", "failed"]
LISTING_STATES: Final[tuple[ListingState, ...]] = (
    "checking",
    "pending",
    "listed",
    "chain_unavailable",
    "failed",
)
"""checking: reading the record; pending: a registry transaction is in flight; listed: the record names
this node; chain_unavailable: the RPC does not answer (retrying); failed: given up for this life."""
MAX_SENDS: Final = 3
"""Registrations sent in one node life at most (a dropped one is sent again; a reverted one is not)."""
BACKOFF_START_SECONDS: Final = 0.5


def listing_wanted(cfg: NodeConfig) -> bool:
    """Whether this configuration asks the node to list itself in the registry at start."""
    return (
        cfg.chain is not None
        and cfg.market.registry is not None
        and cfg.endpoint is not None
        and cfg.market.register
    )


class MarketListing:
    """Registers (or updates) the node's wallet record at start, once, in the background."""

    def __init__(
        self,
        cfg: NodeConfig,
        settlement: Settlement,
        did: str,
        *,
        on_state: Callable[[ListingState], None] = lambda state: None,
        now: Callable[[], float] = time.time,
    ) -> None:
        from payments.registry_chain import RegistryChain

        assert cfg.market.registry is not None and cfg.endpoint is not None and cfg.chain is not None
        self.settlement = settlement
        self.did = did
        self.endpoint: str = cfg.endpoint
        self.wallet = settlement.wallet.address
        self.registry: RegistryChain = RegistryChain.from_chain(settlement.chain, cfg.market.registry)
        self._poll = cfg.chain.poll_seconds
        self._backoff_max = cfg.chain.rpc_backoff_max_seconds
        self._on_state = on_state
        self._now = now
        self.state: ListingState = "checking"
        self.tx: str | None = None
        self.error: str | None = None
        self.changed_at = now()
        self._sent: list[str] = []
        self._task: asyncio.Task[None] | None = None

    # -- lifetime -------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._set("checking")
        self._task = asyncio.create_task(self._run(), name="hearth-market-listing")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def done(self) -> None:
        """Wait until the listing is settled for this life (listed or failed); for tests and tools."""
        if self._task is not None:
            await asyncio.shield(self._task)

    def view(self) -> dict[str, Any]:
        """Where the listing stands: the ``market`` block of the overview."""
        return {
            "registry": self.registry.address,
            "wallet": self.wallet,
            "endpoint": self.endpoint,
            "state": self.state,
            "tx": self.tx,
            "error": self.error,
            "changed_at": self.changed_at,
        }

    # -- the work -------------------------------------------------------------------------------------

    def _set(self, state: ListingState, *, error: str | None = None) -> None:
        if state != self.state or error != self.error:
            self.changed_at = self._now()
        self.state, self.error = state, error
        self._on_state(state)

    async def _run(self) -> None:
        backoff = BACKOFF_START_SECONDS
        while True:
            try:
                if await self._round():
                    return
                backoff = BACKOFF_START_SECONDS
                await asyncio.sleep(self._poll)
                continue
            except ChainError as exc:
                if self.state != "chain_unavailable":
                    log.warning("registry listing: the chain does not answer, retrying: %s", exc.message)
                self._set("chain_unavailable", error=exc.message)
            except ConfigError as exc:
                log.error("registry listing failed: %s", exc.message)
                self._set("failed", error=exc.message)
                return
            except Exception as exc:  # keep serving; the next round tries again
                log.exception("registry listing round failed")
                self._set(self.state, error=f"{type(exc).__name__}: {exc}"[:500])
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    async def _round(self) -> bool:
        """One look: True once listed (or given up), False while a transaction is in flight."""
        journal = self.settlement.journal
        open_tx = journal.registry_tx(self.wallet)
        if open_tx is not None:  # sent before (this life, an earlier one, or `hearth market leave`)
            self.tx = open_tx.hash
            if self.state != "pending":
                log.info("registry listing: following %s transaction %s", open_tx.purpose, open_tx.hash)
            self._set("pending")
            self.settlement.wake()
            return False
        if self._sent:
            last = journal.txs(purposes=("register",))[-1]
            if last.hash == self._sent[-1] and last.state == "reverted":
                self._set("failed", error=f"the register transaction {last.hash} reverted")
                log.error("registry listing failed: the register transaction %s reverted", last.hash)
                return True
        if self.state != "pending":
            self._set("checking")
        record = await self.registry.provider(self.wallet)
        if record is not None and not record.differs(self.did, self.endpoint):
            if self.state != "listed":
                log.info(
                    "listed in the registry %s as %s at %s", self.registry.address, self.did, self.endpoint
                )
            self._set("listed")
            return True
        if len(self._sent) >= MAX_SENDS:
            self._set("failed", error=f"{MAX_SENDS} registrations sent and the record still differs")
            log.error("registry listing failed: %s", self.error)
            return True
        return await self._register(update=record is not None)

    async def _register(self, *, update: bool) -> bool:
        call = self.registry.register(self.did, self.endpoint)
        try:
            await self.settlement.chain.simulate(call, domain="settlement")
            tx = await self.settlement.outbox.send(None, "register", call, "settlement")
        except ConflictError:  # a registry transaction was opened meanwhile: follow it next round
            return False
        except HearthError as exc:
            if exc.code != "escrow_reverted":
                raise
            self._set("failed", error=f"the registry refuses the registration: {exc.details.get('error')}")
            log.error("registry listing failed: %s", self.error)
            return True
        self._sent.append(tx.hash)
        self.tx = tx.hash
        log.info(
            "registry listing: %s sent in %s (%s at %s)",
            "update" if update else "registration",
            tx.hash,
            self.did,
            self.endpoint,
        )
        self._set("pending")
        self.settlement.wake()
        return False


__all__ = ["LISTING_STATES", "MAX_SENDS", "ListingState", "MarketListing", "listing_wanted"]
