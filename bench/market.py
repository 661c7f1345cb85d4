"""Benchmark: the market's reads — reputation from the escrow's history, and discovery to a funded job.

Part ``reputation``: a fresh anvil with the committed ``TestUSDC`` and ``HearthEscrow`` and ``--jobs``
settled jobs (several providers, many payers; released, refunded on a failing receipt, refunded after the
deadline), built fast (``_escrow_history``; ``--per-block`` transactions a block, ``--gap`` empty blocks
after each). Then ``ReputationCache.refresh`` on an empty file (cold), and
again on the same file after a few new blocks with new jobs (cached), against the bare baseline measured in
the same run: the same ``eth_getLogs`` ranges fetched raw (no decoding, no block reads, no SQLite). Prints
blocks/s and logs/s of each, the cached/cold ratio of seconds and the cold/raw ratio of logs/s. Every
provider's record must equal what the build's own transactions make it (block numbers included): the
bench fails loudly when it does not.

Part ``routing``: the largest of ``--nodes`` (default 1, 4, 16) real node daemons on one devnet, started
at once, each with its own wallet, DID and price (node 0 asks the least); for each size a fresh
``HearthRegistry`` where the first N register with their own wallets. Then, after one warm-up round, the
median of ``--repeat`` rounds of: ``requester.market.discover`` (every offer fetched and verified),
``requester.routing.route`` (quotes from all, the cheapest chosen, the submission with an EIP-3009
authorization) and the wait until the node reports the escrow funded (its chain poll, 0.25 s on the
devnet, dominates this part). Every node must have quoted and node 0 must have won. The target is
t(largest)/t(smallest) <= 2.0: the work grows with N only where it is not concurrent.

    .venv/bin/python bench/market.py [--part reputation|routing|all] [--jobs 10000] [--gap 0]
                                     [--nodes 1,4,16] [--repeat 3] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # puts the repository on sys.path
import aiohttp
from _common import job_envelope, median
from _escrow_history import History, anvil_chain, build, escrow_topics
from _market_nodes import Market, market
from web3 import AsyncHTTPProvider, AsyncWeb3

from core.envelope import parse_envelope
from payments.devnet import DEVNET_CHAIN_ID
from payments.keys import new_ed25519
from payments.registry_chain import RegistryChain
from requester.market import discover
from requester.reputation import DEFAULT_MAX_RANGE, ReputationCache, ScanStats
from requester.routing import route

EXTRA_JOBS = 6  # funded and settled after the cold scan: the cached refresh's new blocks
TARGET_CACHED_RATIO = 0.10  # a refresh after a few blocks costs at most a tenth of the cold scan
TARGET_ROUTING_RATIO = 2.0
FUNDING_TIMEOUT_SECONDS = 60.0
FUNDING_POLL_SECONDS = 0.02


# -- reputation -------------------------------------------------------------------------------------------


async def _raw_logs(url: str, escrow: str, topics: list[str], first: int, last: int) -> tuple[int, float]:
    """The bare baseline: every ``eth_getLogs`` range the scan reads, fetched and parsed, nothing else."""
    logs = 0
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        for start in range(first, last + 1, DEFAULT_MAX_RANGE):
            end = min(start + DEFAULT_MAX_RANGE - 1, last)
            params = {"address": escrow, "fromBlock": hex(start), "toBlock": hex(end), "topics": [topics]}
            body = {"jsonrpc": "2.0", "id": 1, "method": "eth_getLogs", "params": [params]}
            async with session.post(url, json=body) as r:
                logs += len((await r.json())["result"])
    return logs, time.perf_counter() - t0


async def _refresh(cache: ReputationCache, h: History) -> tuple[ScanStats, float]:
    t0 = time.perf_counter()
    stats = await cache.refresh(
        h.rpc.url, h.escrow, chain_id=DEVNET_CHAIN_ID, start_block=h.start_block, confirmations=0
    )
    return stats, time.perf_counter() - t0


def _check(cache: ReputationCache, h: History, stats: ScanStats, what: str) -> None:
    """The cache's records equal the build's, every field; else the bench fails, naming a difference."""
    got, want = cache.all(chain_id=DEVNET_CHAIN_ID, escrow=h.escrow), h.expected()
    if got != want:
        wrong = sorted(set(got) ^ set(want)) or [p for p in want if got[p] != want[p]]
        first = wrong[0]
        raise AssertionError(f"{what}: provider {first}: cache {got.get(first)} != built {want.get(first)}")
    if stats.unmatched:
        raise AssertionError(f"{what}: {stats.unmatched} settlements without their Funded")


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def reputation(args: argparse.Namespace) -> dict[str, Any]:
    topics = escrow_topics()
    with (
        tempfile.TemporaryDirectory(prefix="hearth-bench-market-", dir=args.dir) as tmp,
        anvil_chain(_common.free_port()) as rpc,
    ):
        h, build_seconds = build(
            rpc,
            jobs=args.jobs,
            providers=args.providers,
            payers=args.payers,
            validators=args.validators,
            per_block=args.per_block,
            gap=args.gap,
        )
        head = rpc.head()
        raw_logs, raw_seconds = asyncio.run(_raw_logs(rpc.url, h.escrow, topics, h.start_block, head))
        if raw_logs != h.logs():
            raise AssertionError(f"eth_getLogs returned {raw_logs} logs, the build emitted {h.logs()}")
        with ReputationCache.open(Path(tmp) / "reputation.sqlite3") as cache:
            cold, cold_seconds = asyncio.run(_refresh(cache, h))
            _check(cache, h, cold, "cold")
            if cold.logs_read != h.logs() or cold.funded != args.jobs:
                raise AssertionError(
                    f"cold: read {cold.logs_read} logs, {cold.funded} funded; built {h.logs()}"
                )
            before, counts = h.logs(), h.counts()
            h.add_jobs(EXTRA_JOBS)
            cached, cached_seconds = asyncio.run(_refresh(cache, h))
            _check(cache, h, cached, "cached")
            if cached.logs_read != h.logs() - before or cached.from_block != (cold.to_block or 0) + 1:
                raise AssertionError(f"cached: read {cached.logs_read} logs from block {cached.from_block}")
    r: dict[str, Any] = {
        "jobs": args.jobs,
        "outcomes": counts,
        "jobs_after_cold": EXTRA_JOBS,
        "providers": args.providers,
        "payers": len({j.payer for j in h.jobs}),
        "validators": args.validators,
        "chain": {
            "blocks": head - h.start_block,
            "transactions": h.transactions,
            "per_block": args.per_block,
            "empty_blocks_between": args.gap,
            "build_seconds": round(build_seconds, 2),
        },
        "raw_get_logs": _side(head - h.start_block + 1, raw_logs, raw_seconds),
        "cold": _side(cold.blocks_scanned, cold.logs_read, cold_seconds) | {"ranges": cold.ranges},
        "cached": _side(cached.blocks_scanned, cached.logs_read, cached_seconds) | {"ranges": cached.ranges},
        "totals_match": True,  # _check raised otherwise
    }
    r["cached_over_cold"] = cached_seconds / cold_seconds
    r["cold_over_raw_logs_per_s"] = r["cold"]["logs_per_s"] / r["raw_get_logs"]["logs_per_s"]
    r["targets"] = {
        "totals_match": True,
        f"cached/cold<={TARGET_CACHED_RATIO:.2f}": r["cached_over_cold"] <= TARGET_CACHED_RATIO,
    }
    return r


def _side(blocks: int, logs: int, seconds: float) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 4),
        "blocks": blocks,
        "logs": logs,
        "blocks_per_s": round(_rate(blocks, seconds), 1),
        "logs_per_s": round(_rate(logs, seconds), 1),
    }


def print_reputation(r: dict[str, Any]) -> None:
    o, c = r["outcomes"], r["chain"]
    print(
        f"escrow history : {r['jobs']} jobs ({o['released']} released, {o['refunded_failed']} refunded on a"
        f" failing receipt, {o['refunded_expired']} after the deadline), {r['providers']} providers,"
        f" {r['payers']} payers"
    )
    print(
        f"chain build    : {c['build_seconds']:8.2f} s  ({c['transactions']} transactions in"
        f" {c['blocks']} blocks, {c['per_block']} a block, {c['empty_blocks_between']} empty between)"
    )
    for key, label in (
        ("raw_get_logs", "raw eth_getLogs"),
        ("cold", "refresh, cold"),
        ("cached", "refresh, cached"),
    ):
        s = r[key]
        print(
            f"{label:15}: {s['seconds']:8.3f} s  {s['blocks_per_s']:10.0f} blocks/s"
            f"  {s['logs_per_s']:8.0f} logs/s  ({s['blocks']} blocks, {s['logs']} logs)"
        )
    print(f"cached / cold  : {r['cached_over_cold']:.4f}  (seconds; target <= {TARGET_CACHED_RATIO:.2f})")
    print(
        f"cold / raw     : {r['cold_over_raw_logs_per_s']:.2f}  (logs/s of the refresh over raw eth_getLogs)"
    )
    print("totals         : every provider's record equals the build's")


# -- routing ----------------------------------------------------------------------------------------------


def _envelope(m: Market, job_id: str) -> dict[str, Any]:
    """A paid transcode, priced on its limits (the nodes fetch no input at quote time)."""
    return job_envelope(
        job_id,
        "ffmpeg_transcode",
        "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
        output_spec={"format": "mp4", "resolution": "360p", "codec": "h264", "audio_codec": "aac"},
        validation={"min_duration_seconds": 1, "required_streams": ["video", "audio"]},
        cpus=0.5,
        memory_mb=512,
        max_output_mb=50,
        max_price="5.00",
    ) | {
        "payment": {
            "max_price": "5.00",
            "currency": "usdc",
            "chain_id": m.net.chain_id,
            "escrow": m.net.escrow,
            "payer": m.payer.address,
            "validator": m.validator_did,
        }
    }


async def _until_funded(session: aiohttp.ClientSession, endpoint: str, job: str) -> None:
    deadline = time.monotonic() + FUNDING_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        async with session.get(f"{endpoint}/v1/jobs/{job}") as r:
            view = (await r.json())["job"]
        funding = (view.get("payment") or {}).get("funding") or {}
        if funding.get("state") == "funded":
            return
        if funding.get("state") not in (None, "awaiting"):
            raise RuntimeError(
                f"job {job} at {endpoint}: funding {funding.get('state')}: {view.get('failure')}"
            )
        await asyncio.sleep(FUNDING_POLL_SECONDS)
    raise TimeoutError(f"job {job} at {endpoint} not funded in {FUNDING_TIMEOUT_SECONDS:.0f} s")


async def _round(m: Market, registry: str, n: int) -> dict[str, float]:
    """One discovery, one routed submission, the wait for the escrow: seconds of each."""
    w3: AsyncWeb3[Any] = AsyncWeb3(AsyncHTTPProvider(m.net.rpc_url))
    signer = new_ed25519()
    env = parse_envelope(_envelope(m, f"market-bench-{secrets.token_hex(6)}"))
    try:
        async with _common.http_session() as session:
            t0 = time.perf_counter()
            found = await discover(
                RegistryChain(w3, registry, rpc_url=m.net.rpc_url),
                kind="ffmpeg_transcode",
                chain_id=m.net.chain_id,
                escrow=m.net.escrow,
                allow_private=True,
            )
            t1 = time.perf_counter()
            if len(found.providers) != n:
                raise RuntimeError(
                    f"discovered {len(found.providers)} of {n}: {[d.to_json() for d in found.dropped]}"
                )
            decision = await route(env, signer, found.providers, wallet=m.payer, session=session)
            if not decision.submitted or decision.job is None:
                raise RuntimeError(f"routing submitted nothing: {json.dumps(decision.to_json())[:2000]}")
            asks = {c.provider.did: c.ask for c in decision.candidates if c.status == "quoted"}
            if len(asks) != n or decision.winner != m.nodes[0].did:  # node 0 asks the least
                seen = [(c.provider.did, c.status, c.code, c.message, c.ask) for c in decision.candidates]
                raise RuntimeError(f"{len(asks)} of {n} quoted, {decision.winner} won: {seen}")
            endpoint, job = decision.job.endpoint, decision.job.id
            t2 = time.perf_counter()
            await _until_funded(session, endpoint.rstrip("/"), job)
            t3 = time.perf_counter()
    finally:
        await w3.provider.disconnect()
    return {"discover": t1 - t0, "route": t2 - t1, "funded": t3 - t2, "total": t3 - t0}


def routing(args: argparse.Namespace) -> dict[str, Any]:
    sizes = sorted({int(x) for x in args.nodes.split(",")})
    if not sizes or sizes[0] < 1:
        raise SystemExit("--nodes takes positive counts, e.g. 1,4,16")
    per_size: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="hearth-bench-market-", dir=args.dir) as tmp,
        market(Path(tmp), sizes[-1]) as (m, started),
    ):
        for n in sizes:
            registry = m.deploy_registry()
            asyncio.run(m.register(registry, m.nodes[:n]))
            asyncio.run(_round(m, registry, n))  # warm-up: connections, the nodes' first quote
            rounds = [asyncio.run(_round(m, registry, n)) for _ in range(args.repeat)]
            per_size[str(n)] = {k: median([r[k] for r in rounds]) for k in rounds[0]} | {"runs": rounds}
    first, last = per_size[str(sizes[0])], per_size[str(sizes[-1])]
    r: dict[str, Any] = {
        "router": "requester.routing.route (cheapest)",
        "discovery": "requester.market.discover",
        "nodes_started_seconds": round(started, 2),
        "repeat": args.repeat,
        "sizes": per_size,
        "ratio": last["total"] / first["total"],
        "phase_ratios": {k: last[k] / first[k] for k in ("discover", "route", "funded")},
        "ratio_sizes": [sizes[0], sizes[-1]],
    }
    r["targets"] = {
        f"t({sizes[-1]})/t({sizes[0]})<={TARGET_ROUTING_RATIO:.1f}": r["ratio"] <= TARGET_ROUTING_RATIO
    }
    return r


def print_routing(r: dict[str, Any]) -> None:
    print(f"routing        : {r['router']}; discovery {r['discovery']}")
    print(f"nodes started  : {r['nodes_started_seconds']:8.2f} s  (all at once, to /readyz)")
    for n, s in r["sizes"].items():
        print(
            f"{n:>3} nodes      : {s['total']:8.3f} s  = discover {s['discover']:.3f}"
            f" + route {s['route']:.3f} + until funded {s['funded']:.3f}  (median of {r['repeat']})"
        )
    a, b = r["ratio_sizes"]
    met = "met" if all(r["targets"].values()) else "MISSED"
    print(f"t({b})/t({a})     : {r['ratio']:.2f}  (target <= {TARGET_ROUTING_RATIO:.1f}: {met})")
    phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phase_ratios"].items())
    print(f"                 {phases}  (each phase's t({b})/t({a}))")


# -- main ---------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("reputation", "routing", "all"), default="all")
    ap.add_argument("--jobs", type=int, default=10_000, help="settled jobs in the escrow's history")
    ap.add_argument("--providers", type=int, default=8, help="provider wallets the jobs go to")
    ap.add_argument("--payers", type=int, default=200, help="payer wallets the jobs come from")
    ap.add_argument("--validators", type=int, default=4, help="validators signing the receipts")
    ap.add_argument("--per-block", type=int, default=20, help="transactions in each non-empty block (<= 70)")
    ap.add_argument(
        "--gap",
        type=int,
        default=0,
        help="empty blocks after each non-empty one (anvil seals each in time growing with its state: slow)",
    )
    ap.add_argument("--nodes", default="1,4,16", help="node counts of the routing part, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds per market size; the median counts")
    ap.add_argument("--dir", default=None, help="where the cache and the node homes go (default: $TMPDIR)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    # SIGTERM ends the run through its finally blocks: the anvils and the node daemons are stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.jobs < 1 or not 1 <= args.per_block <= 70 or args.gap < 0 or args.repeat < 1:
        ap.error("--jobs and --repeat must be >= 1, --per-block 1 to 70, --gap >= 0")
    r: dict[str, Any] = {"targets": {}}
    if args.part in ("reputation", "all"):
        r["reputation"] = reputation(args)
        r["targets"] |= {f"reputation.{k}": v for k, v in r["reputation"]["targets"].items()}
    if args.part in ("routing", "all"):
        r["routing"] = routing(args)
        r["targets"] |= {f"routing.{k}": v for k, v in r["routing"]["targets"].items()}
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        if "reputation" in r:
            print_reputation(r["reputation"])
        if "routing" in r:
            print_routing(r["routing"])
    return 0 if all(r["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
