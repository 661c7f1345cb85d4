"""Reputation from HearthEscrow's events on a real chain (anvil, the committed contracts), cached in SQLite.

Two providers, jobs released (in full and with a remainder), refunded on a failing receipt, refunded after the
deadline (time travel), still open; every field is checked against what the test's own transactions emitted.
Then the cache's promises: a second refresh reads only new blocks, reopening keeps the totals, tiny ranges
give the same answer as one, an RPC failing mid-scan leaves committed ranges whole and the next refresh goes
on, and a reorg past the last scanned block is rewound.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from eth_typing import URI
from web3 import AsyncWeb3
from web3.contract import Contract
from web3.providers import AsyncHTTPProvider
from web3.types import RPCEndpoint, RPCResponse

from core.errors import ChainError, HearthError
from payments.devnet import TOKEN_NAME, USDC
from requester.reputation import Reputation, ReputationCache, ScanStats, default_path
from tests.conftest import free_port
from tests.payments.contracts.chain import CHAIN_ID, Chain, anvil, new_account, sign_receipt

DEADLINE_SECONDS = 3600


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with anvil() as c:
        yield c


@pytest.fixture(scope="module")
def usdc(chain: Chain) -> Contract:
    return chain.deploy("TestUSDC", TOKEN_NAME, chain.deployer)


@dataclass
class Job:
    job_id: bytes
    provider: str
    payer: str
    validator: LocalAccount
    amount: int
    deadline: int
    funded_block: int
    settled_block: int | None = None
    outcome: str | None = None
    paid: int = 0

    @property
    def entry(self) -> tuple[str, str, str, int, int]:
        """The terms ``release`` and ``refund`` take back (the escrow keeps only their hash)."""
        return (self.payer, self.provider, self.validator.address, self.amount, self.deadline)


@dataclass
class Market:
    """One escrow of its own on the shared chain, and what the test did to it (the expected events)."""

    chain: Chain
    usdc: Contract
    escrow: Contract
    start: int = 0  # the escrow's deployment block: where its scans begin
    jobs: list[Job] = field(default_factory=list)
    logs: int = 0  # escrow events emitted so far

    @property
    def url(self) -> str:
        return str(self.chain.w3.provider.endpoint_uri)  # type: ignore[attr-defined]

    def fund(
        self, provider: str, payer: str, validator: LocalAccount, amount: int, seconds: int = 3600
    ) -> Job:
        self.chain.transact(self.usdc.functions.mint(payer, amount), self.chain.deployer)
        self.chain.transact(self.usdc.functions.approve(self.escrow.address, amount), payer)
        job_id, deadline = secrets.token_bytes(32), self.chain.now() + seconds
        call = self.escrow.functions.fund(job_id, provider, validator.address, amount, deadline)
        receipt = self.chain.transact(call, payer)
        job = Job(job_id, provider, payer, validator, amount, deadline, int(receipt["blockNumber"]))
        self.jobs.append(job)
        self.logs += 1
        return job

    def release(self, job: Job, paid: int) -> None:
        digest = job.job_id[::-1]
        sig = self._receipt(job, digest, passed=True, amount=paid)
        receipt = self.chain.transact(
            self.escrow.functions.release(job.job_id, job.entry, paid, digest, sig), self.chain.accounts[5]
        )
        self._settled(job, receipt, "released", paid)

    def refund_failing(self, job: Job) -> None:
        """A failing receipt's refund; after the deadline the contract ignores it and it counts as expired."""
        digest = job.job_id[::-1]
        sig = self._receipt(job, digest, passed=False, amount=0)
        receipt = self.chain.transact(
            self.escrow.functions.refund(job.job_id, job.entry, digest, sig), job.payer
        )
        outcome = "refunded_expired" if self.chain.now() > job.deadline else "refunded_failed"
        self._settled(job, receipt, outcome, 0)

    def refund_expired(self, job: Job) -> None:
        receipt = self.chain.transact(
            self.escrow.functions.refund(job.job_id, job.entry, bytes(32), b""), self.chain.accounts[6]
        )
        assert self.chain.now() > job.deadline
        self._settled(job, receipt, "refunded_expired", 0)

    async def scan(
        self, cache: ReputationCache, rpc: AsyncWeb3[Any] | str | None = None, **kw: Any
    ) -> ScanStats:
        """Refresh ``cache`` from this escrow's deployment block on."""
        return await cache.refresh(
            rpc or self.url, self.escrow.address, chain_id=CHAIN_ID, start_block=self.start, **kw
        )

    def logs_upto(self, block: int) -> int:
        """How many escrow events lie in blocks up to ``block``."""
        settled = [j.settled_block for j in self.jobs if j.settled_block is not None]
        return sum(j.funded_block <= block for j in self.jobs) + sum(b <= block for b in settled)

    def expected(self) -> dict[str, Reputation]:
        """Each provider's record as the test's own transactions make it."""
        out: dict[str, Reputation] = {}
        for provider in {j.provider for j in self.jobs}:
            jobs = [j for j in self.jobs if j.provider == provider]
            blocks = [j.funded_block for j in jobs] + [j.settled_block for j in jobs if j.settled_block]
            out[provider] = Reputation(
                provider=provider,
                jobs_funded=len(jobs),
                jobs_released=sum(j.outcome == "released" for j in jobs),
                jobs_refunded_failed=sum(j.outcome == "refunded_failed" for j in jobs),
                jobs_refunded_expired=sum(j.outcome == "refunded_expired" for j in jobs),
                earned=sum(j.paid for j in jobs),
                distinct_payers=len({j.payer for j in jobs}),
                distinct_validators=len({j.validator.address for j in jobs}),
                first_block=min(blocks),
                last_block=max(blocks),
            )
        return out

    def _receipt(self, job: Job, digest: bytes, *, passed: bool, amount: int) -> bytes:
        return sign_receipt(
            job.validator,
            escrow=self.escrow.address,
            job_id=job.job_id,
            result_digest=digest,
            passed=passed,
            amount=amount,
            provider=job.provider,
        )

    def _settled(self, job: Job, receipt: Any, outcome: str, paid: int) -> None:
        job.settled_block, job.outcome, job.paid = int(receipt["blockNumber"]), outcome, paid
        self.logs += 1


