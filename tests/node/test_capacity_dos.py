"""Capacity-hold denial of service, attacked against a real daemon process over loopback.

The attack: quotes cost nothing and did:keys are free, so a stranger asks for every free CPU from fresh
DIDs, at one request per quote lifetime. Before the fix, one such quote held the whole node for 300 s and
every honest quote got 503. Now unfunded holds take at most ``[capacity] quote_hold_share`` of the node
(``per_requester_hold_share`` each), a quote beyond that is issued but holds nothing, an honest requester
still gets a quote and can accept it, prices do not move, and a 503 says when to retry (``Retry-After``
and ``details.retry_after_seconds``) from the ledger's real state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.envelope import node_job_id
from payments.keys import Signer, new_ed25519
from requester.client import sign_request
from tests.conftest import DaemonProcess, free_port, make_envelope, write_home

# One CPU and 2 GiB whatever the machine (a cap, and this box has at least that): shares are exact.
CAPACITY = {"cpus": 1, "memory_mb": 2048, "reserve_memory_mb": 0, "busy_retry_after_seconds": 7}
QUOTE_TTL = 300


@pytest.fixture
def node(tmp_path: Path) -> Iterator[DaemonProcess]:
    with _daemon(tmp_path, {"capacity": CAPACITY}) as proc:
        yield proc


@contextmanager
def _daemon(tmp_path: Path, config: dict[str, Any]) -> Iterator[DaemonProcess]:
    port = free_port()
    api = {"host": "127.0.0.1", "port": port, "quote_ttl_seconds": QUOTE_TTL, **config.pop("api", {})}
    proc = DaemonProcess(write_home(tmp_path / "dhome", {"api": api, **config}, port=port), port)
    try:
        proc.start(timeout=60)
        yield proc
    finally:
        proc.stop()


class Caller:
    """Signed requests to one daemon, and what it answers (status, headers, JSON)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, did: str) -> None:
        self.session, self.url, self.did = session, url, did

    async def post(self, path: str, body: Any) -> tuple[int, dict[str, str], Any]:
        if isinstance(body, str):
            kw: dict[str, Any] = {"data": body, "headers": {"Content-Type": "application/jwt"}}
        else:
            kw = {"json": body}
        async with self.session.post(self.url + path, **kw) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url + path) as r:
            return r.status, await r.json(content_type=None)

    def signed(self, who: Signer, env: dict[str, Any]) -> str:
        return sign_request(who, self.did, {"job": env})

    async def quote(self, who: Signer, env: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        return await self.post("/v1/quotes", self.signed(who, env))

    async def accept(
        self, who: Signer, env: dict[str, Any], quote_jwt: str
    ) -> tuple[int, dict[str, str], Any]:
        return await self.post("/v1/jobs", {"request": self.signed(who, env), "quote": quote_jwt})

    async def resources(self) -> dict[str, Any]:
        status, offer = await self.get("/v1/capacity")
        assert status == 200, offer
        resources: dict[str, Any] = offer["resources"]
        return resources


async def caller(session: aiohttp.ClientSession, proc: DaemonProcess) -> Caller:
    async with session.get(proc.url + "/v1/capacity") as r:
        return Caller(session, proc.url, (await r.json())["node"])


def job(job_id: str, cpus: float, memory_mb: int = 512) -> dict[str, Any]:
    return make_envelope(
        job_id,
        limits={
            "timeout_seconds": 600,
            "max_output_mb": 200,
            "cpus": cpus,
            "memory_mb": memory_mb,
            "gpus": 0,
        },
    )


def assert_retry_after(headers: dict[str, str], body: Any, code: str = "insufficient_capacity") -> int:
    """The 503's error shape, its Retry-After header and ``details.retry_after_seconds`` agreeing."""
    err = body["error"]
    assert (err["code"], err["domain"], err["retryable"]) == (code, "scheduling", True), err
    retry = err["details"]["retry_after_seconds"]
    assert isinstance(retry, int) and retry >= 1
    assert headers["Retry-After"] == str(retry)
    return retry


async def attack(c: Caller, fresh: int = 6) -> list[bool]:
    """Fresh did:keys quote every CPU, then the most each may hold: every quote is issued (201); the
    claims' ``held`` says which hold anything."""
    held = []
    for i in range(fresh):
        cpus = 1.0 if i % 2 == 0 else 0.25
        status, _, body = await c.quote(new_ed25519(), job(f"grab-{i}", cpus))
        assert status == 201, body
        held.append(body["quote"]["held"])
    return held


async def test_fresh_dids_cannot_hold_the_node_and_honest_requesters_still_quote_and_accept(
    node: DaemonProcess,
) -> None:
    async with aiohttp.ClientSession() as session:
        c = await caller(session, node)
        status, _, baseline = await c.quote(new_ed25519(), job("baseline", 0.5))
        assert status == 201, baseline

        # every-CPU quotes hold nothing; 0.25-CPU ones (a requester's share) hold till the total share is full
        assert await attack(c) == [False, True, False, True, False, False]
        res = await c.resources()
        assert res["unfunded"]["cpus"] == 0.5 and res["free"]["cpus"] == 0.5
        assert res["utilisation"] == 0.0  # nothing committed: the quotes do not count as load

        honest = new_ed25519()
        status, _, q = await c.quote(honest, job("honest", 0.5))
        assert status == 201, q
        # the attack moved no price: utilisation (and so surge) counts committed work only
        assert q["quote"]["surge_factor"] == baseline["quote"]["surge_factor"]
        assert q["quote"]["price"] == baseline["quote"]["price"]
        status, _, accepted = await c.accept(honest, job("honest", 0.5), q["jwt"])
        assert status == 201, accepted
        assert accepted["job"]["state"] == "accepted"
        res = await c.resources()
        assert res["committed"]["cpus"] == 0.5 and res["free"]["cpus"] == 0.0


async def test_a_503_says_when_to_retry_and_a_refused_request_holds_nothing(node: DaemonProcess) -> None:
    async with aiohttp.ClientSession() as session:
        c = await caller(session, node)
        t0 = time.time()
        await attack(c, fresh=4)  # holds 0.5 CPU until its quotes lapse
        first = new_ed25519()
        status, _, q = await c.quote(first, job("first", 0.5))
        assert status == 201
        assert (await c.accept(first, job("first", 0.5), q["jwt"]))[0] == 201
        before = await c.resources()

        # A quote the committed work leaves room for is issued, but holds nothing: no CPU is free now.
        late = new_ed25519()
        status, _, q = await c.quote(late, job("late", 0.5))
        assert status == 201 and q["quote"]["held"] is False
        status, headers, body = await c.accept(late, job("late", 0.5), q["jwt"])
        assert status == 503
        retry = assert_retry_after(headers, body)
        # when the attack's holds lapse: within the quote lifetime, counted from their quotes
        assert QUOTE_TTL - (time.time() - t0) - 2 <= retry <= QUOTE_TTL
        _, view = await c.get(f"/v1/jobs/{q['job']['id']}")
        assert view["job"]["state"] == "priced"  # the refusal accepted nothing
        assert await _same_holds(c, before)

        # Truly exhausted: committed work leaves too little, and nothing lapses by itself.
        greedy = new_ed25519()
        status, headers, body = await c.quote(greedy, job("too-much", 1.0))
        assert status == 503
        assert assert_retry_after(headers, body) == CAPACITY["busy_retry_after_seconds"]
        status, _ = await c.get(f"/v1/jobs/{node_job_id(greedy.did, 'too-much')}")
        assert status == 404  # no job, no hold
        assert await _same_holds(c, before)

        # The bare request (bid and accept in one step) is refused the same way, writing nothing.
        status, headers, body = await c.post("/v1/jobs", c.signed(greedy, job("bare", 0.5)))
        assert status == 503
        assert abs(assert_retry_after(headers, body) - retry) <= 2  # when the attack lapses, as above
        status, _ = await c.get(f"/v1/jobs/{node_job_id(greedy.did, 'bare')}")
        assert status == 404
        assert await _same_holds(c, before)


async def _same_holds(c: Caller, before: dict[str, Any]) -> bool:
    now = await c.resources()
    return all(now[k] == before[k] for k in ("used", "committed", "unfunded", "holds"))


async def test_retry_after_is_when_the_attack_lapses_and_then_acceptance_succeeds(tmp_path: Path) -> None:
    ttl = 10
    with _daemon(tmp_path, {"capacity": CAPACITY, "api": {"quote_ttl_seconds": ttl}}) as proc:
        async with aiohttp.ClientSession() as session:
            c = await caller(session, proc)
            await attack(c, fresh=4)
            # Quote expiries are whole seconds: 2 s later, the honest quote outlives the attack's by at
            # least 2 s, more than a Retry-After rounded up to a whole second overshoots.
            await asyncio.sleep(2)
            first = new_ed25519()
            _, _, q = await c.quote(first, job("first", 0.5))
            assert (await c.accept(first, job("first", 0.5), q["jwt"]))[0] == 201
            late = new_ed25519()
            _, _, q = await c.quote(late, job("late", 0.5))
            status, headers, body = await c.accept(late, job("late", 0.5), q["jwt"])
            assert status == 503, body
            retry = assert_retry_after(headers, body)
            assert retry <= ttl - 2
            await asyncio.sleep(retry)  # exactly what the node said: by then the attack's holds lapsed
            status, _, body = await c.accept(late, job("late", 0.5), q["jwt"])
            assert status == 201, body
            assert body["job"]["state"] == "accepted"


# -- a node that takes payments: accepting costs nothing until the escrow is funded ------------------------


async def test_accepting_without_funding_is_bounded_like_a_quote_and_funded_work_goes_first(
    tmp_path: Path,
) -> None:
    """On a paying node an attacker can also accept its quotes and never fund them; those jobs are
    unfunded too (held at most until the funding deadline, within the same shares), and an honest job
    whose escrow is funded is committed whatever the attacker holds."""
    from payments import devnet
    from payments.receipts import FundingTerms, sign_authorization
    from tests.payments.paid import paid_envelope, paid_home

    port = free_port()
    config = {"api": {"host": "127.0.0.1", "port": port}, "capacity": CAPACITY}
    ph = paid_home(tmp_path / "dhome", config, chain={"confirmations": 0, "poll_seconds": 0.2})
    proc = DaemonProcess(ph.home, port)
    try:
        proc.start(timeout=60)
        async with aiohttp.ClientSession() as session:
            c = await caller(session, proc)
            cid = "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
            for i in range(4):  # quote and accept, never fund
                grabber = new_ed25519()
                env = paid_envelope(ph, f"grab-{i}", cid, limits=job("x", 0.25)["limits"])
                status, _, q = await c.quote(grabber, env)
                assert status == 201, q
                status, _, body = await c.accept(grabber, env, q["jwt"])
                assert status == 201 and body["job"]["state"] == "accepted", body
            res = await c.resources()
            assert res["unfunded"]["cpus"] == 0.5 and res["committed"]["cpus"] == 0.0
            assert res["free"]["cpus"] == 0.5

            honest = new_ed25519()
            env = paid_envelope(ph, "honest", cid, limits=job("x", 0.5)["limits"])
            status, _, q = await c.quote(honest, env)
            assert status == 201, q
            auth = sign_authorization(ph.payer, FundingTerms.from_json(q["quote"]["funding_terms"]))
            body = {"request": c.signed(honest, env), "quote": q["jwt"], "funding": auth.to_json()}
            status, _, accepted = await c.post("/v1/jobs", body)
            assert status == 201, accepted
            deadline = time.monotonic() + 60
            while (await c.resources())["committed"]["cpus"] != 0.5:  # until the node sees the escrow funded
                assert time.monotonic() < deadline, await c.get(f"/v1/jobs/{accepted['job']['id']}")
                await asyncio.sleep(0.2)
            res = await c.resources()
            assert res["unfunded"]["cpus"] == 0.5 and res["free"]["cpus"] == 0.0
            assert res["utilisation"] == 0.5  # paid work is load; the unfunded holds are not
    finally:
        proc.stop()
        devnet.stop(ph.home)
