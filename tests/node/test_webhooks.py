"""Webhooks: a job's status changes reach its callback URL signed by the node, in order, at least once.

A real aiohttp server plays the requester's endpoint; it can fail on purpose. The node is a real one on
its journal; jobs move by quote, acceptance and cancel (no container is needed to change state).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from payments.jwt import verify_node_token
from payments.keys import Signer
from requester.client import NodeClient, NodeError
from tests.conftest import LiveNode, live, make_envelope, write_home

FAST = {
    "allow_private_addresses": True,  # the receiver listens on 127.0.0.1
    "backoff_base_seconds": 0.1,
    "backoff_max_seconds": 0.4,
    "poll_seconds": 0.05,
    "timeout_seconds": 2.0,
}


@dataclass
class Receiver:
    """The requester's endpoint: records each POST; ``answer`` decides the status it replies with."""

    server: TestServer
    posts: list[dict[str, Any]] = field(default_factory=list)
    answer: Callable[[int], int] = lambda n: 200

    @property
    def url(self) -> str:
        return str(self.server.make_url("/hook"))

    def accepted(self) -> list[dict[str, Any]]:
        return [p for p in self.posts if p["status"] == 200]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    rec = Receiver(TestServer(app, host="127.0.0.1"))

    async def hook(request: web.Request) -> web.Response:
        status = rec.answer(len(rec.posts))
        rec.posts.append(
            {
                "id": request.headers.get("Hearth-Event-Id"),
                "type": request.headers.get("Content-Type"),
                "token": await request.text(),
                "at": time.monotonic(),
                "status": status,
            }
        )
        return web.Response(status=status)

    app.router.add_post("/hook", hook)
    await rec.server.start_server()
    yield rec
    await rec.server.close()


def home_for(tmp_path: Path, **webhooks: Any) -> Path:
    return write_home(tmp_path / "home", {"webhooks": {**FAST, **webhooks}})


async def until(check: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def webhook_when(
    client: NodeClient, job: str, check: Callable[[dict[str, Any]], bool], limit: float = 10.0
) -> dict[str, Any]:
    """The job's webhook state (from its status view) once ``check`` holds for it."""
    deadline = time.monotonic() + limit
    while True:
        state: dict[str, Any] = (await client.status(job))["job"]["webhook"]
        if check(state):
            return state
        assert time.monotonic() < deadline, f"webhook state stuck at {state}"
        await asyncio.sleep(0.05)


async def run_a_job(node: LiveNode, requester: Signer, callback: str) -> str:
    """Quote, accept and cancel one job naming ``callback``: four transitions."""
    env = make_envelope("hooked-1", callback_url=callback)
    async with NodeClient(node.url) as client:
        quote = await client.quote(node.sign(requester, {"job": env}))
        body = await client.submit(node.sign(requester, {"job": env}), quote["jwt"])
        job = str(body["job"]["id"])
        await client.cancel(job, node.sign(requester, {"cancel": job}))
    return job


async def test_each_transition_arrives_once_in_order_signed_by_the_node(
    tmp_path: Path, requester: Signer, receiver: Receiver
) -> None:
    async with live(home_for(tmp_path)) as node:
        job = await run_a_job(node, requester, receiver.url)
        await until(lambda: len(receiver.posts) == 4)
        async with NodeClient(node.url) as client:
            status = await webhook_when(client, job, lambda w: w["attempts"] == 0 and w["delivered_seq"] > 0)
        await asyncio.sleep(0.3)  # nothing more comes
    assert len(receiver.posts) == 4
    events = []
    for post in receiver.posts:
        assert post["type"] == "application/jwt"
        claims = verify_node_token(post["token"], node.did, audience=requester.did)
        assert claims["jti"] == post["id"] == claims["event"]["id"]
        assert claims["job"]["id"] == job
        events.append(claims["event"])
    assert [(e["from"], e["to"]) for e in events] == [
        (None, "created"),
        ("created", "priced"),
        ("priced", "accepted"),
        ("accepted", "cancelled"),
    ]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert status["delivered_seq"] == events[-1]["seq"] and status["attempts"] == 0
    assert status["url"] == receiver.url and not status["gave_up"]


async def test_failures_are_retried_with_backoff_and_the_event_id_is_stable(
    tmp_path: Path, requester: Signer, receiver: Receiver
) -> None:
    receiver.answer = lambda n: 500 if n < 3 else 200  # the first event fails three times
    async with live(home_for(tmp_path)) as node:
        await run_a_job(node, requester, receiver.url)
        await until(lambda: len(receiver.accepted()) == 4)
    first = receiver.posts[:4]
    assert [p["status"] for p in first] == [500, 500, 500, 200]
    assert len({p["id"] for p in first}) == 1  # the same event each time: receivers de-duplicate on it
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(first)]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.18 and gaps[2] >= 0.3  # 0.1, 0.2, 0.4 s (capped)
    ids = [p["id"] for p in receiver.accepted()]
    assert ids == sorted(set(ids), key=ids.index) and len(ids) == 4  # every event, in order, once acked


