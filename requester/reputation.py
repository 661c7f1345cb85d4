"""Providers' reputation, read from the escrow's events on chain and cached incrementally in SQLite.

Nothing here is self-reported: a provider's record is what ``HearthEscrow`` emitted about its wallet —
``Funded`` (who pays whom, checked by which validator, until when), ``Released`` (paid against a passing
receipt) and ``Refunded`` (a failing receipt before the deadline, or anyone after it: the block's timestamp
past the job's deadline says which).

:class:`ReputationCache` keeps one row per job (so a ``Refunded``, which names only the payer, is joined
to its ``Funded`` provider) and, per ``(chain_id, escrow)``, the last block scanned with its hash. A refresh
reads ``eth_getLogs`` in bounded block ranges (the escrow's address, the three event topics) and commits each
range in one SQLite transaction (WAL) with the new scan position, so a crash or an RPC failure mid-scan loses
nothing already committed and never counts a log twice; the next refresh goes on from there, and a second
read of a long chain scans only the new blocks.

Reorgs: the scan stays ``confirmations`` blocks behind the head, so a reorg near the tip is never cached. A
deeper one is detected cheaply: each refresh first compares the hash of the last scanned block with the
chain's; when it differs (or the block is gone: a devnet restarted with the same addresses), the cache
rewinds to the newest kept checkpoint (the hash of each committed range's last block, the last
:data:`CHECKPOINTS_KEPT` of them) whose hash still matches, or to the start when none does, and rescans.

Reputation is aggregated from the job rows when asked (amounts are exact integers, USDC base units).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, cast

import aiohttp
from eth_utils.address import to_checksum_address
from web3 import AsyncWeb3
from web3.exceptions import BlockNotFound
from web3.providers import AsyncHTTPProvider
from web3.types import RPCEndpoint

from core.errors import ChainError, HearthError, StorageError
from core.sqlitefile import open_wal
from payments.chain import rpc_errors
from payments.receipts import usdc_str
from requester.escrow_events import EscrowEvent, checksum, decode_log, escrow_events

DEFAULT_CONFIRMATIONS: Final = 3
DEFAULT_MAX_RANGE: Final = 2000  # blocks per eth_getLogs call: most public RPCs refuse far wider ranges
DEFAULT_RPC_TIMEOUT_SECONDS: Final = 10.0
CHECKPOINTS_KEPT: Final = 128  # per (chain_id, escrow): how far back a reorg can be rewound precisely
SCHEMA_VERSION: Final = 1

RELEASED: Final = "released"
REFUNDED_FAILED: Final = "refunded_failed"  # a failing receipt, before the deadline
REFUNDED_EXPIRED: Final = "refunded_expired"  # by anyone, after the deadline

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scans (
    chain_id INTEGER NOT NULL, escrow TEXT NOT NULL,
    last_block INTEGER NOT NULL, last_hash TEXT NOT NULL,
    PRIMARY KEY (chain_id, escrow)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    chain_id INTEGER NOT NULL, escrow TEXT NOT NULL, block INTEGER NOT NULL, hash TEXT NOT NULL,
    PRIMARY KEY (chain_id, escrow, block)
);
CREATE TABLE IF NOT EXISTS jobs (
    chain_id INTEGER NOT NULL, escrow TEXT NOT NULL, job_id TEXT NOT NULL,
    provider TEXT NOT NULL, payer TEXT NOT NULL, validator TEXT NOT NULL,
    deadline INTEGER NOT NULL, funded_block INTEGER NOT NULL,
    outcome TEXT, paid TEXT, settled_block INTEGER,
    PRIMARY KEY (chain_id, escrow, job_id)
);
CREATE INDEX IF NOT EXISTS jobs_by_provider ON jobs (provider);
"""


def default_path(home: Path) -> Path:
    """Where a requester home keeps the cache: ``HOME/requester/reputation.sqlite3``."""
    return home / "requester" / "reputation.sqlite3"


