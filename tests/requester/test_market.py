"""Provider discovery on a real devnet (anvil, the committed HearthRegistry and escrow) with real nodes
serving their signed offers: the binding both ways (DID, payout wallet, endpoint, chain), what an
endpoint may be, how long and how much a stranger's answer may take, and :func:`requester.market.fits`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.envelope import parse_envelope
from core.netpolicy import AddressPolicy
from node.daemon import Node
from payments import devnet
from payments.jwt import sign_jwt
from payments.keys import Signer, load_key, new_ed25519
from payments.signing import signed_document
from provider.offers import OFFER_CLAIM
from requester.client import NodeClient
from requester.market import MAX_OFFER_BYTES, Discovery, discover, fits
from requester.reputation import Reputation
from tests.conftest import LiveNode, free_port, make_envelope
from tests.payments.paid import PaidHome, paid_home
from tests.requester.marketnet import Market, NodeHome, serving


@pytest.fixture(scope="module")
def ph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidHome]:
    home = paid_home(tmp_path_factory.mktemp("market") / "devnet")
    try:
        yield home
    finally:
        devnet.stop(home.home)


@pytest.fixture
async def market(ph: PaidHome, tmp_path: Path) -> AsyncIterator[Market]:
    m = Market(ph, tmp_path)
    try:
        yield m
    finally:
        await m.close()


def reasons(found: Discovery) -> dict[str, str]:
    """Dropped wallets and their reason codes."""
    return {d.wallet: d.reason for d in found.dropped}


async def test_bound_providers_are_kept_and_a_squatter_is_dropped(market: Market, ph: PaidHome) -> None:
    a, b = market.node_home(), market.node_home()
    squatter = market.wallet()
    async with serving(a) as node_a, serving(b) as node_b:
        await market.register(a.wallet, node_a.did, a.url)
        await market.register(b.wallet, node_b.did, b.url + "/")  # a trailing slash is the same endpoint
        await market.register(squatter, node_a.did, a.url)  # someone else's DID and endpoint
        progress: list[tuple[int, int]] = []
        rep = {a.wallet.address: Reputation(a.wallet.address, jobs_funded=3, jobs_released=2, earned=5)}
        found = await discover(
            market.registry,
            chain_id=ph.net.chain_id,
            escrow=ph.net.escrow,
            allow_private=True,
            on_progress=lambda done, total: progress.append((done, total)),
            reputation=rep,
        )
    assert [(p.wallet, p.did) for p in found.providers] == [
        (a.wallet.address, node_a.did),
        (b.wallet.address, node_b.did),
    ]
    assert reasons(found) == {squatter.address: "wallet_mismatch"}
    assert found.registered == 3 and found.unread == 0 and found.registry == market.address
    assert found.fetched == 2  # a.url, listed twice, is asked once (b's slash is its own listing's string)
    assert progress[0] == (0, 2) and progress[-1] == (2, 2)
    kept_a, kept_b = found.providers
    assert kept_a.offer["payout_address"] == a.wallet.address and kept_a.offer["endpoint"] == a.url
    assert kept_a.offer["payment"]["escrow"] == ph.net.escrow and "jwt" in kept_a.offer
    assert kept_a.reputation == rep[a.wallet.address]
    assert kept_b.reputation == Reputation(b.wallet.address)  # no history: an empty record
    doc = json.loads(json.dumps(found.to_json()))
    assert doc["block"] == found.block and len(doc["providers"]) == 2
    assert (
        doc["dropped"][0]["reason"] == "wallet_mismatch"
        and doc["providers"][0]["reputation"]["earned"] == "5"
    )


async def test_a_did_or_endpoint_that_is_not_the_offers_is_dropped(market: Market) -> None:
    a, b = market.node_home(), market.node_home()
    async with serving(a) as node_a, serving(b) as node_b:
        # b's wallet lists its own DID at a's endpoint: the offer there is signed by a's DID
        await market.register(b.wallet, node_b.did, a.url)
        # a's wallet lists a's DID at another spelling of its endpoint than its offer names
        await market.register(a.wallet, node_a.did, f"http://localhost:{a.port}")
        found = await discover(market.registry, chain_id=None, escrow=None, allow_private=True)
    assert found.providers == []
    assert reasons(found) == {b.wallet.address: "did_mismatch", a.wallet.address: "endpoint_mismatch"}
    by_reason = {d.reason: d.message for d in found.dropped}
    assert node_a.did in by_reason["did_mismatch"] and "localhost" in by_reason["endpoint_mismatch"]


async def test_chain_escrow_kind_and_model_filters(market: Market, ph: PaidHome) -> None:
    a = market.node_home()
    async with serving(a) as node_a:
        await market.register(a.wallet, node_a.did, a.url)

        async def drop_reason(**kw: Any) -> str | None:
            kw.setdefault("chain_id", ph.net.chain_id)
            kw.setdefault("escrow", ph.net.escrow)
            found = await discover(market.registry, allow_private=True, **kw)
            return found.dropped[0].reason if found.dropped else None

        assert await drop_reason() is None
        assert await drop_reason(escrow=ph.net.escrow.lower()) is None  # an address in any case
        assert await drop_reason(kind="ffmpeg_transcode") is None
        assert await drop_reason(chain_id=1) == "wrong_chain"
        assert await drop_reason(escrow="0x" + "1" * 40) == "wrong_chain"
        assert await drop_reason(kind="ray_tune") == "no_kind"
        assert await drop_reason(kind="vllm_batch", model="no-such-model") == "no_model"


def _forged(signer: Signer, iss: str, document: dict[str, Any], now: float) -> str:
    claims = {
        "iss": iss,
        "sub": iss,
        "iat": int(now),
        "exp": int(now) + 600,
        "jti": "x",
        OFFER_CLAIM: document,
    }
    return sign_jwt(signer, claims)


class Strangers:
    """One HTTP server answering offer requests badly in every way, one way per path prefix."""

    def __init__(self, offer: dict[str, Any], node_key: Signer) -> None:
        self.offer = offer
        document = {k: v for k, v in offer.items() if k != "jwt"}
        now = time.time()
        header, payload, _ = offer["jwt"].split(".")
        other = new_ed25519()
        bodies: dict[str, bytes] = {
            "tampered": json.dumps({**offer, "prices": {**offer["prices"], "cpu_second": "0"}}).encode(),
            "unsigned": json.dumps(document).encode(),
            "forged-kid": json.dumps(
                {**document, "jwt": _forged(other, offer["node"], document, now)}
            ).encode(),
            "forged-sig": json.dumps(
                {
                    **document,
                    "jwt": f"{header}.{payload}.{_forged(other, other.did, document, now).split('.')[2]}",
                }
            ).encode(),
            "expired": json.dumps(
                signed_document(node_key, OFFER_CLAIM, offer["node"], document, now=now - 7200)
            ).encode(),
            "huge": json.dumps({**offer, "pad": "x" * (MAX_OFFER_BYTES + 1)}).encode(),
            "deep": b"[" * 200 + b"]" * 200,
            "array": b"[]",
            "text": b"<html>hello</html>",
        }
        self.bodies = bodies
        self.hits = 0

    def app(self) -> web.Application:
        async def answer(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            what = request.match_info["what"]
            if what == "error":
                return web.json_response({"error": {"code": "broken"}}, status=500)
            if what == "redirect":
                raise web.HTTPFound(self.offer["endpoint"] + "/v1/capacity")
            if what == "chunked":  # no Content-Length: the cap is applied while reading
                resp = web.StreamResponse()
                await resp.prepare(request)
                for _ in range(8):
                    await resp.write(b" " * 65536)
                return resp
            if what == "drip":  # headers at once, then a byte now and then: the timeout covers reading
                resp = web.StreamResponse()
                await resp.prepare(request)
                for _ in range(100):
                    await resp.write(b" ")
                    await asyncio.sleep(0.1)
                return resp
            return web.Response(body=self.bodies[what], content_type="application/json")

        app = web.Application()
        app.router.add_get("/{what}/v1/capacity", answer)
        return app


@pytest.fixture
async def a_node(market: Market) -> AsyncIterator[tuple[NodeHome, Node]]:
    """A node registered by its own wallet (the binding holds)."""
    a = market.node_home()
    async with serving(a) as node:
        await market.register(a.wallet, node.did, a.url)
        yield a, node


async def test_a_bad_offer_is_dropped_for_what_is_wrong_with_it(
    market: Market, a_node: tuple[NodeHome, Node]
) -> None:
    a, node = a_node
    async with NodeClient(a.url) as client:
        offer = await client.capacity()
    strangers = Strangers(offer, load_key(a.home / "node.key"))
    server = TestServer(strangers.app(), host="127.0.0.1")
    await server.start_server()
    expected = {
        "tampered": "signature_invalid",
        "unsigned": "signature_invalid",
        "forged-kid": "signature_invalid",
        "forged-sig": "signature_invalid",
        "expired": "offer_expired",
        "huge": "offer_invalid",
        "chunked": "offer_invalid",
        "deep": "offer_invalid",
        "array": "offer_invalid",
        "text": "offer_invalid",
        "error": "offer_unavailable",
        "redirect": "offer_unavailable",
    }
    wallets = {}
    try:
        for what in expected:
            wallets[what] = market.wallet()
            # each lists a's DID (so the signature is what decides) at one of the stranger's paths
            await market.register(wallets[what], node.did, str(server.make_url(f"/{what}")))
        found = await discover(market.registry, chain_id=None, escrow=None, allow_private=True)
    finally:
        await server.close()
    assert [p.wallet for p in found.providers] == [a.wallet.address]  # the real one, unharmed by the rest
    assert reasons(found) == {wallets[what].address: reason for what, reason in expected.items()}
    assert strangers.hits == len(expected)  # redirects were not followed (a's node was not asked again)
    messages = {d.wallet: d.message for d in found.dropped}
    assert "differs from what its token signed" in messages[wallets["tampered"].address]
    assert "no jwt" in messages[wallets["unsigned"].address]
    assert "kid_mismatch" in messages[wallets["forged-kid"].address]
    assert "bad_signature" in messages[wallets["forged-sig"].address]
    assert f"more than {MAX_OFFER_BYTES} bytes" in messages[wallets["chunked"].address]
    assert "deeper than" in messages[wallets["deep"].address]
    assert "HTTP 302" in messages[wallets["redirect"].address]


async def test_silent_and_closed_endpoints_are_unreachable_within_the_timeout(
    market: Market, a_node: tuple[NodeHome, Node]
) -> None:
    a, node = a_node
    accepted: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # holds the connection open and says nothing

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    strangers = TestServer(
        Strangers({"endpoint": a.url, "jwt": "a.b.c", "prices": {}, "node": ""}, new_ed25519()).app(),
        host="127.0.0.1",
    )
    await strangers.start_server()
    closed, hanging, drip = market.wallet(), market.wallet(), market.wallet()
    try:
        await market.register(closed, node.did, f"http://127.0.0.1:{free_port()}")
        await market.register(hanging, node.did, f"http://127.0.0.1:{silent_port}")
        await market.register(drip, node.did, str(strangers.make_url("/drip")))
        started = time.monotonic()
        found = await discover(market.registry, chain_id=None, escrow=None, allow_private=True, timeout=1.0)
        elapsed = time.monotonic() - started
        # A caller's session with aiohttp's default timeouts (5 minutes) is held to the same bound.
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            again = await discover(
                market.registry, chain_id=None, escrow=None, timeout=1.0, session=session, allow_private=True
            )
            elapsed_again = time.monotonic() - started
    finally:
        silent.close()
        for writer in accepted:
            writer.close()
        await strangers.close()
    assert accepted, "the silent server never saw the fetch"
    assert [p.wallet for p in found.providers] == [a.wallet.address]
    assert reasons(found) == {
        closed.address: "unreachable",
        hanging.address: "unreachable",
        drip.address: "unreachable",
    }
    assert elapsed < 1.0 + 1.5, f"discover took {elapsed:.2f} s with a 1 s timeout"
    assert reasons(again) == reasons(found) and elapsed_again < 1.0 + 1.5, elapsed_again
    assert "within 1 s" in next(d.message for d in found.dropped if d.wallet == hanging.address)


async def test_private_and_malformed_endpoints_are_refused_before_any_connection(market: Market) -> None:
    hits = 0

    async def count(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/capacity", count)
    local = TestServer(app, host="127.0.0.1")
    await local.start_server()
    port = local.port
    endpoints = {
        f"http://127.0.0.1:{port}": "endpoint_refused",
        f"http://localhost:{port}": "endpoint_refused",
        f"http://[::1]:{port}": "endpoint_refused",
        f"http://2130706433:{port}": "endpoint_refused",  # 127.0.0.1, as inet_aton reads a bare number
        "http://10.1.2.3:8787": "endpoint_refused",
        "http://192.168.0.10": "endpoint_refused",
        "http://169.254.169.254/latest": "endpoint_refused",
        "ftp://node.example.org": "endpoint_invalid",
        "http://user:secret@node.example.org": "endpoint_invalid",
        "https://node.example.org/?next=1": "endpoint_invalid",
        "node.example.org:8787": "endpoint_invalid",
    }
    wallets = {}
    try:
        for endpoint in endpoints:
            wallets[endpoint] = market.wallet()
            await market.register(
                wallets[endpoint], "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK", endpoint
            )
        found = await discover(market.registry, chain_id=None, escrow=None)
        assert found.fetched == 0 and hits == 0
        assert reasons(found) == {wallets[e].address: reason for e, reason in endpoints.items()}

        # A name is judged by what it resolves to, by the session's resolver (here: a name for 127.0.0.1).
        async def lookup(host: str, port: int) -> list[str]:
            return ["127.0.0.1"] if host == "node.example.test" else []

        named = market.wallet()
        await market.register(
            named,
            "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
            f"http://node.example.test:{port}",
        )
        async with aiohttp.ClientSession(connector=AddressPolicy().connector(lookup=lookup)) as session:
            found = await discover(market.registry, chain_id=None, escrow=None, session=session)
        assert found.fetched == 1 and hits == 0
        assert reasons(found)[named.address] == "endpoint_refused"
        assert "resolves to 127.0.0.1" in found.dropped[-1].message
    finally:
        await local.close()


async def test_at_most_max_providers_are_read_and_the_rest_counted(
    market: Market, a_node: tuple[NodeHome, Node]
) -> None:
    a, node = a_node
    for _ in range(3):
        await market.register(market.wallet(), node.did, a.url)  # three squatters after a
    found = await discover(market.registry, chain_id=None, escrow=None, allow_private=True, max_providers=2)
    assert found.registered == 4 and found.unread == 2
    assert len(found.providers) + len(found.dropped) == 2
    assert [p.wallet for p in found.providers] == [a.wallet.address]
    with pytest.raises(ValueError):
        await discover(market.registry, chain_id=None, escrow=None, max_providers=0)


# -- fits -------------------------------------------------------------------------------------------------


async def test_fits_names_the_first_reason_an_offer_cannot_take_a_job(live_node: LiveNode) -> None:
    async with live_node.client() as client:
        offer = await client.capacity()
    limits, free = offer["limits"], offer["resources"]["free"]
    job = make_envelope(
        limits={"timeout_seconds": 60, "max_output_mb": 10, "cpus": 0.5, "memory_mb": 256, "gpus": 0}
    )
    assert fits(offer, job) is None
    assert fits(offer, parse_envelope(job)) is None
    assert fits({**offer, "kinds": ["vllm_batch"]}, job) == "no_kind"
    batch = make_envelope(kind="vllm_batch", output_spec={"model": "tiny-chat"}, validation={})
    assert fits(offer, batch) == "no_model"
    assert fits({**offer, "models": [{"name": "tiny-chat"}]}, batch) is None
    for name, most in (
        ("timeout_seconds", "max_timeout_seconds"),
        ("cpus", "max_cpus"),
        ("memory_mb", "max_memory_mb"),
        ("max_output_mb", "max_output_mb"),
        ("gpus", "max_gpus"),
    ):
        over = make_envelope(limits={**job["limits"], name: limits[most] + 1})
        assert fits(offer, over) == "over_limits", name
    for name in ("cpus", "memory_mb", "gpus"):
        short = {
            **offer,
            "limits": {**limits, "max_gpus": 16},
            "resources": {**offer["resources"], "free": {**free, name: 0}},
        }
        need = make_envelope(limits={**job["limits"], "gpus": 1} if name == "gpus" else job["limits"])
        assert fits(short, need) == "no_capacity", name
    assert fits({k: v for k, v in offer.items() if k != "limits"}, job) == "offer_invalid"
    assert fits({**offer, "limits": {**limits, "max_cpus": "4"}}, job) == "offer_invalid"
    assert fits({**offer, "kinds": None}, job) == "offer_invalid"
