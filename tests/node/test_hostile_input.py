"""Hostile bytes against a real daemon process: every refusal is a structured 4xx with no side effect.

Each class of attack comes in variants (other fields, other routes, other encodings): JSON depth bombs
in every place the node parses JSON, integers beyond 64 bits, floats that overflow to infinity,
out-of-range event positions, refused cancels. After each, the daemon must still answer, the refused
token must leave no nonce (it is judged the same way when sent again), and nothing may be held.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from payments.jwt import b64url_encode, request_claims, sign_jwt
from payments.keys import Signer, new_ed25519
from tests.conftest import DaemonProcess, free_port, make_envelope, write_home

NO_JOB = "hj_aaaaaaaaaaaaaaaaaaaaaaaaaa"  # a well-formed job id no job has
BOMB_DEPTHS = (33, 5_000, 30_000)  # the deepest still fits the default 256 KiB body cap


# Short body deadlines, so that the slow-body attacks below finish quickly.
BODY_TIMEOUT_SECONDS = 1.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    port = free_port()
    config = {
        "api": {"host": "127.0.0.1", "port": port, "body_timeout_seconds": BODY_TIMEOUT_SECONDS},
        "storage": {"upload_stall_seconds": BODY_TIMEOUT_SECONDS},
    }
    daemon = DaemonProcess(write_home(tmp_path_factory.mktemp("hostile") / "home", config, port=port), port)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
async def http(node: DaemonProcess) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=node.url, timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture(scope="module")
def node_did(node: DaemonProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(node.url + "/readyz", timeout=5) as resp:
        return str(orjson.loads(resp.read())["node"])


def _b64(text: str | bytes) -> str:
    return b64url_encode(text.encode() if isinstance(text, str) else text)


def raw_token(header: str, payload: str, signature: bytes = b"\x01" * 64) -> str:
    """A compact JWS from JSON texts as given (which sign_jwt could not write: bombs, huge numbers)."""
    return f"{_b64(header)}.{_b64(payload)}.{_b64(signature)}"


def signed_raw(signer: Signer, payload: str) -> str:
    """A correctly signed token whose payload is the JSON text ``payload``, byte for byte."""
    header = orjson.dumps({"alg": signer.alg, "kid": signer.kid, "typ": "JWT"}).decode()
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    return f"{signing_input}.{_b64(signer.sign(signing_input.encode()))}"


def claims_text(signer: Signer, aud: str, job: Any, overrides: dict[str, str] | None = None) -> str:
    """The claims of a request as JSON text, with ``overrides`` spliced in as raw JSON values."""
    overrides = overrides or {}
    claims = request_claims(signer, aud, extra={"job": job})
    for name in overrides:
        claims[name] = f"@{name}@"
    text = orjson.dumps(claims).decode()
    for name, value in overrides.items():
        text = text.replace(f'"@{name}@"', value)
    return text


def bomb(depth: int, opener: str = "[") -> str:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return opener * depth + "1" + closer * depth


def jti_of(token: str) -> str:
    """The jti of a token whose payload may be no JSON a parser takes (read by pattern, not parsed)."""
    part = token.split(".")[1]
    found = re.search(rb'"jti":"([^"]+)"', base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    assert found is not None
    return found[1].decode()


def nonce_count(node: DaemonProcess, jti: str) -> int:
    conn = sqlite3.connect(f"file:{node.home / 'state' / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM nonces WHERE jti = ?", (jti,)).fetchone()[0])
    finally:
        conn.close()


async def send(
    http: aiohttp.ClientSession, path: str, body: str | bytes, content_type: str = "application/jwt"
) -> tuple[int, dict[str, Any]]:
    data = body.encode() if isinstance(body, str) else body
    async with http.post(path, data=data, headers={"Content-Type": content_type}) as resp:
        assert resp.content_type == "application/json", (resp.status, await resp.text())
        return resp.status, orjson.loads(await resp.read())


def refused(status: int, body: dict[str, Any], code: str | None = None) -> dict[str, Any]:
    """Assert a structured 4xx (docs/protocol.md) and return its error object."""
    assert 400 <= status < 500, (status, body)
    err = body["error"]
    assert set(err) == {"code", "domain", "message", "retryable", "details"}, err
    if code is not None:
        assert err["code"] == code, err
    return err


async def healthy(http: aiohttp.ClientSession) -> None:
    async with http.get("/healthz") as resp:
        assert resp.status == 200


# -- D1: depth bombs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", BOMB_DEPTHS)
@pytest.mark.parametrize("opener", ["[", '{"a":'])
@pytest.mark.parametrize("route", ["/v1/quotes", "/v1/jobs", "/v1/jobs/hj_x/cancel"])
async def test_depth_bomb_in_jwt_header_is_a_400(
    http: aiohttp.ClientSession, depth: int, opener: str, route: str
) -> None:
    header = '{"alg":"EdDSA","kid":"a","x":' + bomb(depth, opener) + "}"
    status, body = await send(http, route, raw_token(header, '{"iss":"x"}'))
    err = refused(status, body, "malformed_jwt")
    assert err["details"]["part"] == "header"
    await healthy(http)


@pytest.mark.parametrize("depth", BOMB_DEPTHS)
async def test_depth_bomb_in_jwt_payload_is_a_400(http: aiohttp.ClientSession, depth: int) -> None:
    header = '{"alg":"EdDSA","kid":"did:key:z#z","typ":"JWT"}'
    status, body = await send(http, "/v1/quotes", raw_token(header, '{"job":' + bomb(depth) + "}"))
    assert refused(status, body, "malformed_jwt")["details"]["part"] == "payload"


@pytest.mark.parametrize("depth", BOMB_DEPTHS)
async def test_depth_bomb_in_a_signed_envelope_is_refused_without_a_nonce(
    http: aiohttp.ClientSession, node: DaemonProcess, node_did: str, depth: int
) -> None:
    signer = new_ed25519()
    env = orjson.dumps(make_envelope(f"bomb-{depth}")).decode()
    env = env[:-1] + ',"extra":' + bomb(depth, '{"a":') + "}"
    token = signed_raw(signer, claims_text(signer, node_did, "@job@").replace('"@job@"', env))
    for _ in range(2):  # refused, then refused the same way: the first refusal recorded nothing
        status, body = await send(http, "/v1/quotes", token)
        refused(status, body, "malformed_jwt")
    assert nonce_count(node, jti_of(token)) == 0


@pytest.mark.parametrize("depth", BOMB_DEPTHS)
@pytest.mark.parametrize("field", ["request", "quote", "funding", "other"])
async def test_depth_bomb_in_the_json_wrapper_of_a_submission_is_a_400(
    http: aiohttp.ClientSession, node: DaemonProcess, node_did: str, depth: int, field: str
) -> None:
    signer = new_ed25519()
    token = sign_jwt(signer, request_claims(signer, node_did, extra={"job": make_envelope(f"w-{field}")}))
    wrapper = '{"request":' + orjson.dumps(token).decode()
    body_text = (
        '{"request":' + bomb(depth) + "}" if field == "request" else wrapper + f',"{field}":{bomb(depth)}}}'
    )
    status, body = await send(http, "/v1/jobs", body_text, "application/json")
    err = refused(status, body, "malformed_json")
    assert err["details"]["bound"] == "too_deep"
    assert nonce_count(node, jti_of(token)) == 0


@pytest.mark.parametrize("depth", BOMB_DEPTHS)
async def test_depth_bomb_in_a_receipt_is_a_400(http: aiohttp.ClientSession, depth: int) -> None:
    body_text = '{"receipt":' + bomb(depth, '{"a":') + ',"signature":"0x"}'
    status, body = await send(http, "/v1/jobs/hj_x/receipt", body_text, "application/json")
    assert refused(status, body, "malformed_json")["details"]["bound"] == "too_deep"


# -- D2: integers beyond 64 bits -----------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["iat", "exp", "nbf"])
@pytest.mark.parametrize("value", ["1" + "0" * 30, str(2**64), "-1", "-" + "9" * 40, "9" * 78])
async def test_huge_time_claims_in_an_unsigned_token_are_a_400(
    http: aiohttp.ClientSession, claim: str, value: str
) -> None:
    header = '{"alg":"EdDSA","kid":"did:key:z6Mk#z6Mk","typ":"JWT"}'
    claims: dict[str, Any] = {"iss": "did:key:z6Mk", "aud": "did:key:z6Mk", "iat": 1, "exp": 2}
    claims.update({"jti": "abcdefgh12", claim: "@n@"})
    payload = orjson.dumps(claims).decode().replace('"@n@"', value)
    status, body = await send(http, "/v1/quotes", raw_token(header, payload))
    err = refused(status, body, "malformed_jwt")
    assert err["details"]["claim"] == claim


@pytest.mark.parametrize("digits", [79, 5_000, 100_000])
async def test_integers_longer_than_any_amount_are_refused_at_parse(
    http: aiohttp.ClientSession, digits: int
) -> None:
    header = '{"alg":"EdDSA","kid":"a","n":' + "7" * digits + "}"
    status, body = await send(http, "/v1/quotes", raw_token(header, "{}"))
    assert refused(status, body, "malformed_jwt")["details"]["bound"] == "number_out_of_range"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("limits.cpus", "1" + "0" * 30),
        ("limits.memory_mb", str(2**64)),
        ("payment.chain_id", "9" * 70),
        ("output_spec.bitrate_kbps", str(-(2**70))),
    ],
)
async def test_huge_integers_in_a_signed_envelope_give_a_json_422(
    http: aiohttp.ClientSession, node: DaemonProcess, node_did: str, path: str, value: str
) -> None:
    signer = new_ed25519()
    env = make_envelope(f"big-{path}")
    section, field = path.split(".")
    env[section] = {**env[section], field: "@big@"}
    text = orjson.dumps(env).decode().replace('"@big@"', value)
    token = signed_raw(signer, claims_text(signer, node_did, "@job@").replace('"@job@"', text))
    status, body = await send(http, "/v1/quotes", token)
    err = refused(status, body, "invalid_envelope")
    assert any(p["loc"].endswith(field) for p in err["details"]["problems"]), err
    assert nonce_count(node, jti_of(token)) == 0


# -- D3: floats that overflow --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "code"),
    [
        ("validation.min_duration_seconds", "1e400", "malformed_jwt"),
        ("validation.max_duration_seconds", "-1e400", "malformed_jwt"),
        ("limits.cpus", "1E+999", "malformed_jwt"),
        ("validation.min_duration_seconds", "1e308", "invalid_envelope"),
        ("validation.max_duration_seconds", "86400.5", "invalid_envelope"),
        ("validation.min_duration_seconds", "NaN", "malformed_jwt"),
        ("validation.min_duration_seconds", "Infinity", "malformed_jwt"),
    ],
)
async def test_overflowing_floats_are_refused_and_consume_no_jti(
    http: aiohttp.ClientSession, node: DaemonProcess, node_did: str, path: str, value: str, code: str
) -> None:
    signer = new_ed25519()
    env = make_envelope(f"float-{path}-{value}".replace("+", "p"))
    section, field = path.split(".")
    env[section] = {**env[section], field: "@f@"}
    text = orjson.dumps(env).decode().replace('"@f@"', value)
    token = signed_raw(signer, claims_text(signer, node_did, "@job@").replace('"@job@"', text))
    for route in ("/v1/quotes", "/v1/jobs", "/v1/quotes"):
        status, body = await send(http, route, token)
        refused(status, body, code)
    assert nonce_count(node, jti_of(token)) == 0
    await healthy(http)


# -- D4: event positions -------------------------------------------------------------------------------


async def _a_job(http: aiohttp.ClientSession, node_did: str) -> str:
    signer = new_ed25519()
    env = make_envelope("events", limits={"cpus": 0.01, "memory_mb": 64})  # many fit this test node
    token = sign_jwt(signer, request_claims(signer, node_did, extra={"job": env}))
    status, body = await send(http, "/v1/jobs", token)
    assert status == 201, body
    return str(body["job"]["id"])


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("after=99999999999999999999", {}),
        ("after=9223372036854775808", {}),
        ("after=-1", {}),
        ("after=1e3", {}),
        ("after=%20", {}),
        ("after=0x10", {}),
        ("", {"Last-Event-ID": "99999999999999999999"}),
        ("", {"Last-Event-ID": "-5"}),
        ("follow=maybe", {}),
        ("follow=TRUE", {}),
    ],
)
async def test_out_of_range_event_positions_are_a_400(
    http: aiohttp.ClientSession, node_did: str, query: str, headers: dict[str, str]
) -> None:
    job = await _a_job(http, node_did)
    async with http.get(f"/v1/jobs/{job}/events?{query}", headers=headers) as resp:
        assert resp.status == 400
        refused(resp.status, orjson.loads(await resp.read()), "invalid_query")


async def test_the_last_event_position_is_valid_and_empty(http: aiohttp.ClientSession, node_did: str) -> None:
    job = await _a_job(http, node_did)
    async with http.get(f"/v1/jobs/{job}/events?after={2**63 - 1}&follow=false") as resp:
        assert resp.status == 200
        assert b"data:" not in await resp.read()
    async with http.get(f"/v1/jobs/{job}/events?follow=false") as resp:
        assert resp.status == 200
        assert b"event: transition" in await resp.read()


# -- D9: refused cancels leave no trace ----------------------------------------------------------------


async def test_refused_cancels_record_no_nonce(
    http: aiohttp.ClientSession, node: DaemonProcess, node_did: str
) -> None:
    job = await _a_job(http, node_did)
    stranger = new_ed25519()
    not_owner = sign_jwt(stranger, request_claims(stranger, node_did, extra={"cancel": job}))
    no_such = sign_jwt(stranger, request_claims(stranger, node_did, extra={"cancel": "hj_nosuchjob"}))
    for _ in range(2):  # the same token, refused the same way each time (never as a replay)
        status, body = await send(http, f"/v1/jobs/{job}/cancel", not_owner)
        assert (status, refused(status, body)["code"]) == (403, "not_job_owner")
        status, body = await send(http, "/v1/jobs/hj_nosuchjob/cancel", no_such)
        assert (status, refused(status, body)["code"]) == (404, "job_not_found")
    assert nonce_count(node, jti_of(not_owner)) == 0
    assert nonce_count(node, jti_of(no_such)) == 0
    async with http.get(f"/v1/jobs/{job}") as resp:
        assert (await resp.json())["job"]["state"] == "accepted"


# -- D8: 405 names what is allowed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("DELETE", "/v1/quotes", "POST"), ("PUT", "/v1/jobs/hj_x", "GET"), ("POST", "/healthz", "GET")],
)
async def test_405_carries_allow(http: aiohttp.ClientSession, method: str, path: str, allowed: str) -> None:
    async with http.request(method, path) as resp:
        assert resp.status == 405
        assert allowed in resp.headers["Allow"]
        err = refused(resp.status, orjson.loads(await resp.read()), "method_not_allowed")
        assert allowed in err["details"]["allowed"]


# -- wrong types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "[]",
        '"a.b.c"',
        "5",
        "null",
        '{"request": 5}',
        '{"request": ["a.b.c"]}',
        '{"request": null}',
        '{"request": {"jwt": "a.b.c"}}',
        '{"quote": "a.b.c"}',
        '{"request": "a.b.c", "quote": 5}',
        '{"request": "a.b.c", "quote": ["x"]}',
    ],
)
async def test_wrong_types_in_the_json_wrapper_are_refused(http: aiohttp.ClientSession, body: str) -> None:
    status, answer = await send(http, "/v1/jobs", body, "application/json")
    refused(status, answer)


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("iss", "5"),
        ("iss", "null"),
        ("aud", "{}"),
        ("aud", "[]"),
        ("aud", "[1, 2]"),
        ("jti", "[]"),
        ("jti", "12345678"),
        ("iat", '"1700000000"'),
        ("iat", "true"),
        ("iat", "1.5"),
        ("exp", "null"),
        ("job", '"an envelope"'),
        ("job", "[]"),
        ("job", "5"),
        ("nbf", '"soon"'),
    ],
)
async def test_wrong_types_in_signed_claims_are_refused_without_a_nonce(
    http: aiohttp.ClientSession, node: DaemonProcess, node_did: str, claim: str, value: str
) -> None:
    signer = new_ed25519()
    token = signed_raw(signer, claims_text(signer, node_did, make_envelope(f"t-{claim}"), {claim: value}))
    for route in ("/v1/quotes", "/v1/jobs", f"/v1/jobs/{NO_JOB}/cancel"):
        status, body = await send(http, route, token)
        refused(status, body)
    if claim != "jti":
        assert nonce_count(node, jti_of(token)) == 0


@pytest.mark.parametrize(
    "header",
    [
        '{"alg":5,"kid":"a"}',
        '{"alg":"EdDSA","kid":5}',
        '{"alg":"EdDSA","kid":""}',
        '{"alg":"EdDSA","kid":["a"]}',
        '{"alg":"none","kid":"a"}',
        '{"alg":"EdDSA","kid":"a","crit":["b64"]}',
        "[]",
        '"EdDSA"',
    ],
)
async def test_wrong_types_in_the_jwt_header_are_a_400(http: aiohttp.ClientSession, header: str) -> None:
    status, body = await send(http, "/v1/quotes", raw_token(header, '{"iss":"x"}'))
    assert status == 400
    refused(status, body)


# -- slow bodies ---------------------------------------------------------------------------------------


async def _trickle(port: int, head: bytes, pieces: int) -> tuple[bytes, float]:
    """Send ``head``, then one body byte every 0.3 s; return the status line the node answers with and
    how long after the head it came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        started = time.monotonic()

        async def drip() -> None:
            for _ in range(pieces):
                await asyncio.sleep(0.3)
                writer.write(b"a")
                await writer.drain()

        dripping = asyncio.create_task(drip())
        try:
            line = await asyncio.wait_for(reader.readline(), 15)
        finally:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await dripping
        return line, time.monotonic() - started
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("route", ["/v1/quotes", "/v1/jobs", f"/v1/jobs/{NO_JOB}/receipt"])
async def test_a_trickled_signed_body_is_cut_with_408(
    http: aiohttp.ClientSession, node: DaemonProcess, route: str
) -> None:
    content_type = "application/json" if route.endswith("receipt") else "application/jwt"
    head = f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 5000\r\n\r\n"
    answered, _ = await asyncio.gather(_trickle(node.port, head.encode(), 40), healthy(http))
    line, elapsed = answered
    assert b" 408 " in line, line
    assert BODY_TIMEOUT_SECONDS <= elapsed < BODY_TIMEOUT_SECONDS + 5