def _market(chain: Chain, usdc: Contract) -> Market:
    escrow = chain.deploy("HearthEscrow", usdc.address)
    return Market(chain, usdc, escrow, start=int(chain.w3.eth.block_number))


@pytest.fixture
def market(chain: Chain, usdc: Contract) -> Market:
    """A fresh escrow and a first round: provider A (released in full and in part, refunded on a failing
    receipt, one open) and provider B (refunded after the deadline, once by anyone and once with a
    failing receipt that came too late, and released in full).
    """
    m = _market(chain, usdc)
    a, b = new_account().address, new_account().address
    p1, p2 = chain.accounts[1], chain.accounts[2]
    v1, v2 = new_account(), new_account()
    m.release(m.fund(a, p1, v1, 5 * USDC), 5 * USDC)
    m.release(m.fund(a, p2, v1, 5 * USDC), 3 * USDC)  # 2 USDC back to the payer
    m.refund_failing(m.fund(a, p1, v2, 4 * USDC))
    m.fund(a, p1, v1, 7 * USDC)  # still open
    late = [m.fund(b, p2, v2, 2 * USDC, seconds=60), m.fund(b, p1, v2, 1 * USDC, seconds=60)]
    m.release(m.fund(b, p1, v1, 6 * USDC), 6 * USDC)
    chain.advance(61)
    m.refund_expired(late[0])
    m.refund_failing(late[1])
    return m


def _head(m: Market) -> int:
    return int(m.chain.w3.eth.block_number)


