"""``hearth market providers`` and ``hearth market reputation``: the market as the chain tells it.

The registry (``--registry``, default ``[market] registry``) is read over ``--rpc`` (default ``[chain]
rpc_url``; ``hearth devnet`` writes both); every listed provider's signed offer is fetched and checked
against its listing (:func:`requester.market.discover`), then printed: DID, endpoint, kinds, models, GPUs,
prices, free capacity and reputation (jobs settled, failure rate, USDC earned, from the escrow's events:
the cache at ``HOME/requester/reputation.sqlite3`` is brought up to date first unless ``--no-reputation``),
and the providers left out with the reason. Progress goes to stderr; ``--json`` prints
:meth:`requester.market.Discovery.to_json`.

``hearth market reputation`` prints, for every registered wallet (and every other wallet the escrow's events
name), its record: jobs funded, released, refunded on a failing receipt, refunded after the deadline, USDC
earned, distinct payers and validators, first and last block.

Offers are checked against ``[chain]``'s chain and escrow (or ``--escrow``) when the RPC serves that
chain. Endpoints on private, loopback or link-local addresses are refused unless
``--allow-private-endpoints`` (a devnet's nodes listen on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from eth_utils.address import is_address

from cli.common import EXIT_OK, Out, usage
from core.config import NodeConfig, load_config

DEFAULT_RPC_TIMEOUT_SECONDS = 15.0


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """Add the ``market`` command group to ``hearth``; ``parents`` bring --home and --json. Returns the
    group's subcommands, for more to be added beside ``providers``."""
    market = subparsers.add_parser("market", help="the provider market on chain: who sells what")
    sub = market.add_subparsers(dest="market_cmd", required=True)
    p = sub.add_parser(
        "providers", parents=parents, help="list the registered providers whose signed offers check out"
    )
    p.add_argument("--kind", help="only providers offering this job kind (ffmpeg_transcode, vllm_batch)")
    p.add_argument("--model", help="only providers offering this model")
    _chain_opts(p)
    p.add_argument(
        "--allow-private-endpoints",
        action="store_true",
        help="also fetch offers from private, loopback and link-local addresses (devnets)",
    )
    p.add_argument("--no-reputation", action="store_true", help="do not read reputation from the escrow")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per offer fetch (default 5)")
    p.add_argument("--max-providers", type=int, default=256, help="registry listings to read (default 256)")
    p.set_defaults(func=cmd_providers)
    p = sub.add_parser(
        "reputation",
        parents=parents,
        help="every registered provider's record in the escrow's events (funded, released, refunded, earned)",
    )
    _chain_opts(p)
    p.set_defaults(func=cmd_reputation)
    return sub


def _chain_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", help="HearthRegistry address (default: [market] registry in node.toml)")
    p.add_argument("--rpc", help="chain RPC URL (default: [chain] rpc_url in node.toml)")
    p.add_argument(
        "--escrow",
        help="the HearthEscrow whose events make reputation (default: [chain] escrow in node.toml, when the "
        "RPC serves [chain]'s chain)",
    )


def where(args: argparse.Namespace) -> tuple[NodeConfig, str, str]:
    """node.toml, the registry address and the RPC URL a market command reads: ``--registry`` and
    ``--rpc`` (and ``--escrow`` where the command has it), else ``--home``'s node.toml."""
    cfg = load_config(args.home)
    registry = args.registry or cfg.market.registry
    rpc = args.rpc or (cfg.chain.rpc_url if cfg.chain is not None else None)
    if not registry:
        raise usage("no registry: pass --registry 0x… or set [market] registry in node.toml (hearth devnet)")
    if not rpc:
        raise usage("no chain RPC: pass --rpc URL or set [chain] rpc_url in node.toml (hearth devnet)")
    if not is_address(registry):
        raise usage(f"--registry {registry[:60]!r} is not an address (0x and 40 hex digits)")
    escrow = getattr(args, "escrow", None)
    if escrow is not None and not is_address(escrow):
        raise usage(f"--escrow {escrow[:60]!r} is not an address (0x and 40 hex digits)")
    return cfg, registry, rpc


def _escrow(args: argparse.Namespace, cfg: NodeConfig, chain_id: int) -> str | None:
    if args.escrow is not None:
        return str(args.escrow)
    chain = cfg.chain
    return chain.escrow if chain is not None and chain.chain_id == chain_id else None


def connect(rpc: str) -> tuple[Any, Any]:
    """``(provider, AsyncWeb3)`` over ``rpc`` with a bounded timeout and no retries."""
    import aiohttp
    from web3 import AsyncWeb3
    from web3.providers import AsyncHTTPProvider

    provider = AsyncHTTPProvider(
        rpc,
        request_kwargs={"timeout": aiohttp.ClientTimeout(total=DEFAULT_RPC_TIMEOUT_SECONDS)},
        exception_retry_configuration=None,
    )
    return provider, AsyncWeb3(provider)


