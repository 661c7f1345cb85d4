"""The transaction outbox of one node's wallet: record before broadcast, resolve by hash afterwards.

Every transaction is signed with a nonce the node manages, recorded in the journal (``chain_txs``)
*before* it is broadcast, and resolved by hash afterwards: mined, confirmed after ``confirmations``
blocks, reverted, or dropped (its nonce taken by another transaction). A crash anywhere leaves a state the
next start resumes from: a transaction recorded but perhaps not sent is looked up by hash and broadcast
again (same bytes, same hash) if the chain never saw it. A transaction counted final that a reorg deeper
than ``confirmations`` removed is put back in flight and sent again.

Two fault points let crash-safety tests stop the process at the dangerous moments (:mod:`core.faults`):
:data:`AFTER_RECORD` (recorded, not yet broadcast) and :data:`AFTER_BROADCAST` (broadcast, its outcome
not yet recorded). Part of :class:`payments.settlement.Settlement`.

The wallet's registry transactions (``register``, ``leave``: its own listing) go through the same outbox
with no job; the journal holds at most one of them open at a time, and the hooks see them like any other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from core.config import ChainSection
from core.faults import NO_FAULTS, FaultPoints
from core.journal import TX_OPEN_STATES, Journal, TxPurpose, TxRecord
from payments.chain import Chain

log = logging.getLogger("hearth.settlement")

# The fault point between recording a signed transaction and broadcasting it.
AFTER_RECORD: Final = "after_record"
# The fault point between broadcasting a transaction and recording whether the RPC took it.
AFTER_BROADCAST: Final = "after_broadcast"

TxHook = Callable[[TxRecord], Awaitable[None]]


async def _nothing(tx: TxRecord) -> None:
    return None


class Outbox:
    """Sends the wallet's transactions and follows each one to a final state, across crashes and reorgs."""

    def __init__(
        self,
        cfg: ChainSection,
        journal: Journal,
        chain: Chain,
        sender: str,
        *,
        on_confirmed: TxHook = _nothing,
        on_reverted: TxHook = _nothing,
        faults: FaultPoints = NO_FAULTS,
    ) -> None:
        self.cfg = cfg
        self.journal = journal
        self.chain = chain
        self.sender = sender
        self._on_confirmed = on_confirmed
        self._on_reverted = on_reverted
        self._faults = faults
        self._send_lock = asyncio.Lock()

    async def send(self, job: str | None, purpose: TxPurpose, call: Any, domain: Any) -> TxRecord:
        """Sign ``call`` with the next nonce, record it, then broadcast it; the recorded transaction.

        ``job`` is None for a registry transaction. The RPC refusing the broadcast is recorded as the
        transaction's error (it is sent again by :meth:`resolve`); a simulation the contract reverts raises
        before anything is recorded, and so does the journal refusing a second live transaction.
        """
        async with self._send_lock:
            nonce = max(await self.chain.nonce("pending"), self.journal.next_nonce(self.sender))
            tx_hash, raw = await self.chain.sign(call, nonce, domain=domain)
            tx = self.journal.record_tx(job, purpose, sender=self.sender, nonce=nonce, hash=tx_hash, raw=raw)
            self._faults.reached(AFTER_RECORD)
            refusal = await self.chain.broadcast(raw)
            self._faults.reached(AFTER_BROADCAST)
            if refusal is None:
                tx = self.journal.update_tx(tx_hash, state="sent", note=f"{purpose} transaction sent")
            else:
                tx = self.journal.update_tx(tx_hash, error=refusal[:500])
            return tx

    def live_or_done(self, job: str, purpose: TxPurpose) -> TxRecord | None:
        """``job``'s transaction for ``purpose`` that is in flight or landed, if there is one."""
        for tx in self.journal.txs(job):
            if tx.purpose == purpose and tx.state not in ("dropped", "reverted"):
                return tx
        return None

    async def reopen_reorged(self) -> None:
        """Put back in flight a transaction counted final that a reorg deeper than ``confirmations`` removed.

        A mined transaction uses up its nonce, so a final one whose nonce the wallet's on-chain count has
        fallen back to (or below) is no longer in the chain. Left as it was, the journal would say paid or
        funded while the escrow says otherwise, and every later transaction would queue behind the nonce
        gap forever. Re-opened, it is resolved like any other: the same bytes are sent again and land once.
        """
        latest = await self.chain.nonce("latest")
        for tx in self.journal.txs_from_nonce(self.sender, latest):
            if tx.state in ("confirmed", "reverted") and await self.chain.mined(tx.hash) is None:
                log.warning(
                    "tx %s was final but a reorg removed it; sending it again", tx.hash, extra={"job": tx.job}
                )
                self.journal.update_tx(
                    tx.hash,
                    state="sent",
                    block_number=None,
                    block_hash=None,
                    note=f"{tx.purpose} transaction reorged out after it was final",
                )

    async def resolve(self, head: int) -> bool:
        """Resolve every open transaction by hash; True if one is still not known to the chain.

        A transaction that reaches ``confirmations`` blocks is marked confirmed or reverted, and the
        matching hook (``on_confirmed`` / ``on_reverted``) carries out what it means for its job.
        """
        unsent = False
        for tx in self.journal.txs(states=TX_OPEN_STATES):
            unsent = await self.resolve_one(tx, head) or unsent
        return unsent

    async def resolve_one(self, tx: TxRecord, head: int) -> bool:
        """Resolve one open transaction by hash (see :meth:`resolve`); True if the chain does not know it."""
        mined = await self.chain.mined(tx.hash)
        if mined is None:
            if tx.state == "mined":
                tx = self.journal.update_tx(
                    tx.hash, state="sent", block_number=None, block_hash=None, note="reorged out"
                )
            if tx.nonce < await self.chain.nonce("latest") and await self.chain.mined(tx.hash) is None:
                # its nonce was used by another transaction: this one can never land (asked twice: it
                # may have been mined between the first look-up and the nonce read)
                self.journal.update_tx(tx.hash, state="dropped", note=f"{tx.purpose} transaction dropped")
                return False
            refusal = await self.chain.broadcast(tx.raw)
            if refusal is not None:
                log.warning("tx %s not taken by the RPC: %s", tx.hash, refusal, extra={"job": tx.job})
                self.journal.update_tx(tx.hash, error=refusal[:500])
                return True
            if tx.state == "signed":
                self.journal.update_tx(tx.hash, state="sent", note=f"{tx.purpose} transaction sent")
            return False
        if tx.state != "mined":
            tx = self.journal.update_tx(
                tx.hash,
                state="mined",
                block_number=mined.block_number,
                block_hash=mined.block_hash,
                gas_used=mined.gas_used,
                gas_price=mined.gas_price,
                note=f"{tx.purpose} transaction mined in block {mined.block_number}",
            )
        elif tx.block_hash != mined.block_hash:
            tx = self.journal.update_tx(tx.hash, block_number=mined.block_number, block_hash=mined.block_hash)
        if head - mined.block_number + 1 < max(self.cfg.confirmations, 1):
            return False
        if not mined.success:
            self.journal.update_tx(tx.hash, state="reverted", note=f"{tx.purpose} transaction reverted")
            await self._on_reverted(tx)
        else:
            self.journal.update_tx(tx.hash, state="confirmed", note=f"{tx.purpose} transaction confirmed")
            await self._on_confirmed(tx)
        return False


__all__ = ["AFTER_BROADCAST", "AFTER_RECORD", "Outbox", "TxHook"]
