"""The validator service's front door, against the real process: hostile notices are structured 4xx with
no side effect; a genuine notice is recorded once, a second one for the same job is answered with its
stored state, a replayed token is refused, and a node that cannot be reached is retried with backoff.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from payments.jwt import b64url_encode, request_claims, sign_jwt
from payments.keys import EthSigner, Signer, new_ed25519, new_eth, save_key
from tests.conftest import free_port
from tests.promtext import sample
from tests.validator.vservice import ValidatorProcess

CLOSED_NODE = "http://127.0.0.1:9"  # discard port: nothing listens


@pytest.fixture(scope="module")
def validator_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[EthSigner, Path]:
    signer = new_eth(31337)
    path = tmp_path_factory.mktemp("vkey") / "validator.key"
    save_key(signer, path)
    return signer, path


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, validator_key: tuple[EthSigner, Path]
) -> Iterator[ValidatorProcess]:
    vp = ValidatorProcess(validator_key[1], tmp_path_factory.mktemp("vhome"), free_port())
    vp.start()
    try:
        yield vp
    finally:
        vp.stop()


def notice(issuer: Signer, aud: str, **claims: Any) -> str:
    extra: dict[str, Any] = {"job": "hj_0123456789abcdef", "node": CLOSED_NODE}
    extra.update(claims)
    return sign_jwt(issuer, request_claims(issuer, aud, extra=extra))


async def post(url: str, body: bytes, content_type: str = "application/jwt") -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/validations", data=body, headers={"Content-Type": content_type}) as resp,
    ):
        return resp.status, json.loads(await resp.read())


def jobs(service: ValidatorProcess) -> dict[str, int]:
    return dict(service.healthz()["jobs"])


def metric(service: ValidatorProcess, name: str, **labels: str) -> float:
    return sample(service.metrics(), name, **labels) or 0.0


def forged(node: Signer, impostor: Signer, aud: str) -> str:
    """A notice naming ``node`` as its issuer, signed by ``impostor`` over the same header and claims."""
    signing_input = notice(node, aud).rsplit(".", 1)[0]
    return signing_input + "." + b64url_encode(impostor.sign(signing_input.encode()))


def depth_bomb(node: Signer, aud: str) -> str:
    """A well-signed notice, under the size cap, whose payload nests 3,000 arrays (the limit is 32)."""
    claims = request_claims(node, aud, extra={"job": "hj_bomb12345", "node": CLOSED_NODE})
    text = json.dumps(claims)[:-1] + ', "x": ' + "[" * 3_000 + "]" * 3_000 + "}"
    header = sign_jwt(node, claims).split(".")[0]
    signing_input = header + "." + b64url_encode(text.encode())
    return signing_input + "." + b64url_encode(node.sign(signing_input.encode()))


async def test_hostile_notices_are_structured_4xx_and_leave_no_trace(
    service: ValidatorProcess, validator_key: tuple[EthSigner, Path]
) -> None:
    signer, _ = validator_key
    node, impostor = new_ed25519(), new_ed25519()
    before = jobs(service)
    cases: list[tuple[str, bytes, str, int, str]] = [
        (
            "foreign signature",
            forged(node, impostor, signer.did).encode(),
            "application/jwt",
            401,
            "bad_signature",
        ),
        ("wrong aud", notice(node, new_eth(1).did).encode(), "application/jwt", 403, "wrong_audience"),
        ("not a JWT", b"hello", "application/jwt", 400, "malformed_jwt"),
        ("non-ASCII", "é".encode(), "application/jwt", 400, "malformed_jwt"),
        ("JSON body", b"{}", "application/json", 415, "unsupported_media_type"),
        ("oversized", b"a" * 40_000, "application/jwt", 413, "body_too_large"),
        ("depth bomb", depth_bomb(node, signer.did).encode(), "application/jwt", 400, "malformed_jwt"),
        (
            "job not a string",
            notice(node, signer.did, job=12345).encode(),
            "application/jwt",
            400,
            "invalid_notice",
        ),
        (
            "job with a slash",
            notice(node, signer.did, job="../x").encode(),
            "application/jwt",
            400,
            "invalid_notice",
        ),
        (
            "node not a URL",
            notice(node, signer.did, node=["x"]).encode(),
            "application/jwt",
            400,
            "invalid_notice",
        ),
        (
            "node not http",
            notice(node, signer.did, node="file:///etc").encode(),
            "application/jwt",
            400,
            "invalid_notice",
        ),
        (
            "expired",
            sign_jwt(
                node,
                request_claims(
                    node,
                    signer.did,
                    now=time.time() - 7200,
                    extra={"job": "hj_old12345", "node": CLOSED_NODE},
                ),
            ).encode(),
            "application/jwt",
            401,
            "expired",
        ),
    ]
    for name, body, ctype, status, code in cases:
        got, doc = await post(service.url, body, ctype)
        assert (got, doc["error"]["code"]) == (status, code), (name, doc)
        assert set(doc["error"]) >= {"code", "domain", "message", "retryable", "details"}, name
    async with aiohttp.ClientSession() as s, s.get(service.url + "/v1/nothing") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    async with aiohttp.ClientSession() as s, s.get(service.url + "/v1/validations") as resp:
        assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"
    assert jobs(service) == before  # nothing recorded
    assert metric(service, "hearth_validator_notices_total", outcome="refused") >= len(cases)
    assert metric(service, "hearth_validator_notices_total", outcome="accepted") == 0


async def test_a_slow_body_is_cut_off_with_408(service: ValidatorProcess) -> None:
    host, port = "127.0.0.1", service.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/validations HTTP/1.1\r\nHost: x\r\nContent-Type: application/jwt\r\n"
        b"Content-Length: 1000\r\n\r\nabc"
    )
    await writer.drain()
    t0 = time.monotonic()
    head = await asyncio.wait_for(reader.read(4096), 30)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    assert b'"body_timeout"' in head or b"body_timeout" in await _rest(reader)
    assert time.monotonic() - t0 < 20


async def _rest(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(4096), 2)
    except (TimeoutError, ConnectionError):
        return b""


async def test_a_notice_is_recorded_once_replays_are_refused_and_an_unreachable_node_is_retried(
    service: ValidatorProcess, validator_key: tuple[EthSigner, Path]
) -> None:
    signer, _ = validator_key
    node = new_ed25519()
    first = notice(node, signer.did, job="hj_retry000001")
    status, doc = await post(service.url, first.encode())
    assert status == 202 and doc["state"] == "accepted" and doc["node"] == node.did, doc
    status, doc = await post(service.url, first.encode())  # the same token again
    assert status == 409 and doc["error"]["code"] == "replayed_jti", doc
    status, doc = await post(service.url, notice(node, signer.did, job="hj_retry000001").encode())
    assert status == 200 and doc["job"] == "hj_retry000001", doc  # a fresh notice: the stored state
    assert metric(service, "hearth_validator_notices_total", outcome="accepted") == 1
    assert metric(service, "hearth_validator_notices_total", outcome="known") == 1
    deadline = time.monotonic() + 20
    while metric(service, "hearth_validator_retries_total") < 2:  # the node at the discard port never answers
        assert time.monotonic() < deadline, service.log.read_text()[-3000:]
        await asyncio.sleep(0.2)
    status, doc = await post(service.url, notice(node, signer.did, job="hj_retry000001").encode())
    assert (
        status == 200
        and doc["state"] in ("accepted", "validating")
        and doc["error"]["code"] == "node_unreachable"
    )
    assert any(line.get("job") == "hj_retry000001" and line.get("trace_id") for line in service.log_lines())


def test_a_node_on_a_private_address_is_refused_without_the_flag(
    tmp_path: Path, validator_key: tuple[EthSigner, Path]
) -> None:
    """Without --allow-private-addresses a notice may not aim the validator at the operator's own network."""
    import subprocess
    import sys

    from tests.conftest import REPO

    signer, key = validator_key
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "validator", "run", "--home", str(tmp_path), "--key", str(key),
         "--port", str(port)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        vp = ValidatorProcess(key, tmp_path, port)
        deadline = time.monotonic() + 30
        while True:
            try:
                vp.healthz()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        status, doc = asyncio.run(post(vp.url, notice(new_ed25519(), signer.did).encode()))
        assert status == 403 and doc["error"]["code"] == "endpoint_not_allowed", doc
        assert doc["error"]["details"]["reason"] == "loopback"
        assert jobs(vp) == {}
    finally:
        proc.terminate()
        proc.wait(10)
