"""The node's view of the settlement chain: the escrow's state, simulations, signing and broadcasting.

A thin async layer over web3.py (``AsyncWeb3``) that speaks in Hearth's terms and errors:

- every RPC failure (refused, timed out, a node answering nonsense) becomes :class:`ChainError`
  (``chain_unavailable``, retryable); web3's own retries are off, the caller backs off;
- a call the escrow would revert becomes a ``HearthError`` whose ``code`` is ``escrow_reverted`` and whose
  details name the contract error (``JobExists``, ``InvalidReceipt``, ...) and its arguments;
- transactions are signed here but never sent implicitly: :meth:`Chain.sign` returns the hash and the raw
  bytes so the caller can record them before :meth:`Chain.broadcast`.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from eth_abi.abi import decode
from eth_account import Account
from eth_typing import HexStr
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import AsyncWeb3
from web3.contract.async_contract import AsyncContractFunction
from web3.exceptions import (
    ContractCustomError,
    ContractLogicError,
    ContractPanicError,
    TimeExhausted,
    TransactionNotFound,
    Web3Exception,
    Web3RPCError,
)
from web3.providers import AsyncHTTPProvider
from web3.types import BlockIdentifier

from core.config import ChainSection
from core.errors import ChainError, Domain, HearthError
from payments.escrow_build import load_artifact
from payments.keys import EthSigner

# Headroom over eth_estimateGas: state can move a little between estimate and inclusion.
GAS_HEADROOM: Final = 1.25
ZERO_ADDRESS: Final = "0x" + "00" * 20


class EscrowStatus(enum.IntEnum):
    """``HearthEscrow.Status``."""

    NONE = 0
    OPEN = 1
    RELEASED = 2
    REFUNDED = 3


# The terms ``release`` and ``refund`` take back: (payer, provider, validator, amount, deadline).
EscrowTerms = tuple[str, str, str, int, int]


@dataclass(frozen=True, slots=True)
class EscrowJob:
    """One entry of the escrow (``HearthEscrow.jobState``) as read at some block: where the job stands and
    the hash of the terms it was funded with (``HearthEscrow.termsHash``; zero when never funded)."""

    status: EscrowStatus
    terms_hash: bytes


@dataclass(frozen=True, slots=True)
class MinedTx:
    """What a transaction receipt says: where it landed, whether it succeeded, what it cost."""

    hash: str
    block_number: int
    block_hash: str
    success: bool
    gas_used: int
    gas_price: int


def _error_selectors(abi: list[dict[str, Any]]) -> dict[bytes, tuple[str, list[str], list[str]]]:
    selectors: dict[bytes, tuple[str, list[str], list[str]]] = {}
    for item in abi:
        if item.get("type") == "error":
            types = [i["type"] for i in item["inputs"]]
            names = [i["name"] or f"arg{n}" for n, i in enumerate(item["inputs"])]
            selectors[keccak(f"{item['name']}({','.join(types)})".encode())[:4]] = (
                item["name"],
                types,
                names,
            )
    return selectors


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return value


@asynccontextmanager
async def rpc_errors(what: str, rpc_url: str) -> AsyncIterator[None]:
    """Every RPC failure of ``what`` as a :class:`ChainError`: ``chain_rpc_error`` when the node answered
    with a JSON-RPC error, ``chain_unavailable`` (retryable) when it did not answer. Reverts are the
    caller's to read first: they name a contract's own error."""
    try:
        yield
    except Web3RPCError as exc:
        # the node answered, with a JSON-RPC error: not a connectivity problem
        message = str(exc.rpc_response.get("error", {}).get("message") if exc.rpc_response else exc)
        raise ChainError(
            "chain_rpc_error",
            f"the RPC refused {what}: {message}",
            details={"call": what, "rpc_error": message},
        ) from None
    except (TimeoutError, aiohttp.ClientError, OSError, Web3Exception, ValueError) as exc:
        raise ChainError(
            "chain_unavailable",
            f"the chain RPC at {rpc_url} did not answer {what}: {type(exc).__name__}: {exc}",
            details={"call": what, "rpc_url": rpc_url},
        ) from None


class Chain:
    """One RPC endpoint, the escrow and token contracts, and the node's wallet that pays gas."""

    def __init__(self, cfg: ChainSection, wallet: EthSigner) -> None:
        self.cfg = cfg
        self.wallet = wallet
        self.address = wallet.address
        self.w3 = AsyncWeb3(
            AsyncHTTPProvider(
                cfg.rpc_url,
                request_kwargs={"timeout": aiohttp.ClientTimeout(total=cfg.rpc_timeout_seconds)},
                exception_retry_configuration=None,
            )
        )
        escrow_abi = load_artifact("HearthEscrow").abi
        token_abi = load_artifact("TestUSDC").abi
        self.escrow = self.w3.eth.contract(address=to_checksum_address(cfg.escrow), abi=escrow_abi)
        self.token = self.w3.eth.contract(address=to_checksum_address(cfg.token), abi=token_abi)
        registry_abi = load_artifact("HearthRegistry").abi
        self._errors = (
            _error_selectors(escrow_abi) | _error_selectors(token_abi) | _error_selectors(registry_abi)
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.w3.provider.disconnect()

    # -- reads ----------------------------------------------------------------------------------------

    async def head(self) -> int:
        async with self._rpc("eth_blockNumber"):
            return int(await self.w3.eth.block_number)

    async def chain_id(self) -> int:
        async with self._rpc("eth_chainId"):
            return int(await self.w3.eth.chain_id)

    async def escrow_job(self, job_id: bytes, block: BlockIdentifier = "latest") -> EscrowJob:
        async with self._rpc("HearthEscrow.jobState"):
            status, terms_hash = await self.escrow.functions.jobState(job_id).call(block_identifier=block)
        return EscrowJob(status=EscrowStatus(int(status)), terms_hash=bytes(terms_hash))

    async def grant_view(self, grant_id: int, block: BlockIdentifier = "latest") -> tuple[Any, ...]:
        """``HearthEscrow.grantOf(grantId)`` as the escrow returns it (:class:`payments.grants.Grant`)."""
        async with self._rpc("HearthEscrow.grantOf", domain="funding"):
            return tuple(await self.escrow.functions.grantOf(grant_id).call(block_identifier=block))

    async def token_balance(self, address: str) -> int:
        async with self._rpc("balanceOf"):
            return int(await self.token.functions.balanceOf(to_checksum_address(address)).call())

    async def token_allowance(self, owner: str, spender: str) -> int:
        async with self._rpc("allowance"):
            return int(
                await self.token.functions.allowance(
                    to_checksum_address(owner), to_checksum_address(spender)
                ).call()
            )

    async def token_permit_nonce(self, owner: str) -> int:
        """The token's EIP-2612 ``nonces(owner)``: the nonce the owner's next permit must carry."""
        async with self._rpc("nonces"):
            return int(await self.token.functions.nonces(to_checksum_address(owner)).call())

    async def wait_receipt(self, tx_hash: str, wait_seconds: float) -> Any:
        """``tx_hash``'s receipt (with its logs) once mined; ``chain_unavailable`` after ``wait_seconds``."""
        async with self._rpc("eth_getTransactionReceipt"):
            try:
                return await self.w3.eth.wait_for_transaction_receipt(
                    tx_hash,  # type: ignore[arg-type]
                    timeout=wait_seconds,
                    poll_latency=0.2,
                )
            except TimeExhausted:
                raise ChainError(
                    "chain_unavailable",
                    f"{tx_hash} was not mined within {wait_seconds:.0f}s",
                    details={"call": "eth_getTransactionReceipt", "tx": tx_hash},
                ) from None

    async def nonce(self, block: str = "pending") -> int:
        """The wallet's transaction count at ``block`` (``pending`` counts what the mempool holds)."""
        async with self._rpc("eth_getTransactionCount"):
            return int(await self.w3.eth.get_transaction_count(self.address, block))  # type: ignore[arg-type]

    async def mined(self, tx_hash: str) -> MinedTx | None:
        """The receipt of ``tx_hash`` if it is in the canonical chain, else None."""
        async with self._rpc("eth_getTransactionReceipt"):
            try:
                receipt = await self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
            except TransactionNotFound:
                return None
        if receipt is None or receipt.get("blockNumber") is None:
            return None
        return MinedTx(
            hash=tx_hash,
            block_number=int(receipt["blockNumber"]),
            block_hash="0x" + bytes(receipt["blockHash"]).hex(),
            success=int(receipt["status"]) == 1,
            gas_used=int(receipt["gasUsed"]),
            gas_price=int(receipt.get("effectiveGasPrice") or 0),
        )

    # -- calls and transactions -----------------------------------------------------------------------

    def fund_with_authorization(self, args: tuple[Any, ...]) -> AsyncContractFunction:
        return self.escrow.functions.fundWithAuthorization(*args)

    def fund_from_grant(self, args: tuple[Any, ...]) -> AsyncContractFunction:
        return self.escrow.functions.fundFromGrant(*args)

    def release(
        self, job_id: bytes, terms: EscrowTerms, amount: int, digest: bytes, signature: bytes
    ) -> AsyncContractFunction:
        return self.escrow.functions.release(job_id, terms, amount, digest, signature)

    def refund(
        self, job_id: bytes, terms: EscrowTerms, digest: bytes, signature: bytes
    ) -> AsyncContractFunction:
        return self.escrow.functions.refund(job_id, terms, digest, signature)

    async def simulate(self, call: AsyncContractFunction, *, domain: Domain) -> None:
        """``eth_call`` from the node's wallet at the latest block; ``escrow_reverted`` if it would revert."""
        async with self._rpc("eth_call", domain=domain):
            await call.call({"from": self.address})

    async def sign(self, call: AsyncContractFunction, nonce: int, *, domain: Domain) -> tuple[str, str]:
        """Build (estimate gas, EIP-1559 fees) and sign ``call`` at ``nonce``; ``(hash, raw)`` as 0x-hex.

        Nothing is sent. Estimating runs the call too, so a revert surfaces here as ``escrow_reverted``.
        """
        async with self._rpc("eth_estimateGas", domain=domain):
            gas = await call.estimate_gas({"from": self.address})
            block = await self.w3.eth.get_block("latest")
            tip = await self.w3.eth.max_priority_fee
        base = int(block.get("baseFeePerGas") or 0)
        tx = await call.build_transaction(
            {  # type: ignore[arg-type]
                "from": self.address,
                "nonce": nonce,
                "gas": int(gas * GAS_HEADROOM),
                "maxFeePerGas": 2 * base + int(tip),
                "maxPriorityFeePerGas": int(tip),
                "chainId": self.cfg.chain_id,
            }
        )
        signed = Account.sign_transaction(tx, self.wallet.private_key_bytes())
        return "0x" + bytes(signed.hash).hex(), "0x" + bytes(signed.raw_transaction).hex()

    async def broadcast(self, raw: str) -> str | None:
        """Send a signed transaction. Returns None when the node took it (or already had it), else the
        RPC's refusal (e.g. ``nonce too low``) for the caller to resolve by hash.
        """
        try:
            async with self._rpc("eth_sendRawTransaction"):
                await self.w3.eth.send_raw_transaction(HexStr(raw))
        except ChainError as exc:
            message = str(exc.details.get("rpc_error") or "")
            if not message:
                raise
            if "already known" in message.lower() or "already imported" in message.lower():
                return None
            return message
        return None

    # -- errors ---------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _rpc(self, what: str, *, domain: Domain = "settlement") -> AsyncIterator[None]:
        async with rpc_errors(what, self.cfg.rpc_url):
            try:
                yield
            except (ContractCustomError, ContractLogicError, ContractPanicError) as exc:
                raise self._reverted(exc, domain) from None

    def _reverted(self, exc: Exception, domain: Domain) -> HearthError:
        data = getattr(exc, "data", None)
        raw = bytes.fromhex(data[2:]) if isinstance(data, str) and data.startswith("0x") else b""
        name, args = "unknown", {}
        if len(raw) >= 4 and raw[:4] in self._errors:
            name, types, names = self._errors[raw[:4]]
            with contextlib.suppress(Exception):
                args = {n: _jsonable(v) for n, v in zip(names, decode(types, raw[4:]), strict=True)}
        elif getattr(exc, "message", None):
            name = str(getattr(exc, "message", ""))
        return HearthError(
            "escrow_reverted",
            f"the escrow would revert: {name}",
            domain=domain,
            details={"error": name, "args": args},
        )


def is_reverted(exc: BaseException, *names: str) -> bool:
    """Whether ``exc`` is an escrow revert, optionally one of the named contract errors."""
    return (
        isinstance(exc, HearthError)
        and exc.code == "escrow_reverted"
        and (not names or exc.details.get("error") in names)
    )