async def test_the_node_gives_up_after_max_attempts_and_says_so(
    tmp_path: Path, requester: Signer, receiver: Receiver
) -> None:
    receiver.answer = lambda n: 503
    async with live(home_for(tmp_path, max_attempts=3)) as node:
        job = await run_a_job(node, requester, receiver.url)
        async with NodeClient(node.url) as client:
            state = await webhook_when(client, job, lambda w: w["gave_up"])
            await asyncio.sleep(0.5)  # and then nothing more is tried
    assert len(receiver.posts) == 3
    assert state["gave_up"] and state["attempts"] == 3 and state["last_error"] == "HTTP 503"


async def test_delivery_resumes_after_a_restart_without_resending_what_was_acknowledged(
    tmp_path: Path, requester: Signer, receiver: Receiver
) -> None:
    home = home_for(tmp_path)
    env = make_envelope("hooked-2", callback_url=receiver.url)
    async with live(home) as node:
        async with NodeClient(node.url) as client:
            quote = await client.quote(node.sign(requester, {"job": env}))
            body = await client.submit(node.sign(requester, {"job": env}), quote["jwt"])
        job = str(body["job"]["id"])
        await until(lambda: len(receiver.posts) == 3)
    async with live(home) as node, NodeClient(node.url) as client:
        await client.cancel(job, node.sign(requester, {"cancel": job}))
        await until(lambda: len(receiver.posts) == 4)
        await asyncio.sleep(0.3)
    claims = [verify_node_token(p["token"], node.did) for p in receiver.posts]
    assert [c["event"]["to"] for c in claims] == ["created", "priced", "accepted", "cancelled"]


async def test_private_callbacks_are_refused_unless_the_operator_allows_them(
    tmp_path: Path, requester: Signer
) -> None:
    async with live(write_home(tmp_path / "home")) as node, NodeClient(node.url) as client:
        for url in (
            "http://127.0.0.1:9/hook",
            "http://[::1]/hook",
            "http://localhost/hook",
            "http://10.0.0.8/",
        ):
            with pytest.raises(NodeError) as info:
                await client.quote(node.sign(requester, {"job": make_envelope("p", callback_url=url)}))
            assert (info.value.status, info.value.code) == (403, "callback_not_allowed")
        assert node.node.ledger.snapshot()["holds"] == 0
        with pytest.raises(NodeError) as info:
            await client.quote(node.sign(requester, {"job": make_envelope("p", callback_url="ftp://x/y")}))
        assert (info.value.status, info.value.code) == (422, "invalid_envelope")


async def test_a_private_validator_url_is_refused_at_quote_time(tmp_path: Path, requester: Signer) -> None:
    """``validation.validator_url`` obeys the callbacks' address policy: refused as written, nothing held."""
    async with live(write_home(tmp_path / "home")) as node, NodeClient(node.url) as client:
        for url in ("http://127.0.0.1:8790/v1/validations", "http://[::1]/v", "http://192.168.1.4/v"):
            env = make_envelope("v", validation={"validator_url": url})
            with pytest.raises(NodeError) as info:
                await client.quote(node.sign(requester, {"job": env}))
            assert (info.value.status, info.value.code) == (403, "validator_url_not_allowed")
            assert info.value.details["validator_url"] == url
        assert node.node.ledger.snapshot()["holds"] == 0
        with pytest.raises(NodeError) as info:
            env = make_envelope("v", validation={"validator_url": "file:///etc/passwd"})
            await client.quote(node.sign(requester, {"job": env}))
        assert (info.value.status, info.value.code) == (422, "invalid_envelope")


async def test_a_callback_name_that_resolves_to_a_private_address_is_never_called(
    tmp_path: Path, requester: Signer, receiver: Receiver
) -> None:
    """A name passes the literal check at admission; resolved on send to 10.1.2.3, it is never called."""
    from core.config import WebhooksSection
    from core.journal import Journal
    from node.webhooks import WebhookDispatcher

    resolved: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["93.184.216.34", "10.1.2.3"]  # one public, one private answer: refused

    callback = f"http://hooks.example:{receiver.server.port}/hook"
    with Journal.open(tmp_path / "journal.sqlite3") as journal:
        journal.create_priced(
            id="hj_1",
            iss=requester.did,
            job_id="p-1",
            kind="ffmpeg_transcode",
            idem_key="k",
            envelope_hash="h",
            envelope=make_envelope("p-1", callback_url=callback),
            price="1.00",
            quote_id="q",
            quote_jwt="t",
            quote_expires_at=time.time() + 60,
            cpus=1,
            memory_mb=64,
            gpus=0,
            actor=requester.did,
            reason="quoted",
            callback_url=callback,
        )
        cfg = WebhooksSection(**{**FAST, "allow_private_addresses": False})
        dispatcher = WebhookDispatcher(cfg, journal, requester, resolve=resolve)
        await dispatcher.start()
        try:
            await until(lambda: (journal.webhook("hj_1") or {}).get("gave_up", False))
        finally:
            await dispatcher.stop()
        state = journal.webhook("hj_1")
    assert resolved == ["hooks.example"] and receiver.posts == []
    assert state is not None and "private address (10.1.2.3)" in state["last_error"]
