"""``hearth grant open|show|revoke``: an owner's spending grants for an agent key (DESIGN §12).

The owner opens a grant for an agent's address (or ``did:pkh``) with a per-job cap, a per-period cap and
a period, and an expiry; the agent can then fund jobs from the owner's USDC within those caps
(``hearth job submit --grant ID --agent-key K``) and never holds the owner's key. ``open`` sends an
``approve`` and ``openGrant`` from the owner's key, or with ``--permit`` one ``openGrantWithPermit``
carrying the owner's EIP-2612 permit; ``revoke`` sends ``revokeGrant``; ``show`` reads ``grantOf``: what
is left this period and when the period ends. The chain, escrow and token come from ``--home``'s
node.toml ``[chain]`` or from flags. Each transaction's hash, block and gas are printed (``--json``: one
document).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cli.common import EXIT_OK, Out, usage, utc
from core.config import ChainSection, load_config
from core.errors import ConfigError, HearthError
from payments.did import parse_did_pkh
from payments.keys import EthSigner, load_key
from payments.receipts import usdc_str, usdc_units

if TYPE_CHECKING:  # web3 takes a second to import: only the grant commands pay for it
    from payments.grant_owner import GrantOwner

_DURATION_RE = re.compile(r"^([0-9]{1,12})([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")
T = TypeVar("T")


def duration(text: str) -> int:
    """``3600``, ``3600s``, ``90m``, ``1h``, ``1d``, ``2w`` in seconds; a usage error otherwise."""
    match = _DURATION_RE.match(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise usage(f"{text[:40]!r} is not a duration: a positive number with s, m, h, d or w (1d, 3600s)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def usdc(text: str, flag: str) -> int:
    try:
        return usdc_units(text)
    except ValueError as exc:
        raise usage(f"{flag}: {exc}") from None


def agent_address(text: str, chain_id: int) -> str:
    """An agent given as an address or as its ``did:pkh`` (on this chain)."""
    if _ADDRESS_RE.match(text):
        return text
    try:
        chain, address = parse_did_pkh(text)
    except HearthError:
        raise usage(f"--agent {text[:80]!r} is neither an address nor a did:pkh") from None
    if chain != chain_id:
        raise usage(f"--agent {text} is on chain {chain}, the escrow is on chain {chain_id}")
    return address


def _chain(args: argparse.Namespace) -> ChainSection:
    """``[chain]`` of ``--home``'s node.toml with the flags over it; every flag when there is none."""
    try:
        current = load_config(args.home).chain
    except ConfigError:
        current = None
    base: dict[str, Any] = {} if current is None else current.model_dump()
    flags = {
        "rpc_url": args.rpc,
        "chain_id": args.chain_id,
        "escrow": args.escrow,
        "token": args.token,
        "token_name": args.token_name,
    }
    merged = {**base, **{k: v for k, v in flags.items() if v is not None}}
    missing = [k for k in ("rpc_url", "chain_id", "escrow", "token") if k not in merged]
    if missing:
        raise usage(
            f"no [chain] in {args.home}/node.toml: give --rpc, --chain-id, --escrow and --token "
            f"(missing: {', '.join(missing)})"
        )
    try:
        return ChainSection.model_validate(merged)
    except ValueError as exc:
        raise usage(f"the chain settings are not usable: {exc}") from None


def _owner_key(path: str) -> EthSigner:
    signer = load_key(Path(path))
    if not isinstance(signer, EthSigner):
        raise usage(f"{path} holds a {signer.key_type} key; --owner-key takes an Ethereum key")
    return signer


async def _with_owner(
    args: argparse.Namespace, owner: EthSigner, fn: Callable[[GrantOwner], Awaitable[T]]
) -> T:
    from payments.grant_owner import GrantOwner

    cfg = _chain(args)
    client = GrantOwner(cfg, owner)
    try:
        return await fn(client)
    finally:
        await client.close()


def _print_grant(grant: dict[str, Any]) -> None:
    state = "revoked" if grant["revoked"] else ("expired" if grant["expiry"] <= time.time() else "open")
    print(f"grant {grant['grant']}  ({state})")
    print(f"  owner        {grant['owner']}")
    print(f"  agent        {grant['agent']}")
    print(f"  per job      {usdc_str(int(grant['per_job_max']))} USDC at most")
    print(f"  per period   {usdc_str(int(grant['period_max']))} USDC every {grant['period_seconds']}s")
    print(
        f"  this period  {usdc_str(int(grant['spent_this_period']))} spent, "
        f"{usdc_str(int(grant['left_this_period']))} left, ends {utc(grant['period_ends'])}"
    )
    print(f"  expires      {utc(grant['expiry'])}")


