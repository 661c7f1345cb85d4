"""SSRF and the port-scan oracle (issue 13, D6), attacked through a real daemon process over loopback.

127.0.0.1 and ::1 play the node's private network: :class:`Listener` targets there count connections and
must see none. 127.0.0.2 plays an origin on the internet, let through by the operator's allow list
(``allow_networks``), with a certificate the daemon trusts (``SSL_CERT_FILE``), so that a redirect, an
unreachable port and a webhook can be tried from somewhere allowed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.config import parse_config
from core.errors import ConfigError
from payments.keys import Signer
from requester.client import sign_request
from tests.conftest import DaemonProcess, make_envelope, write_home
from tests.storage.netfixtures import (
    closed_port,
    listening,
    loopback_name,
    make_certificate,
    refused_hosts,
    server_context,
)

SHA = "0" * 64
ALLOW_ORIGIN = ["127.0.0.2/32"]
WAIT_SECONDS = 60.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificate(tmp_path)


async def started(daemon: DaemonProcess, config: dict[str, Any], cert: Path) -> str:
    """The daemon, configured with ``config`` and trusting ``cert``, running; returns its DID."""
    write_home(daemon.home, config, port=daemon.port)
    await asyncio.to_thread(daemon.start, 30.0, {"SSL_CERT_FILE": str(cert)})
    async with aiohttp.ClientSession() as s, s.get(f"{daemon.url}/v1/capacity") as r:
        return str((await r.json())["node"])


@asynccontextmanager
async def origin(handler: Handler, *, tls: tuple[Path, Path] | None = None) -> AsyncIterator[str]:
    """An HTTP(S) server on 127.0.0.2 answering every path with ``handler``; yields its base URL."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.2")
    await server.start_server(ssl=server_context(*tls) if tls is not None else None)
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


async def post(daemon: DaemonProcess, path: str, token: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{daemon.url}{path}", data=token, headers={"Content-Type": "application/jwt"}) as r,
    ):
        return r.status, await r.read()


def https_job(job_id: str, uri: str) -> dict[str, Any]:
    return make_envelope(job_id, input_uri=uri, input_sha256=SHA)