async def test_every_field_is_what_the_events_say(market: Market, tmp_path: Path) -> None:
    head = _head(market)
    with ReputationCache.open(default_path(tmp_path)) as cache:
        stats = await market.scan(cache, confirmations=0)
        assert (stats.from_block, stats.to_block, stats.cached_to) == (market.start, head, head)
        assert stats.logs_read == market.logs == 13 and stats.unmatched == 0
        assert (stats.funded, stats.released, stats.refunded) == (7, 3, 3)

        expected = market.expected()
        assert cache.all() == expected
        a, b = (market.jobs[0].provider, market.jobs[4].provider)
        ra, rb = cache.reputation(a.lower()), cache.reputation(b)  # any case of the address
        assert (ra.jobs_funded, ra.jobs_released, ra.jobs_refunded_failed, ra.jobs_refunded_expired) == (
            4,
            2,
            1,
            0,
        )
        assert (ra.jobs_open, ra.earned, ra.distinct_payers, ra.distinct_validators) == (1, 8 * USDC, 2, 2)
        assert (rb.jobs_funded, rb.jobs_released, rb.jobs_refunded_failed, rb.jobs_refunded_expired) == (
            3,
            1,
            0,
            2,
        )
        assert (rb.jobs_open, rb.earned, rb.distinct_payers, rb.distinct_validators) == (0, 6 * USDC, 2, 2)
        assert ra.first_block == market.jobs[0].funded_block and rb.last_block == head
        assert rb.failure_rate == pytest.approx(2 / 3)
        j = ra.to_json()
        assert (j["provider"], j["earned"], j["earned_usdc"], j["jobs_open"], j["jobs_settled"]) == (
            a,
            "8000000",
            "8",
            1,
            3,
        )
        assert cache.reputation(a, chain_id=CHAIN_ID, escrow=market.escrow.address) == ra
        assert cache.reputation(a, chain_id=1) == Reputation(a)  # scoped to a chain never scanned

        stranger = new_account().address
        assert cache.reputation(stranger) == Reputation(stranger)
        assert cache.reputation(stranger).to_json()["first_block"] is None
        with pytest.raises(ValueError):
            cache.reputation("0xnot-an-address")


def test_a_file_that_is_not_a_cache_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "reputation.sqlite3"
    path.write_bytes(b"not a database, just bytes " * 100)
    with pytest.raises(HearthError) as info:
        ReputationCache.open(path)
    assert info.value.code == "reputation_cache_failed" and str(path) in info.value.message


async def test_a_second_refresh_reads_only_new_blocks_and_reopening_keeps_totals(
    market: Market, tmp_path: Path
) -> None:
    path = tmp_path / "reputation.sqlite3"
    with ReputationCache.open(path) as cache:
        first = await market.scan(cache)
        assert first.cached_to == _head(market) - 3  # three confirmations: the tip is not cached yet

        assert first.logs_read == market.logs_upto(first.cached_to) < market.logs
        a = market.jobs[0].provider

        c = new_account().address
        market.release(market.fund(c, market.chain.accounts[3], new_account(), 9 * USDC), 9 * USDC)
        market.release(market.fund(a, market.chain.accounts[3], new_account(), 1 * USDC), 1 * USDC)
        for _ in range(3):
            market.chain.w3.provider.make_request(RPCEndpoint("evm_mine"), [])
        head = _head(market)

        second = await market.scan(cache)
        assert first.cached_to is not None
        assert (second.from_block, second.to_block) == (first.cached_to + 1, head - 3)
        assert second.blocks_scanned == head - 3 - first.cached_to and second.ranges == 1
        assert first.logs_read + second.logs_read == market.logs  # every log read once, none twice
        assert cache.all() == market.expected()
        assert cache.reputation(a).distinct_payers == 3 and cache.reputation(c).earned == 9 * USDC

        third = await market.scan(cache)
        assert (third.blocks_scanned, third.logs_read, third.from_block, third.cached_to) == (
            0,
            0,
            None,
            head - 3,
        )

    with ReputationCache.open(path) as reopened:
        assert reopened.all() == market.expected()
        assert reopened.scanned_to(CHAIN_ID, market.escrow.address) == head - 3
        again = await market.scan(reopened)
        assert again.blocks_scanned == 0 and again.logs_read == 0