def cmd_providers(args: argparse.Namespace, out: Out) -> int:
    cfg, registry, rpc = where(args)
    if args.timeout <= 0 or args.max_providers < 1:
        raise usage("--timeout must be > 0 and --max-providers >= 1")
    doc = asyncio.run(_discover(args, cfg, registry, rpc))
    out.emit(doc, lambda: _print(doc, allow_private=args.allow_private_endpoints))
    return EXIT_OK


async def _discover(args: argparse.Namespace, cfg: NodeConfig, address: str, rpc: str) -> dict[str, Any]:
    from payments.chain import rpc_errors
    from payments.registry_chain import RegistryChain
    from requester.market import discover

    provider, w3 = connect(rpc)
    try:
        async with rpc_errors("eth_chainId", rpc):
            chain_id = int(await w3.eth.chain_id)
        escrow = _escrow(args, cfg, chain_id)
        reputation = None if args.no_reputation else await _reputation(args, w3, chain_id, escrow)
        found = await discover(
            RegistryChain(w3, address, rpc_url=rpc),
            kind=args.kind,
            model=args.model,
            chain_id=chain_id,
            escrow=escrow,
            max_providers=args.max_providers,
            timeout=args.timeout,
            allow_private=args.allow_private_endpoints,
            on_progress=_Progress("offers"),
            reputation=reputation,
        )
    finally:
        await provider.disconnect()
    doc = found.to_json()
    doc.update(chain_id=chain_id, escrow=escrow)
    return doc


def cmd_reputation(args: argparse.Namespace, out: Out) -> int:
    """Every registered provider's reputation, and every other wallet the escrow paid or refunded for."""
    cfg, registry, rpc = where(args)
    doc = asyncio.run(_reputation_table(args, cfg, registry, rpc))
    out.emit(doc, lambda: _print_reputation(doc))
    return EXIT_OK


async def _reputation_table(
    args: argparse.Namespace, cfg: NodeConfig, address: str, rpc: str
) -> dict[str, Any]:
    from payments.chain import rpc_errors
    from payments.registry_chain import RegistryChain
    from requester.reputation import Reputation

    provider, w3 = connect(rpc)
    try:
        async with rpc_errors("eth_chainId", rpc):
            chain_id = int(await w3.eth.chain_id)
        escrow = _escrow(args, cfg, chain_id)
        if escrow is None:
            raise usage(
                f"no escrow for chain {chain_id}: pass --escrow 0x… or set [chain] escrow in node.toml"
            )
        block, listings = await RegistryChain(w3, address, rpc_url=rpc).listings()
        known = await _reputation(args, w3, chain_id, escrow) or {}
    finally:
        await provider.disconnect()
    rows = [
        {"wallet": x.wallet, "did": x.did, "endpoint": x.endpoint, "registered": True}
        | {"reputation": known.get(x.wallet, Reputation(x.wallet)).to_json()}
        for x in listings
    ]
    listed = {x.wallet for x in listings}
    rows += [
        {"wallet": wallet, "did": None, "endpoint": None, "registered": False, "reputation": rep.to_json()}
        for wallet, rep in sorted(known.items())
        if wallet not in listed
    ]
    return {"registry": address, "block": block, "chain_id": chain_id, "escrow": escrow, "providers": rows}


def _print_reputation(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200, markup=False, emoji=False, highlight=False)
    table = Table(
        title=f"reputation from escrow {doc['escrow']} (chain {doc['chain_id']}); registry at block "
        f"{doc['block']}",
        title_justify="left",
    )
    for column in (
        "wallet",
        "DID",
        "endpoint",
        "funded",
        "released",
        "refunded",
        "expired",
        "earned USDC",
        "payers",
        "validators",
        "blocks",
    ):
        table.add_column(column, overflow="fold")
    for row in doc["providers"]:
        rep = row["reputation"]
        blocks = "-" if rep["first_block"] is None else f"{rep['first_block']}-{rep['last_block']}"
        cells = (
            row["wallet"],
            short_did(row["did"]) if row["registered"] else "(not registered)",
            row["endpoint"] or "-",
            str(rep["jobs_funded"]),
            str(rep["jobs_released"]),
            str(rep["jobs_refunded_failed"]),
            str(rep["jobs_refunded_expired"]),
            rep["earned_usdc"],
            str(rep["distinct_payers"]),
            str(rep["distinct_validators"]),
            blocks,
        )
        table.add_row(*(printable(cell) for cell in cells))
    console.print(table)


