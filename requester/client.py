"""A small async client for a Hearth node, used by the CLI, the demo, the tests and the benchmarks.

Requests are signed here (:func:`sign_request`); node errors come back as :class:`NodeError` carrying
the node's structured error, so callers switch on ``code`` rather than parsing messages.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from core.errors import HearthError
from core.untrusted import UntrustedJSONError, parse_json
from payments.jwt import sign_jwt
from payments.keys import Signer

DEFAULT_REQUEST_TTL_SECONDS = 300
DEFAULT_CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10)


def _error_doc(text: str) -> dict[str, Any]:
    """A node's answer as a JSON object (parsed within bounds: the node may be anyone's); an answer that
    is not one becomes a ``bad_response`` error."""
    try:
        body = parse_json(text) if text else {}
    except UntrustedJSONError:
        body = None
    if not isinstance(body, dict):
        return {"error": {"code": "bad_response", "message": text[:200]}}
    return body


class NodeError(HearthError):
    """Raised when the node answers with its structured error; ``status`` is the HTTP status."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(
            str(err.get("code", "http_error")),
            str(err.get("message", f"HTTP {status}")),
            details=err.get("details") or {},
            retryable=bool(err.get("retryable", False)),
            domain=err.get("domain", "request"),
        )
        self.status = status
        self.body = body


class NodeUnreachable(HearthError):
    """Raised when no answer came from the node (refused connection, DNS, timeout)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__("node_unreachable", f"cannot reach {url}: {reason}", retryable=True)


def sign_request(
    signer: Signer,
    node_did: str,
    claims: dict[str, Any],
    *,
    ttl_seconds: int = DEFAULT_REQUEST_TTL_SECONDS,
    now: float | None = None,
) -> str:
    """A DID-JWT from ``signer`` to ``node_did`` carrying ``claims`` (e.g. ``{"job": envelope}``)."""
    t = int(time.time() if now is None else now)
    payload = {
        "iss": signer.did,
        "aud": node_did,
        "iat": t,
        "exp": t + ttl_seconds,
        "jti": secrets.token_hex(16),
        **claims,
    }
    return sign_jwt(signer, payload)


class NodeClient:
    """One node, one session. Use as ``async with NodeClient(url) as c: ...``."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: aiohttp.ClientTimeout = DEFAULT_CLIENT_TIMEOUT,
        connector: aiohttp.BaseConnector | None = None,
    ) -> None:
        """``connector`` (owned by the client from then on) may enforce an address policy
        (:meth:`core.netpolicy.AddressPolicy.connector`) when the URL came from someone else."""
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._connector = connector
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> NodeClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout, connector=self._connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("NodeClient used outside 'async with'")
        return self._session

    async def _call(
        self, method: str, path: str, *, data: Any = None, content_type: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": content_type} if content_type else {}
        url = self.base_url + path
        try:
            async with self.session.request(method, url, data=data, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise NodeUnreachable(self.base_url, str(exc) or type(exc).__name__) from None
        body = _error_doc(text)
        if status >= 400:
            raise NodeError(status, body)
        return status, body

    async def capacity(self) -> dict[str, Any]:
        return (await self._call("GET", "/v1/capacity"))[1]

    async def node_did(self) -> str:
        return str((await self.capacity())["node"])

    async def overview(self, *, recent: int | None = None, period: str | None = None) -> dict[str, Any]:
        """The operator's overview (``GET /v1/overview``): capacity, jobs, failures, earnings over time."""
        query = {k: str(v) for k, v in (("recent", recent), ("period", period)) if v is not None}
        path = "/v1/overview" + (f"?{urlencode(query)}" if query else "")
        return (await self._call("GET", path))[1]

    async def quote(self, token: str) -> dict[str, Any]:
        return (await self._call("POST", "/v1/quotes", data=token.encode(), content_type="application/jwt"))[
            1
        ]

    async def submit(
        self, token: str, quote_jwt: str | None = None, funding: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Accept a job: a bare request, or against ``quote_jwt``; ``funding``: an EIP-3009 authorization."""
        if quote_jwt is None and funding is None:
            _, body = await self._call(
                "POST", "/v1/jobs", data=token.encode(), content_type="application/jwt"
            )
        else:
            doc = json.dumps({"request": token, "quote": quote_jwt, "funding": funding}).encode()
            _, body = await self._call("POST", "/v1/jobs", data=doc, content_type="application/json")
        return body

    async def post_receipt(self, job: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a validator's receipt (``{"receipt", "signature", "credential"?}``); the signed status."""
        data = json.dumps(body).encode()
        return (
            await self._call("POST", f"/v1/jobs/{job}/receipt", data=data, content_type="application/json")
        )[1]

    async def put_blob(self, path: Path) -> dict[str, Any]:
        """Upload a file as a blob (streamed); ``{"cid", "size"}``. A job names it by its CID."""
        with path.open("rb") as f:
            return (await self._call("PUT", "/v1/blobs", data=f, content_type="application/octet-stream"))[1]

    async def status(self, job: str) -> dict[str, Any]:
        return (await self._call("GET", f"/v1/jobs/{job}"))[1]

    async def result(self, job: str) -> dict[str, Any]:
        return (await self._call("GET", f"/v1/jobs/{job}/result"))[1]

    async def cancel(self, job: str, token: str) -> dict[str, Any]:
        path = f"/v1/jobs/{job}/cancel"
        return (await self._call("POST", path, data=token.encode(), content_type="application/jwt"))[1]

    async def events(
        self, job: str, *, follow: bool = False, after: int = 0
    ) -> AsyncIterator[dict[str, Any]]:
        """The job's events as dicts (parsed from the SSE stream)."""
        url = f"{self.base_url}/v1/jobs/{job}/events?after={after}&follow={'true' if follow else 'false'}"
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None, connect=10)
        try:
            async with self.session.get(url, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise NodeError(resp.status, _error_doc(await resp.text()))
                data_lines: list[str] = []
                async for raw in resp.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("data:"):
                        data_lines.append(line[5:].lstrip())
                    elif not line and data_lines:
                        yield parse_json("\n".join(data_lines))
                        data_lines = []
        except aiohttp.ClientConnectionError as exc:
            raise NodeUnreachable(self.base_url, str(exc)) from None