async def test_tiny_ranges_give_the_same_answer_as_one(market: Market, tmp_path: Path) -> None:
    head = _head(market)
    seen: list[tuple[int, int]] = []
    with ReputationCache.open(tmp_path / "tiny.sqlite3") as cache:
        stats = await market.scan(
            cache,
            confirmations=0,
            max_range=3,
            progress=lambda done, target: seen.append((done, target)),
        )
        blocks = head - market.start + 1
        assert stats.ranges == -(-blocks // 3) and stats.blocks_scanned == blocks
        assert stats.logs_read == market.logs
        assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (head, head)
        assert cache.all() == market.expected()


class _BreaksAfter(AsyncHTTPProvider):
    """Talks to anvil for ``calls`` requests, then to a port nobody listens on (connection refused)."""

    def __init__(self, url: str, calls: int) -> None:
        super().__init__(url, exception_retry_configuration=None)
        self.calls = calls
        self.dead = f"http://127.0.0.1:{free_port()}"

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        self.calls -= 1
        if self.calls < 0:
            self.endpoint_uri = URI(self.dead)
        return await super().make_request(method, params)


async def test_an_rpc_failing_mid_scan_keeps_what_was_committed(market: Market, tmp_path: Path) -> None:
    head = _head(market)
    with ReputationCache.open(tmp_path / "broken.sqlite3") as cache:
        dead = f"http://127.0.0.1:{free_port()}"
        with pytest.raises(ChainError) as info:
            await market.scan(cache, dead, confirmations=0)
        assert info.value.code == "chain_unavailable" and info.value.retryable
        assert cache.scanned_to(CHAIN_ID, market.escrow.address) is None and cache.all() == {}

        # chain id, head, then a few ranges of 3 blocks (logs, block hash, refund timestamps): then it breaks
        w3 = AsyncWeb3(_BreaksAfter(market.url, calls=14))
        try:
            with pytest.raises(ChainError) as info:
                await market.scan(cache, w3, confirmations=0, max_range=3)
        finally:
            await w3.provider.disconnect()
        assert info.value.code == "chain_unavailable"
        cut = cache.scanned_to(CHAIN_ID, market.escrow.address)
        assert (
            cut is not None and market.start < cut < head and (cut + 1 - market.start) % 3 == 0
        )  # whole ranges
        partial = cache.all()

        with ReputationCache.open(tmp_path / "reference.sqlite3") as reference:
            await market.scan(reference, to_block=cut, confirmations=0)
            assert partial == reference.all()  # exactly the committed ranges' events
        assert partial and partial != market.expected()

        rest = await market.scan(cache, confirmations=0)
        assert (rest.from_block, rest.to_block) == (cut + 1, head)
        assert cache.all() == market.expected()

        with pytest.raises(ChainError) as wrong_chain:
            await cache.refresh(market.url, market.escrow.address, chain_id=1)
        assert wrong_chain.value.code == "chain_id_mismatch"
        assert wrong_chain.value.details["served"] == CHAIN_ID
        assert cache.scanned_to(1, market.escrow.address) is None


class _SpoilsLogs(AsyncHTTPProvider):
    """anvil, except that every ``eth_getLogs`` answer is spoiled by ``spoil`` (a hostile or broken RPC)."""

    def __init__(self, url: str, spoil: Any) -> None:
        super().__init__(url, exception_retry_configuration=None)
        self.spoil = spoil

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        response = await super().make_request(method, params)
        return self.spoil(response) if method == "eth_getLogs" else response


def _first_log(change: Any) -> Any:
    def spoil(response: Any) -> Any:
        logs = [dict(log) for log in response["result"]]
        if logs:
            change(logs[0])
        return {**response, "result": logs}

    return spoil


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(
            lambda r: {
                "jsonrpc": "2.0",
                "id": r["id"],
                "error": {"code": -32005, "message": "range too wide"},
            },
            id="error-reply",
        ),
        pytest.param(lambda r: {**r, "result": {"logs": []}}, id="not-a-list"),
        pytest.param(_first_log(lambda log: log.update(topics=["0x" + "ab" * 32])), id="foreign-topic"),
        pytest.param(_first_log(lambda log: log.update(data="0x1234")), id="short-data"),
        pytest.param(_first_log(lambda log: log.update(data=None)), id="data-wrong-type"),
        pytest.param(_first_log(lambda log: log.update(blockNumber="0xzz")), id="bad-block-number"),
        pytest.param(_first_log(lambda log: log.pop("logIndex")), id="missing-field"),
    ],
)
async def test_a_broken_or_hostile_log_answer_is_a_chain_error_and_commits_nothing(
    market: Market, tmp_path: Path, spoil: Any
) -> None:
    with ReputationCache.open(tmp_path / "spoiled.sqlite3") as cache:
        w3 = AsyncWeb3(_SpoilsLogs(market.url, spoil))
        try:
            with pytest.raises(ChainError) as info:
                await market.scan(cache, w3, confirmations=0)
        finally:
            await w3.provider.disconnect()
        assert info.value.code == "chain_rpc_error" and info.value.details["call"] == "eth_getLogs"
        assert cache.scanned_to(CHAIN_ID, market.escrow.address) is None and cache.all() == {}
        await market.scan(cache, confirmations=0)  # the honest RPC afterwards: the same file, whole
        assert cache.all() == market.expected()


