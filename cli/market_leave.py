"""``hearth market leave``: take the node's wallet out of the on-chain provider registry.

Run from the node home (its wallet key, journal and node.toml; the node may be running or not). The
``leave`` transaction goes through the node's transaction outbox like every other: signed with the next
nonce, recorded in the journal before it is broadcast, then followed by hash until ``[chain]
confirmations`` blocks deep. A registry transaction already open in the journal (a registration the node
sent, or an earlier ``leave`` interrupted) is followed first, never doubled. Progress goes to stderr; the
result (transaction hash, block, gas used) to stdout, or as JSON with ``--json``.

A wallet with no record is refused (``not_registered``, exit code 1, like the node's refusals). The node
registers again at its next start unless ``[market] register = false``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from cli.common import EXIT_OK, EXIT_REFUSED, Out
from core.config import WALLET_KEY_CREDENTIAL, NodeConfig, key_path, load_config, resolve_path
from core.errors import ChainError, ConfigError, HearthError
from core.journal import TX_OPEN_STATES, Journal, TxRecord

if TYPE_CHECKING:
    from payments.chain import Chain
    from payments.outbox import Outbox

FINAL_STATES: Final = ("confirmed", "reverted", "dropped")
BACKOFF_MAX_SECONDS: Final = 10.0


def add_leave_parser(
    market_subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``leave`` to ``hearth market``; ``parents`` bring --home, --json and --config."""
    p = market_subparsers.add_parser(
        "leave",
        parents=parents,
        help="deregister this node's wallet from the on-chain provider registry",
        description="Send HearthRegistry.leave() from the node's wallet, through the node's journal, and "
        "wait for its confirmation. The node registers again at its next start unless "
        "[market] register = false.",
    )
    p.set_defaults(func=cmd_market_leave)
    return p


class LeaveRefused(HearthError):
    """A refusal of ``hearth market leave`` (exit code 1, as the node's refusals)."""


def cmd_market_leave(args: argparse.Namespace, out: Out) -> int:
    cfg = load_config(args.home, path=args.config)
    try:
        result = asyncio.run(_leave(args, cfg, out))
    except LeaveRefused as exc:
        out.error(exc)
        return EXIT_REFUSED
    out.emit(result, lambda: _human(result))
    return EXIT_OK


def _human(result: dict[str, Any]) -> None:
    tx = result["tx"]
    print(f"left the registry {result['registry']}: wallet {result['wallet']}")
    print(f"  tx {tx['hash']}  block {tx['block_number']}  gas used {tx['gas_used']}")
    if result["registers_again_at_start"]:
        print("  the node registers again at its next start unless [market] register = false")


def _progress(out: Out, line: str) -> None:
    if not out.as_json:
        print(line, file=sys.stderr, flush=True)


async def _leave(args: argparse.Namespace, cfg: NodeConfig, out: Out) -> dict[str, Any]:
    from payments.chain import Chain
    from payments.keys import load_eth_key
    from payments.outbox import Outbox
    from payments.registry_chain import RegistryChain

    chain_cfg, registry_address = cfg.chain, cfg.market.registry
    if chain_cfg is None or registry_address is None:
        missing = [name for name, v in (("chain", chain_cfg), ("market.registry", registry_address)) if not v]
        raise ConfigError(
            "invalid_config",
            f"`hearth market leave` needs [chain] and [market] registry in node.toml; missing: {missing}",
            details={"problems": [f"{name}: required by hearth market leave" for name in missing]},
        )
    wallet_path = key_path(
        args.home, chain_cfg.wallet_key_file, credential=WALLET_KEY_CREDENTIAL, credentials_dir=None
    )
    if not wallet_path.exists():
        raise ConfigError(
            "missing_wallet_key",
            f"[chain] is configured but there is no wallet key at {wallet_path}",
            details={"path": str(wallet_path)},
        )
    wallet = load_eth_key(wallet_path)
    state_dir = resolve_path(args.home, cfg.node.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    chain = Chain(chain_cfg, wallet)
    try:
        with Journal.open(state_dir / cfg.journal.filename, synchronous=cfg.journal.synchronous) as journal:
            outbox = Outbox(chain_cfg, journal, chain, wallet.address)
            registry = RegistryChain.from_chain(chain, registry_address)
            pending = journal.registry_tx(wallet.address)
            if pending is not None:
                _progress(out, f"following the open {pending.purpose} transaction {pending.hash}")
                pending = await _follow(out, journal, chain, outbox, pending, chain_cfg.poll_seconds)
                if pending.purpose == "leave" and pending.state == "confirmed":
                    return _result(cfg, registry.address, wallet.address, pending)
            record = await _retrying(out, functools.partial(registry.provider, wallet.address))
            if record is None:
                raise LeaveRefused(
                    "not_registered",
                    f"wallet {wallet.address} has no record in the registry {registry.address}",
                    domain="request",
                    details={"wallet": wallet.address, "registry": registry.address},
                )
            call = registry.leave()
            await chain.simulate(call, domain="settlement")
            tx = await outbox.send(None, "leave", call, "settlement")
            _progress(out, f"leave transaction {tx.hash} sent (nonce {tx.nonce}); waiting for confirmation")
            tx = await _follow(out, journal, chain, outbox, tx, chain_cfg.poll_seconds)
            if tx.state != "confirmed":
                raise LeaveRefused(
                    "leave_failed",
                    f"the leave transaction {tx.hash} ended {tx.state}",
                    domain="settlement",
                    details={"tx": tx.as_dict()},
                )
            return _result(cfg, registry.address, wallet.address, tx)
    finally:
        await chain.close()


def _result(cfg: NodeConfig, registry: str, wallet: str, tx: TxRecord) -> dict[str, Any]:
    return {
        "left": True,
        "registry": registry,
        "wallet": wallet,
        "tx": tx.as_dict(),
        "registers_again_at_start": bool(cfg.market.register and cfg.endpoint),
    }


_T = TypeVar("_T")


async def _retrying(out: Out, read: Callable[[], Awaitable[_T]]) -> _T:
    """``await read()``, again with backoff while the chain does not answer."""
    backoff = 0.5
    while True:
        try:
            return await read()
        except ChainError as exc:
            _progress(out, f"the chain does not answer ({exc.message}); retrying in {backoff:.1f} s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)


async def _follow(
    out: Out, journal: Journal, chain: Chain, outbox: Outbox, tx: TxRecord, poll: float
) -> TxRecord:
    """Resolve ``tx`` by hash until it is final (a node running meanwhile may resolve it too)."""
    shown = tx.state
    while True:
        current = next(t for t in journal.txs(purposes=(tx.purpose,)) if t.hash == tx.hash)
        if current.state != shown:
            where = "" if current.block_number is None else f" in block {current.block_number}"
            _progress(out, f"  {current.purpose} transaction {current.state}{where}")
            shown = current.state
        if current.state in FINAL_STATES:
            return current
        if current.state in TX_OPEN_STATES:
            head = await _retrying(out, chain.head)
            await _retrying(out, functools.partial(outbox.resolve_one, current, head))
        await asyncio.sleep(poll)