@dataclass(frozen=True, slots=True)
class Reputation:
    """One provider wallet's record in the escrow's events (every count is of distinct jobs).

    ``jobs_open`` were funded and are not settled yet; ``earned`` sums ``Released.paid`` in USDC base units;
    ``first_block``/``last_block`` bound the blocks of the events that name it (None when there are none).
    """

    provider: str
    jobs_funded: int = 0
    jobs_released: int = 0
    jobs_refunded_failed: int = 0
    jobs_refunded_expired: int = 0
    earned: int = 0
    distinct_payers: int = 0
    distinct_validators: int = 0
    first_block: int | None = None
    last_block: int | None = None

    @property
    def jobs_settled(self) -> int:
        return self.jobs_released + self.jobs_refunded_failed + self.jobs_refunded_expired

    @property
    def jobs_open(self) -> int:
        return self.jobs_funded - self.jobs_settled

    @property
    def failure_rate(self) -> float:
        """Refunded jobs (failing receipt or deadline passed) over settled jobs; 0.0 with none settled."""
        settled = self.jobs_settled
        return (self.jobs_refunded_failed + self.jobs_refunded_expired) / settled if settled else 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON object; amounts as decimal strings (``earned`` in base units, ``earned_usdc`` in USDC)."""
        derived = {"jobs_settled": self.jobs_settled, "jobs_open": self.jobs_open}
        money = {"earned": str(self.earned), "earned_usdc": usdc_str(self.earned)}
        return {**asdict(self), **derived, "failure_rate": self.failure_rate, **money}


@dataclass(slots=True)
class ScanStats:
    """What one :meth:`ReputationCache.refresh` did.

    ``from_block``/``to_block`` bound the blocks read by this call (None when nothing was new);
    ``cached_to`` is the last block in the cache afterwards; ``unmatched`` counts settlements whose ``Funded``
    lies before the scan's start block (they are not counted); ``rewound_to`` is set when a reorg was found:
    the block the cache went back to (-1 when it rescanned from the start).
    """

    chain_id: int
    escrow: str
    from_block: int | None = None
    to_block: int | None = None
    cached_to: int | None = None
    ranges: int = 0
    blocks_scanned: int = 0
    logs_read: int = 0
    funded: int = 0
    released: int = 0
    refunded: int = 0
    unmatched: int = 0
    rewound_to: int | None = None


class _Rpc:
    """The few reads a scan needs, each RPC failure as :class:`ChainError` (as ``payments.chain`` does)."""

    def __init__(self, w3: AsyncWeb3[Any], url: str, owned: bool) -> None:
        self.w3, self.url, self.owned = w3, url, owned

    @classmethod
    def of(cls, w3_or_url: AsyncWeb3[Any] | str, timeout: float) -> _Rpc:
        if isinstance(w3_or_url, str):
            provider = AsyncHTTPProvider(
                w3_or_url,
                request_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout)},
                exception_retry_configuration=None,
            )
            return cls(AsyncWeb3(provider), w3_or_url, owned=True)
        return cls(w3_or_url, str(getattr(w3_or_url.provider, "endpoint_uri", "")), owned=False)

    async def close(self) -> None:
        if self.owned:
            with contextlib.suppress(Exception):
                await self.w3.provider.disconnect()

    async def chain_id(self) -> int:
        async with self._rpc("eth_chainId"):
            return int(await self.w3.eth.chain_id)

    async def head(self) -> int:
        async with self._rpc("eth_blockNumber"):
            return int(await self.w3.eth.block_number)

    async def block(self, number: int) -> tuple[str, int] | None:
        """``(hash, timestamp)`` of block ``number``; None when the chain has no such block."""
        async with self._rpc("eth_getBlockByNumber"):
            try:
                block = await self.w3.eth.get_block(number)
            except BlockNotFound:
                return None
        return "0x" + bytes(block["hash"]).hex(), int(block["timestamp"])

    async def block_hash(self, number: int) -> str | None:
        block = await self.block(number)
        return block[0] if block else None

    async def known_block(self, number: int) -> tuple[str, int]:
        """Like :meth:`block` for a block the RPC itself named (a log's, one below its head)."""
        block = await self.block(number)
        if block is None:
            raise ChainError(
                "chain_rpc_error",
                f"the RPC at {self.url} has no block {number}, which it named itself",
                details={"call": "eth_getBlockByNumber", "block": number},
            )
        return block

    async def logs(self, escrow: str, first: int, last: int) -> list[dict[str, Any]]:
        """The escrow's logs of the three events in ``first..last``, as the RPC sends them (hex strings).

        A raw request: web3's result formatters cost more than the whole request on a long range.
        """
        params = {
            "address": escrow,
            "fromBlock": hex(first),
            "toBlock": hex(last),
            "topics": [["0x" + topic.hex() for topic in escrow_events()]],
        }
        async with self._rpc("eth_getLogs"):
            reply = await self.w3.provider.make_request(RPCEndpoint("eth_getLogs"), [params])
        error, result = reply.get("error"), reply.get("result")
        if error is not None or not isinstance(result, list):
            message = error.get("message") if isinstance(error, dict) else "no list of logs"
            raise ChainError(
                "chain_rpc_error",
                f"the RPC at {self.url} failed eth_getLogs: {str(message)[:300]}",
                details={"call": "eth_getLogs", "from": first, "to": last},
            )
        return [log for log in result if isinstance(log, dict) and not log.get("removed")]

    def _rpc(self, what: str) -> AbstractAsyncContextManager[None]:
        return rpc_errors(what, self.url)


class _Moved(Exception):
    """Another refresh of the same file committed this range first."""


class ReputationCache:
    """The SQLite file of providers' reputation: :meth:`refresh` from the chain, then read it.

    One connection; methods are called from one task at a time. Several processes may share the file: each
    range commits only if the scan position is still where this refresh read it.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, path: Path, *, busy_timeout_ms: int = 5000) -> ReputationCache:
        """Open (or create) the cache at ``path``; ``reputation_cache_failed`` if it is not usable."""
        conn: sqlite3.Connection | None = None
        try:
            conn = open_wal(path, busy_timeout_ms=busy_timeout_ms)
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            (version,) = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if version != str(SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, this Hearth reads {SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            raise _file_error(f"cannot open the reputation cache at {path}: {exc}") from None
        return cls(conn, path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ReputationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------------

    def reputation(
        self, provider: str, *, chain_id: int | None = None, escrow: str | None = None
    ) -> Reputation:
        """``provider``'s record (zeros when the chain never named it), over every scanned escrow or one."""
        address = _address(provider)
        where, args = _scope(chain_id, escrow)
        rows = self._read(f"SELECT {_ROW} FROM jobs WHERE provider = ?{where}", (address, *args))
        return _aggregate(rows).get(address, Reputation(address))

    def all(self, *, chain_id: int | None = None, escrow: str | None = None) -> dict[str, Reputation]:
        """Every provider the scanned escrows named, by checksummed wallet address."""
        where, args = _scope(chain_id, escrow)
        return _aggregate(self._read(f"SELECT {_ROW} FROM jobs WHERE 1 = 1{where}", args))

    def scanned_to(self, chain_id: int, escrow: str) -> int | None:
        """The last block cached for this escrow, None before its first refresh."""
        rows = self._read(
            "SELECT last_block FROM scans WHERE chain_id = ? AND escrow = ?", (chain_id, _address(escrow))
        )
        return int(rows[0][0]) if rows else None

    # -- refreshing -----------------------------------------------------------------------------------

    async def refresh(
        self,
        w3_or_rpc: AsyncWeb3[Any] | str,
        escrow: str,
        *,
        chain_id: int,
        to_block: int | None = None,
        start_block: int = 0,
        confirmations: int = DEFAULT_CONFIRMATIONS,
        max_range: int = DEFAULT_MAX_RANGE,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT_SECONDS,
        progress: Callable[[int, int], None] | None = None,
    ) -> ScanStats:
        """Scan the escrow's new events up to ``confirmations`` blocks behind the head (or to ``to_block``).

        ``w3_or_rpc`` is an ``AsyncWeb3`` or an RPC URL; ``start_block`` is where a first scan begins (the
        escrow's deployment block saves reading empty history); ``progress(scanned_to, target)`` is called
        after each committed range. Raises :class:`ChainError` when the RPC fails (what was committed stays,
        the next refresh continues), ``chain_id_mismatch`` when it serves another chain than ``chain_id``.
        """
        if max_range < 1 or confirmations < 0 or start_block < 0:
            raise ValueError("max_range must be >= 1, confirmations and start_block >= 0")
        escrow = _address(escrow)
        stats = ScanStats(chain_id=chain_id, escrow=escrow)
        rpc = _Rpc.of(w3_or_rpc, rpc_timeout)
        try:
            served = await rpc.chain_id()
            if served != chain_id:
                problem = f"chain.chain_id: {chain_id}, but the RPC at {rpc.url} serves chain {served}"
                raise ChainError(
                    "chain_id_mismatch",
                    f"the chain is misconfigured: {problem}",
                    details={"problems": [problem], "expected": chain_id, "served": served},
                    retryable=False,
                )
            target = await rpc.head() - confirmations
            if to_block is not None:
                target = min(target, to_block)
            await self._check_reorg(rpc, chain_id, escrow, stats)
            while True:
                last = self.scanned_to(chain_id, escrow)
                first = start_block if last is None else last + 1
                if first > target:
                    break
                end = min(first + max_range - 1, target)
                try:
                    await self._scan_range(rpc, chain_id, escrow, first, end, last, stats)
                except _Moved:
                    continue
                if progress is not None:
                    progress(end, target)
        finally:
            await rpc.close()
        stats.cached_to = self.scanned_to(chain_id, escrow)
        return stats

    async def _check_reorg(self, rpc: _Rpc, chain_id: int, escrow: str, stats: ScanStats) -> None:
        rows = self._read(
            "SELECT last_block, last_hash FROM scans WHERE chain_id = ? AND escrow = ?", (chain_id, escrow)
        )
        if not rows or await rpc.block_hash(rows[0][0]) == rows[0][1]:
            return
        checkpoints = self._read(
            "SELECT block, hash FROM checkpoints WHERE chain_id = ? AND escrow = ? ORDER BY block DESC",
            (chain_id, escrow),
        )
        safe: tuple[int, str] | None = None
        for block, block_hash in checkpoints:
            if await rpc.block_hash(block) == block_hash:
                safe = (int(block), str(block_hash))
                break
        self._rewind(chain_id, escrow, safe)
        stats.rewound_to = safe[0] if safe else -1

    def _rewind(self, chain_id: int, escrow: str, safe: tuple[int, str] | None) -> None:
        """Forget every event after the safe block (all of them without one), in one transaction."""
        after = safe[0] if safe else -1
        scope = (chain_id, escrow)
        with self._write() as conn:
            conn.execute(
                "DELETE FROM jobs WHERE chain_id = ? AND escrow = ? AND funded_block > ?", (*scope, after)
            )
            conn.execute(
                "UPDATE jobs SET outcome = NULL, paid = NULL, settled_block = NULL"
                " WHERE chain_id = ? AND escrow = ? AND settled_block > ?",
                (*scope, after),
            )
            conn.execute(
                "DELETE FROM checkpoints WHERE chain_id = ? AND escrow = ? AND block > ?", (*scope, after)
            )
            if safe is None:
                conn.execute("DELETE FROM scans WHERE chain_id = ? AND escrow = ?", scope)
            else:
                conn.execute(
                    "UPDATE scans SET last_block = ?, last_hash = ? WHERE chain_id = ? AND escrow = ?",
                    (*safe, *scope),
                )

    async def _scan_range(
        self, rpc: _Rpc, chain_id: int, escrow: str, first: int, end: int, last: int | None, stats: ScanStats
    ) -> None:
        """Read blocks ``first..end`` and commit their events with the new scan position, all or nothing."""
        logs = await rpc.logs(escrow, first, end)
        try:
            events = sorted((decode_log(log) for log in logs), key=lambda e: (e.block, e.log_index))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ChainError(
                "chain_rpc_error",
                f"the RPC at {rpc.url} sent a log the escrow cannot have emitted ({type(exc).__name__})",
                details={"call": "eth_getLogs", "from": first, "to": end},
            ) from None
        timestamps: dict[int, int] = {}
        for event in events:
            if event.name == "Refunded" and event.block not in timestamps:
                timestamps[event.block] = (await rpc.known_block(event.block))[1]
        end_hash = (await rpc.known_block(end))[0]
        scope = (chain_id, escrow)
        counts = {"Funded": 0, "Released": 0, "Refunded": 0, "unmatched": 0}
        with self._write() as conn:
            row = conn.execute(
                "SELECT last_block FROM scans WHERE chain_id = ? AND escrow = ?", scope
            ).fetchone()
            if (row[0] if row else None) != last:
                raise _Moved
            for event in events:
                counts[event.name if _apply(conn, scope, event, timestamps) else "unmatched"] += 1
            conn.execute(
                "INSERT INTO scans VALUES (?, ?, ?, ?) ON CONFLICT (chain_id, escrow)"
                " DO UPDATE SET last_block = excluded.last_block, last_hash = excluded.last_hash",
                (*scope, end, end_hash),
            )
            conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)", (*scope, end, end_hash))
            conn.execute(
                "DELETE FROM checkpoints WHERE chain_id = ? AND escrow = ? AND block NOT IN (SELECT block"
                " FROM checkpoints WHERE chain_id = ? AND escrow = ? ORDER BY block DESC LIMIT ?)",
                (*scope, *scope, CHECKPOINTS_KEPT),
            )
        stats.from_block = first if stats.from_block is None else stats.from_block
        stats.to_block = end
        stats.ranges += 1
        stats.blocks_scanned += end - first + 1
        stats.logs_read += len(logs)
        stats.funded += counts["Funded"]
        stats.released += counts["Released"]
        stats.refunded += counts["Refunded"]
        stats.unmatched += counts["unmatched"]

    # -- SQLite ---------------------------------------------------------------------------------------

    def _read(self, sql: str, args: Sequence[Any]) -> list[Any]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise _file_error(f"cannot read {self.path}: {exc}") from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _file_error(f"cannot write {self.path}: {exc}") from None
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise _file_error(f"cannot write {self.path}: {exc}") from None