async def test_a_reorg_past_the_last_scanned_block_is_rewound(
    chain: Chain, usdc: Contract, tmp_path: Path
) -> None:
    m = _market(chain, usdc)
    provider, validator = new_account().address, new_account()
    job = m.fund(provider, chain.accounts[1], validator, 5 * USDC)
    with ReputationCache.open(tmp_path / "reorg.sqlite3") as cache:
        funded = await m.scan(cache, confirmations=0)
        m.release(job, 5 * USDC)
        await m.scan(cache, confirmations=0)
        assert cache.reputation(provider).jobs_released == 1

        # the block holding the release is replaced by an empty one
        depth = _head(m) - (job.settled_block or 0) + 1
        reply = chain.w3.provider.make_request(RPCEndpoint("anvil_reorg"), [depth, []])
        assert reply.get("error") is None
        stats = await m.scan(cache, confirmations=0)
        assert stats.rewound_to == funded.cached_to and stats.logs_read == 0
        rep = cache.reputation(provider)
        assert (rep.jobs_funded, rep.jobs_released, rep.earned, rep.last_block) == (1, 0, 0, job.funded_block)


class _Racing(AsyncHTTPProvider):
    """Before its first ``eth_getLogs`` answers, another process's cache refreshes the same file in full."""

    def __init__(self, url: str, other: Any) -> None:
        super().__init__(url, exception_retry_configuration=None)
        self.other = other

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        response = await super().make_request(method, params)
        if method == "eth_getLogs" and self.other is not None:
            other, self.other = self.other, None
            await other()
        return response


async def test_two_refreshes_of_one_file_count_each_log_once(market: Market, tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    with ReputationCache.open(path) as mine, ReputationCache.open(path) as theirs:
        theirs_stats: list[ScanStats] = []

        async def refresh_theirs() -> None:
            theirs_stats.append(await market.scan(theirs, confirmations=0))

        w3 = AsyncWeb3(_Racing(market.url, refresh_theirs))
        try:
            stats = await market.scan(mine, w3, confirmations=0, max_range=5)
        finally:
            await w3.provider.disconnect()
        (other,) = theirs_stats
        assert other.logs_read == market.logs and stats.ranges == 0 and stats.logs_read == 0
        assert stats.cached_to == other.cached_to == _head(market)
        assert mine.all() == theirs.all() == market.expected()
