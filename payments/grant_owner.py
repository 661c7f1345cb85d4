"""The owner's side of spending grants: open (with an ``approve``, or gasless for it with an EIP-2612
permit), revoke, and read one (DESIGN §12; ``hearth grant``).

The owner's key signs and pays gas for ``openGrant``/``revokeGrant`` (the permit form saves the separate
``approve`` transaction). The escrow may pull from the owner only through ``fundFromGrant``, within the
grant's caps, so the allowance an opening adds is what the grant can spend over its whole life:
``periodMax`` times the periods before its expiry (or what the owner asks). Each transaction is sent
and waited for; its hash, block and gas are reported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Final

from eth_utils.address import to_checksum_address
from web3.logs import DISCARD

from core.config import ChainSection
from core.errors import ChainError, FundingError
from payments.chain import Chain, MinedTx
from payments.grant_terms import read_grant
from payments.grants import MAX_UINT64, MAX_UINT128, Grant, permit_typed_data, sign_permit
from payments.keys import EthSigner

MAX_UINT256: Final = 2**256 - 1
TX_WAIT_SECONDS: Final = 120.0
PERMIT_TTL_SECONDS: Final = 3600


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantTerms:
    """What an owner grants: the agent, the caps in base units, the period and the expiry (unix time)."""

    agent: str
    per_job_max: int
    period_max: int
    period_seconds: int
    expiry: int

    def check(self, now: float) -> None:
        """Refuse terms the escrow would refuse, before anything is signed."""
        problems = []
        if not 0 < self.per_job_max <= MAX_UINT128:
            problems.append("the per-job cap must be above 0 (and fit uint128)")
        if not 0 < self.period_max <= MAX_UINT128:
            problems.append("the per-period cap must be above 0 (and fit uint128)")
        if self.per_job_max > self.period_max:
            problems.append("the per-job cap cannot exceed the per-period cap")
        if not 0 < self.period_seconds <= MAX_UINT64:
            problems.append("the period must be at least one second")
        if not now < self.expiry <= MAX_UINT64:
            problems.append("the expiry must be in the future")
        if int(self.agent, 16) == 0:
            problems.append("the agent cannot be the zero address")
        if problems:
            raise FundingError("invalid_grant_terms", "; ".join(problems), details={"problems": problems})

    def lifetime_cap(self, now: float) -> int:
        """The most the grant can ever spend: ``period_max`` for every period that starts before expiry."""
        periods = max(math.ceil((self.expiry - now) / self.period_seconds), 1)
        return min(self.period_max * periods, MAX_UINT256)


def tx_view(mined: MinedTx, purpose: str) -> dict[str, Any]:
    return {
        "purpose": purpose,
        "hash": mined.hash,
        "block_number": mined.block_number,
        "gas_used": mined.gas_used,
        "success": mined.success,
    }


class GrantOwner:
    """An owner's key on one chain: opens, revokes and reads grants of the escrow in ``cfg``."""

    def __init__(self, cfg: ChainSection, owner: EthSigner) -> None:
        self.cfg = cfg
        self.owner = owner
        self.chain = Chain(cfg, owner)

    async def close(self) -> None:
        await self.chain.close()

    async def show(self, grant_id: int) -> Grant:
        return await read_grant(self.chain, grant_id)

    async def open(
        self, terms: GrantTerms, *, permit: bool = False, allowance: int | None = None
    ) -> dict[str, Any]:
        """Open a grant; the escrow's allowance grows by ``allowance`` (default: the grant's lifetime
        cap) through an ``approve`` or, with ``permit``, the owner's EIP-2612 permit inside
        ``openGrantWithPermit``."""
        now = time.time()
        terms.check(now)
        extra = terms.lifetime_cap(now) if allowance is None else allowance
        escrow = self.chain.escrow.address
        current = await self.chain.token_allowance(self.owner.address, escrow)
        value = min(current + extra, MAX_UINT256)
        args = (terms.agent, terms.per_job_max, terms.period_max, terms.period_seconds, terms.expiry)
        txs = []
        if permit:
            nonce = await self.chain.token_permit_nonce(self.owner.address)
            deadline = int(now) + PERMIT_TTL_SECONDS
            typed = permit_typed_data(
                chain_id=self.cfg.chain_id,
                token=self.cfg.token,
                token_name=self.cfg.token_name,
                owner=self.owner.address,
                spender=escrow,
                value=value,
                nonce=nonce,
                deadline=deadline,
            )
            v, r, s = sign_permit(self.owner, typed)
            call = self.chain.escrow.functions.openGrantWithPermit(*args, value, deadline, v, r, s)
            mined, receipt = await self._send(call, "openGrantWithPermit")
        else:
            approved, _ = await self._send(self.chain.token.functions.approve(escrow, value), "approve")
            txs.append(tx_view(approved, "approve"))
            mined, receipt = await self._send(self.chain.escrow.functions.openGrant(*args), "openGrant")
        txs.append(tx_view(mined, "openGrantWithPermit" if permit else "openGrant"))
        # the permit form's receipt holds the token's Approval too: not the escrow's, skipped
        events = self.chain.escrow.events.GrantOpened().process_receipt(receipt, errors=DISCARD)
        if not events:
            raise ChainError("chain_rpc_error", "the openGrant transaction emitted no GrantOpened event")
        grant_id = int(events[0]["args"]["grantId"])
        grant = await self.show(grant_id)
        return {"grant": grant.to_json(), "allowance": str(value), "permit": permit, "txs": txs}

    async def revoke(self, grant_id: int) -> dict[str, Any]:
        """Revoke the owner's grant ``grant_id``; refused before sending if it is not the owner's."""
        grant = await self.show(grant_id)
        if grant.owner != to_checksum_address(self.owner.address):
            raise FundingError(
                "not_grant_owner",
                f"grant {grant_id} belongs to {grant.owner}, not to {self.owner.address}",
                details={"grant": str(grant_id), "owner": grant.owner, "key": self.owner.address},
            )
        mined, _ = await self._send(self.chain.escrow.functions.revokeGrant(grant_id), "revokeGrant")
        return {"grant": (await self.show(grant_id)).to_json(), "txs": [tx_view(mined, "revokeGrant")]}

    async def _send(self, call: Any, what: str) -> tuple[MinedTx, Any]:
        """Sign, send and wait for ``call`` from the owner's key; its mined transaction and receipt."""
        nonce = await self.chain.nonce("pending")
        tx_hash, raw = await self.chain.sign(call, nonce, domain="funding")
        refusal = await self.chain.broadcast(raw)
        if refusal is not None:
            raise ChainError(
                "chain_rpc_error",
                f"the RPC refused {what}: {refusal}",
                details={"call": what, "rpc_error": refusal},
            )
        receipt = await self.chain.wait_receipt(tx_hash, TX_WAIT_SECONDS)
        mined = await self.chain.mined(tx_hash)
        if mined is None:
            raise ChainError("chain_unavailable", f"{what} {tx_hash} left the chain", details={"tx": tx_hash})
        if not mined.success:
            raise FundingError(
                "grant_tx_reverted", f"{what} {tx_hash} reverted", details={"tx": tx_hash, "call": what}
            )
        return mined, receipt


__all__ = ["GrantOwner", "GrantTerms", "tx_view"]