_ROW: Final = "provider, payer, validator, outcome, paid, funded_block, settled_block"


def _apply(
    conn: sqlite3.Connection, scope: tuple[int, str], event: EscrowEvent, timestamps: dict[int, int]
) -> bool:
    """Record one event; False for a settlement whose job was never seen funded (it is not counted)."""
    args = event.args
    job_id = "0x" + bytes(args["jobId"]).hex()
    if event.name == "Funded":
        cursor = conn.execute(
            "INSERT OR IGNORE INTO jobs (chain_id, escrow, job_id, provider, payer, validator, deadline,"
            " funded_block) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                *scope,
                job_id,
                checksum(args["provider"]),
                checksum(args["payer"]),
                checksum(args["validator"]),
                int(args["deadline"]),
                event.block,
            ),
        )
        return cursor.rowcount == 1
    if event.name == "Released":
        outcome, paid = RELEASED, str(int(args["paid"]))
    else:
        row = conn.execute(
            "SELECT deadline FROM jobs WHERE chain_id = ? AND escrow = ? AND job_id = ?", (*scope, job_id)
        ).fetchone()
        if row is None:
            return False
        outcome = REFUNDED_EXPIRED if timestamps[event.block] > int(row[0]) else REFUNDED_FAILED
        paid = "0"
    cursor = conn.execute(
        "UPDATE jobs SET outcome = ?, paid = ?, settled_block = ?"
        " WHERE chain_id = ? AND escrow = ? AND job_id = ? AND outcome IS NULL",
        (outcome, paid, event.block, *scope, job_id),
    )
    return cursor.rowcount == 1