async def job_view(daemon: DaemonProcess, job: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The job's status view once ``done`` holds for it (bounded wait)."""
    deadline = time.monotonic() + WAIT_SECONDS
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(f"{daemon.url}/v1/jobs/{job}") as r:
                view: dict[str, Any] = (await r.json())["job"]
            if done(view):
                return view
            assert time.monotonic() < deadline, f"job {job} stuck: {view}"
            await asyncio.sleep(0.1)


async def test_inputs_at_private_addresses_are_refused_before_any_connection(
    daemon: DaemonProcess, requester: Signer, cert: tuple[Path, Path]
) -> None:
    node = await started(daemon, {}, cert[0])
    async with listening("127.0.0.1") as v4, listening("::1") as v6:
        closed = closed_port()
        answers: dict[str, bytes] = {}
        for n, host in enumerate([f"127.0.0.1:{closed}", *refused_hosts(v4.port, v6.port)]):
            token = sign_request(requester, node, {"job": https_job(f"q-{n}", f"https://{host}/clip.mp4")})
            status, body = await post(daemon, "/v1/quotes", token)
            assert status == 403, (host, body)
            answers[host] = body
            if n == 0:  # a refusal has no side effect: the same request again is judged again, not a replay
                assert await post(daemon, "/v1/quotes", token) == (status, body)
        # a bare request (bid and accept at once) is refused the same way, and holds nothing
        token = sign_request(requester, node, {"job": https_job("j", f"https://127.0.0.1:{v4.port}/x")})
        status, body = await post(daemon, "/v1/jobs", token)
        assert (status, body) == (403, answers[f"127.0.0.1:{v4.port}"])
        async with aiohttp.ClientSession() as s, s.get(f"{daemon.url}/v1/capacity") as r:
            assert (await r.json())["resources"]["used"]["cpus"] == 0
    assert (v4.connections, v6.connections) == (0, 0)
    # an open port and a closed one: byte for byte the same answer, and it names neither
    assert answers[f"127.0.0.1:{v4.port}"] == answers[f"127.0.0.1:{closed}"]
    error = json.loads(answers[f"127.0.0.1:{closed}"])["error"]
    assert (error["code"], error["domain"], error["retryable"], error["details"]) == (
        "input_not_allowed",
        "storage",
        False,
        {},
    )
    assert str(closed) not in error["message"] and len(set(answers.values())) == 1


async def test_a_redirect_from_an_allowed_origin_to_a_private_address_is_never_followed(
    daemon: DaemonProcess, requester: Signer, cert: tuple[Path, Path]
) -> None:
    config = {"storage": {"allow_networks": ALLOW_ORIGIN}}
    node = await started(daemon, config, cert[0])
    async with listening("127.0.0.1") as v4, listening("::1") as v6:
        targets = [f"https://{host}/x" for host in refused_hosts(v4.port, v6.port)]
        asked: list[str] = []

        async def redirect(request: web.Request) -> web.StreamResponse:
            asked.append(request.path)
            raise web.HTTPFound(targets[int(request.path.strip("/"))])

        async with origin(redirect, tls=cert) as base:
            for n in range(len(targets)):
                token = sign_request(requester, node, {"job": https_job(f"r-{n}", f"{base}/{n}")})
                status, body = await post(daemon, "/v1/quotes", token)
                assert status == 403 and b'"input_not_allowed"' in body, (targets[n], body)
    assert asked == [f"/{n}" for n in range(len(targets))]  # the allowed origin was reached every time
    assert (v4.connections, v6.connections) == (0, 0)


async def test_an_unreachable_input_fails_the_job_the_same_way_open_port_or_closed(
    daemon: DaemonProcess, requester: Signer, cert: tuple[Path, Path], tmp_path: Path
) -> None:
    """On a network the operator allows, a closed port, a port that hangs up and a TLS server with an
    untrusted certificate fail the job with the same words: no port scan through job failures.
    """
    config = {
        "storage": {"allow_networks": ALLOW_ORIGIN, "connect_timeout_seconds": 2, "read_timeout_seconds": 2},
        "scheduler": {"paused": False},
        "policy": {"retry_budget": 0},
    }
    node = await started(daemon, config, cert[0])
    (tmp_path / "other").mkdir()
    untrusted = make_certificate(tmp_path / "other")  # not the one in the daemon's SSL_CERT_FILE

    async def content(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"never fetched: the daemon does not trust this certificate")

    async with listening("127.0.0.2") as hangs_up, origin(content, tls=untrusted) as tls_base:
        uris = [
            f"https://127.0.0.2:{closed_port('127.0.0.2')}/x",
            f"https://127.0.0.2:{hangs_up.port}/x",
            f"{tls_base}/x",
        ]
        jobs = []
        for n, uri in enumerate(uris):
            status, body = await post(
                daemon, "/v1/jobs", sign_request(requester, node, {"job": https_job(f"u-{n}", uri)})
            )
            assert status == 201, body
            jobs.append(json.loads(body)["job"]["id"])
        views = [await job_view(daemon, job, lambda v: v["state"] == "failed") for job in jobs]
    assert hangs_up.connections >= 1  # the open port really was reached
    failures = [v["failure"] for v in views]
    assert failures[0] == {
        "domain": "storage",
        "code": "input_unreachable",
        "message": failures[0]["message"],
        "retryable": True,
    }
    assert all(f == failures[0] for f in failures), failures
    assert all(str(p) not in failures[0]["message"] for p in (hangs_up.port, "127.0.0.2"))


async def test_a_webhook_redirect_to_a_private_address_is_not_followed(
    daemon: DaemonProcess, requester: Signer, cert: tuple[Path, Path]
) -> None:
    async with listening("127.0.0.1") as target:
        posts: list[str] = []

        async def hook(request: web.Request) -> web.StreamResponse:
            posts.append(request.path)
            raise web.HTTPTemporaryRedirect(f"http://127.0.0.1:{target.port}/hook")

        async with origin(hook) as base:
            config = {
                "webhooks": {
                    "allow_networks": ALLOW_ORIGIN,
                    "max_attempts": 2,
                    "backoff_base_seconds": 0.1,
                    "poll_seconds": 0.05,
                }
            }
            node = await started(daemon, config, cert[0])
            jobs = []
            # one callback redirects to 127.0.0.1; one names a host that resolves there
            for n, url in enumerate([f"{base}/hook", f"http://{loopback_name()}:{target.port}/hook"]):
                token = sign_request(requester, node, {"job": make_envelope(f"w-{n}", callback_url=url)})
                status, body = await post(daemon, "/v1/quotes", token)
                assert status == 201, body
                jobs.append(json.loads(body)["job"]["id"])
            gave_up = [
                (await job_view(daemon, job, lambda v: bool((v["webhook"] or {}).get("gave_up"))))["webhook"]
                for job in jobs
            ]
    assert gave_up[0]["last_error"] == "HTTP 307" and len(posts) == 2  # each attempt reached 127.0.0.2
    assert "resolves to a private address" in gave_up[1]["last_error"] and gave_up[1]["attempts"] == 1
    assert target.connections == 0


async def test_a_gateway_is_trusted_as_configured_but_its_redirect_is_not_followed(
    daemon: DaemonProcess, requester: Signer, cert: tuple[Path, Path]
) -> None:
    async with listening("127.0.0.1") as target:
        asked: list[str] = []

        async def gateway(request: web.Request) -> web.StreamResponse:
            asked.append(request.path)
            raise web.HTTPFound(f"http://127.0.0.1:{target.port}{request.path_qs}")

        # the gateway is on loopback (127.0.0.2), which no allowance names: configuring it is the allowance
        async with origin(gateway) as base:
            node = await started(daemon, {"storage": {"gateways": [base]}}, cert[0])
            status, body = await post(
                daemon, "/v1/quotes", sign_request(requester, node, {"job": make_envelope("g-1")})
            )
    assert status == 201, body  # priced on its limits: the input could not be had
    assert len(asked) == 1 and asked[0].startswith("/ipfs/")
    assert target.connections == 0


@pytest.mark.parametrize("section", ["storage", "webhooks"])
def test_an_allow_list_that_is_not_networks_stops_the_node_at_start(section: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({section: {"allow_networks": ["10.0.0.5/8"]}})  # host bits set: a typo, not a wish
    assert f"{section}.allow_networks" in info.value.message
    assert parse_config({section: {"allow_networks": ["10.0.0.0/8", "fd00::/8"]}})