async def test_a_stalled_blob_upload_is_cut_with_408(
    http: aiohttp.ClientSession, node: DaemonProcess
) -> None:
    head = b"PUT /v1/blobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"b" * 1000
    line, elapsed = await _trickle(node.port, head, 0)  # some bytes, then nothing more
    assert b" 408 " in line, line
    assert BODY_TIMEOUT_SECONDS <= elapsed < BODY_TIMEOUT_SECONDS + 5
    await healthy(http)


async def test_a_slow_but_steady_blob_upload_is_taken(http: aiohttp.ClientSession) -> None:
    async def steady() -> AsyncIterator[bytes]:
        for _ in range(6):  # 1.8 s in all, more than the stall bound, never a pause as long
            yield b"c" * 100
            await asyncio.sleep(0.3)

    async with http.put("/v1/blobs", data=steady()) as resp:
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["size"] == 600


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("POST", "/v1/quotes"),
        ("POST", "/v1/jobs"),
        ("PUT", "/v1/blobs"),
        ("POST", f"/v1/jobs/{NO_JOB}/receipt"),
    ],
)
async def test_a_client_leaving_mid_body_is_no_error(
    http: aiohttp.ClientSession, node: DaemonProcess, method: str, route: str
) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(f"{method} {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode() + b"x" * 10)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.3)
    await healthy(http)
    log = node.log.read_text()
    assert "unhandled error" not in log and "Traceback" not in log


# -- the error path itself -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        '{"iss":"\\ud800","aud":"x","iat":1,"exp":2,"jti":"abcdefgh"}',
        '{"iss":"did:key:z6Mk","aud":"\\udfff\\ud800","iat":1,"exp":2,"jti":"abcdefgh"}',
        '{"iss":"did:key:z6Mk","aud":"x","iat":1,"exp":2,"jti":"\\ud83d"}',
    ],
)
async def test_lone_surrogates_never_break_the_error_answer(
    http: aiohttp.ClientSession, payload: str
) -> None:
    header = '{"alg":"EdDSA","kid":"did:key:z6Mk#z6Mk","typ":"JWT"}'
    status, body = await send(http, "/v1/quotes", raw_token(header, payload))
    assert refused(status, body, "malformed_jwt")["details"]["bound"] == "bad_unicode"


async def test_every_refusal_was_counted_and_the_daemon_stayed_up(http: aiohttp.ClientSession) -> None:
    await healthy(http)
    async with http.get("/metrics") as resp:
        text = await resp.text()
    assert 'hearth_http_requests_total{route="/v1/quotes",status="500"}' not in text
    assert 'status="500"' not in text