def _aggregate(rows: Iterable[Any]) -> dict[str, Reputation]:
    acc: dict[str, dict[str, Any]] = {}
    for provider, payer, validator, outcome, paid, funded_block, settled_block in rows:
        a = acc.setdefault(
            provider,
            {"funded": 0, "outcomes": {}, "earned": 0, "payers": set(), "validators": set(), "blocks": []},
        )
        a["funded"] += 1
        a["payers"].add(payer)
        a["validators"].add(validator)
        a["blocks"].append(funded_block)
        if outcome is not None:
            a["outcomes"][outcome] = a["outcomes"].get(outcome, 0) + 1
            a["earned"] += int(paid)
            a["blocks"].append(settled_block)
    return {
        provider: Reputation(
            provider=provider,
            jobs_funded=a["funded"],
            jobs_released=a["outcomes"].get(RELEASED, 0),
            jobs_refunded_failed=a["outcomes"].get(REFUNDED_FAILED, 0),
            jobs_refunded_expired=a["outcomes"].get(REFUNDED_EXPIRED, 0),
            earned=a["earned"],
            distinct_payers=len(a["payers"]),
            distinct_validators=len(a["validators"]),
            first_block=min(a["blocks"]),
            last_block=max(a["blocks"]),
        )
        for provider, a in acc.items()
    }


def _scope(chain_id: int | None, escrow: str | None) -> tuple[str, tuple[Any, ...]]:
    where, args = "", cast(tuple[Any, ...], ())
    if chain_id is not None:
        where, args = where + " AND chain_id = ?", (*args, chain_id)
    if escrow is not None:
        where, args = where + " AND escrow = ?", (*args, _address(escrow))
    return where, args


def _address(value: str) -> str:
    """The checksummed form; ``ValueError`` when ``value`` is not a 20-byte hex address (a caller's bug)."""
    return to_checksum_address(value)


def _file_error(message: str) -> HearthError:
    """The cache file cannot be opened, read or written: check its path, or remove it to rebuild it."""
    return StorageError("reputation_cache_failed", message)