async def _reputation(args: argparse.Namespace, w3: Any, chain_id: int, escrow: str | None) -> Any:
    from requester.reputation import ReputationCache, default_path

    if escrow is None:
        _say(f"no [chain] escrow in node.toml for chain {chain_id}: reputation is not shown")
        return None
    path = default_path(args.home)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with ReputationCache.open(path) as cache:
        await cache.refresh(w3, escrow, chain_id=chain_id, progress=_Progress("reputation: block"))
        return cache.all(chain_id=chain_id, escrow=escrow)


class _Progress:
    """``label done/total`` on stderr: rewritten in place on a terminal, else its first and last lines."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            end = "\n" if done >= total else ""
            print(f"\r{self.label} {done}/{total}", end=end, file=sys.stderr, flush=True)
        elif not self.shown or done >= total:
            print(f"{self.label} {done}/{total}", file=sys.stderr, flush=True)
        self.shown = True


def _say(message: str) -> None:
    print(message, file=sys.stderr)


# -- the table ---------------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (C0 and C1 controls, DEL, bidi and other
    format characters) written as a ``\\x``/``\\u`` escape; line breaks are kept."""
    return "".join(
        c if c.isprintable() or c == "\n" else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )


def short_did(did: str) -> str:
    """``did:key:z6Mkha…a2doK``: enough to tell providers apart in a table."""
    return did if len(did) <= 24 else f"{did[:14]}…{did[-6:]}"


def _print(doc: dict[str, Any], *, allow_private: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    # Whatever a provider or the chain says is printed as text: no markup, no emoji codes, and control
    # characters (terminal escapes, bidi overrides) shown as escapes (printable()).
    console = Console(width=None if sys.stdout.isatty() else 200, markup=False, emoji=False, highlight=False)
    table = Table(
        title=f"providers on registry {doc['registry']} at block {doc['block']}", title_justify="left"
    )
    for column in ("DID", "endpoint", "kinds", "models", "GPUs", "prices (USDC)", "free", "reputation"):
        table.add_column(column, overflow="fold")
    for p in doc["providers"]:
        offer = p["offer"]
        cells = (
            short_did(p["did"]),
            p["endpoint"],
            ", ".join(str(k) for k in offer.get("kinds") or []),
            ", ".join(str(m.get("name")) for m in offer.get("models") or [] if isinstance(m, dict)) or "-",
            _gpus(offer),
            _prices(offer.get("prices")),
            _free(offer.get("resources")),
            _reputation_cell(p.get("reputation")),
        )
        table.add_row(*(printable(cell) for cell in cells))
    console.print(table)
    dropped = doc["dropped"]
    if dropped:
        console.print(f"left out ({len(dropped)}):")
        for d in dropped:
            console.print(
                printable(f"  {short_did(d['did'])}  {d['endpoint']}  {d['reason']}: {d['message']}")
            )
    unread = f", {doc['unread']} not read (--max-providers)" if doc["unread"] else ""
    console.print(
        f"{len(doc['providers'])} of {doc['registered']} registered providers{unread}; "
        f"{doc['fetched']} offers fetched in {doc['seconds']:.1f} s"
    )
    refused = any(d["reason"] == "endpoint_refused" for d in dropped)
    if refused and not allow_private:
        console.print(
            "(endpoints on private addresses are refused; on a devnet pass --allow-private-endpoints)"
        )


def _gpus(offer: dict[str, Any]) -> str:
    machine = offer.get("machine")
    gpus = machine.get("gpus") if isinstance(machine, dict) else None
    if not isinstance(gpus, list) or not gpus:
        return "-"
    names: dict[str, int] = {}
    for gpu in gpus:
        name = str(gpu.get("name")) if isinstance(gpu, dict) else "?"
        names[name] = names.get(name, 0) + 1
    return ", ".join(f"{n} x {name}" for name, n in names.items())


def _prices(prices: Any) -> str:
    if not isinstance(prices, dict):
        return "-"
    parts = [
        f"{label} {prices[key]}"
        for key, label in (
            ("cpu_second", "cpu/s"),
            ("gpu_second", "gpu/s"),
            ("input_1k_tokens", "in/1k tok"),
            ("output_1k_tokens", "out/1k tok"),
            ("minimum_per_job", "min"),
        )
        if key in prices
    ]
    return "\n".join(parts) or "-"


def _free(resources: Any) -> str:
    free = resources.get("free") if isinstance(resources, dict) else None
    if not isinstance(free, dict):
        return "-"
    return f"{free.get('cpus')} cpu, {free.get('memory_mb')} MB, {free.get('gpus')} gpu"


def _reputation_cell(rep: dict[str, Any] | None) -> str:
    if rep is None:
        return "-"
    return f"{rep['jobs_settled']} settled, {rep['failure_rate']:.0%} failed, {rep['earned_usdc']} USDC" + (
        f", {rep['jobs_open']} open" if rep["jobs_open"] else ""
    )


__all__ = ["add_parser", "cmd_providers", "cmd_reputation", "connect", "printable", "short_did", "where"]