def _print_txs(txs: list[dict[str, Any]]) -> None:
    for tx in txs:
        print(f"  tx {tx['purpose']:20} {tx['hash']}  block {tx['block_number']}  gas {tx['gas_used']}")


def cmd_grant_open(args: argparse.Namespace, out: Out) -> int:
    from payments.grant_owner import GrantTerms

    owner = _owner_key(args.owner_key)
    cfg = _chain(args)
    now = time.time()
    terms = GrantTerms(
        agent=agent_address(args.agent, cfg.chain_id),
        per_job_max=usdc(args.per_job, "--per-job"),
        period_max=usdc(args.per_period, "--per-period"),
        period_seconds=duration(args.period),
        expiry=int(now) + duration(args.expires),
    )
    terms.check(now)  # before anything is signed
    allowance = None if args.allowance is None else usdc(args.allowance, "--allowance")
    result = asyncio.run(
        _with_owner(args, owner, lambda c: c.open(terms, permit=args.permit, allowance=allowance))
    )

    def human() -> None:
        _print_grant(result["grant"])
        how = "permit" if result["permit"] else "approve"
        print(f"  allowance    {usdc_str(int(result['allowance']))} USDC to the escrow ({how})")
        _print_txs(result["txs"])

    out.emit(result, human)
    return EXIT_OK


def cmd_grant_show(args: argparse.Namespace, out: Out) -> int:
    cfg = _chain(args)
    reader = EthSigner.generate(cfg.chain_id)  # reads sign nothing; any key will do
    grant = asyncio.run(_with_owner(args, reader, lambda c: c.show(args.grant_id)))
    doc = grant.to_json()
    out.emit({"grant": doc}, lambda: _print_grant(doc))
    return EXIT_OK


def cmd_grant_revoke(args: argparse.Namespace, out: Out) -> int:
    owner = _owner_key(args.owner_key)
    result = asyncio.run(_with_owner(args, owner, lambda c: c.revoke(args.grant_id)))

    def human() -> None:
        _print_grant(result["grant"])
        _print_txs(result["txs"])

    out.emit(result, human)
    return EXIT_OK


def _grant_id(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 2**256:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a grant id (1, 2, ...)")
    return int(text)


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> None:
    """``hearth grant open|show|revoke``; ``parents`` bring --home and --json."""
    chain = argparse.ArgumentParser(add_help=False)
    chain.add_argument("--rpc", help="chain RPC URL (default: [chain] rpc_url in node.toml)")
    chain.add_argument("--chain-id", type=int, help="chain id (default: [chain] chain_id)")
    chain.add_argument("--escrow", help="HearthEscrow address (default: [chain] escrow)")
    chain.add_argument("--token", help="USDC address (default: [chain] token)")
    chain.add_argument("--token-name", help="the token's EIP-712 name (default: [chain] token_name)")
    grant = sub.add_parser("grant", help="spending grants: let an agent key fund jobs within caps")
    cmds = grant.add_subparsers(dest="grant_cmd", required=True)
    p = cmds.add_parser("open", parents=[*parents, chain], help="open a grant for an agent (owner's key)")
    p.add_argument("--owner-key", required=True, help="the owner's Ethereum key file (pays, signs, pays gas)")
    p.add_argument("--agent", required=True, help="the agent's address or did:pkh")
    p.add_argument("--per-job", required=True, help="the most one job may cost, in USDC (e.g. 0.50)")
    p.add_argument("--per-period", required=True, help="the most all jobs of one period may cost, in USDC")
    p.add_argument("--period", default="1d", help="the period: 3600s, 1h, 1d, 1w (default 1d)")
    p.add_argument("--expires", default="30d", help="the grant ends after this long (default 30d)")
    p.add_argument(
        "--permit",
        action="store_true",
        help="one transaction: the owner's EIP-2612 permit inside openGrantWithPermit (no separate approve)",
    )
    p.add_argument(
        "--allowance",
        help="USDC the escrow may pull in addition to its allowance (default: the grant's lifetime cap, "
        "per-period times the periods before expiry)",
    )
    p.set_defaults(func=cmd_grant_open)
    p = cmds.add_parser(
        "show", parents=[*parents, chain], help="what a grant allows and has left this period"
    )
    p.add_argument("grant_id", type=_grant_id)
    p.set_defaults(func=cmd_grant_show)
    p = cmds.add_parser("revoke", parents=[*parents, chain], help="revoke a grant (owner's key)")
    p.add_argument("grant_id", type=_grant_id)
    p.add_argument("--owner-key", required=True, help="the owner's Ethereum key file")
    p.set_defaults(func=cmd_grant_revoke)


__all__ = ["add_parser", "agent_address", "duration"]
