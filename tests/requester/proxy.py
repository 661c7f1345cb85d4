"""A small reverse proxy for routing tests: it stands in front of a real node and loses, withholds or
spoils what passes, so the requester sees the outcomes it must tell apart (tests/requester/test_routing*.py).
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer


class Proxy:
    """A reverse proxy in front of one node, for the outcomes a requester cannot tell apart from afar.

    ``lose``: the step ("accept" or "fund") whose first POST /v1/jobs is forwarded to the node, and the
    connection then dropped before the answer goes back; ``hang``: every POST /v1/jobs is held unanswered
    (and not forwarded); ``spoil``: POST /v1/jobs goes to the node with its quote replaced by another
    token, which the node refuses; ``vanish``: the proxy stops listening once it has answered a quote, so
    the submission's connection is refused before anything is sent. Everything else is forwarded as is.
    """

    def __init__(
        self,
        target: str,
        *,
        lose: str | None = None,
        hang: bool = False,
        spoil: bool = False,
        vanish: bool = False,
    ) -> None:
        self.target, self.lose, self.hang, self.spoil, self.vanish = target, lose, hang, spoil, vanish
        self.posts: list[str] = []
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        step = None
        if request.method == "POST" and request.path == "/v1/jobs":
            step = "fund" if json.loads(body).get("funding") else "accept"
            self.posts.append(step)
            if self.hang:
                await self.release.wait()
                return web.Response(status=504)
            if self.spoil:
                doc = json.loads(body)
                body = json.dumps({**doc, "quote": doc["request"]}).encode()  # a token, not this node's quote
        headers = {"Content-Type": request.headers.get("Content-Type", "application/octet-stream")}
        async with (
            aiohttp.ClientSession() as s,
            s.request(request.method, self.target + request.path_qs, data=body, headers=headers) as resp,
        ):
            answer, status = await resp.read(), resp.status
        if step is not None and step == self.lose and self.posts.count(step) == 1:
            assert request.transport is not None
            request.transport.abort()  # the node took it; the requester hears nothing
            return web.Response(status=500)
        if self.vanish and request.path == "/v1/quotes":
            assert self.server.runner is not None
            for site in self.server.runner.sites:
                assert site._server is not None
                site._server.close()  # no new connections; this one still gets its answer
        return web.Response(body=answer, status=status, content_type="application/json")

    async def __aenter__(self) -> Proxy:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.server.close()
