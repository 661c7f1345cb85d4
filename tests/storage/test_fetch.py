"""Fetching inputs: ipfs:// from real gateways (honest, tampering, down), https:// over TLS, local CIDs,
and the address policy on every connection an input makes (loopback only: 127.0.0.1 plays the private
network the policy guards, 127.0.0.2 an allowed origin, through the operator's ``allow_networks``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.config import StorageSection
from core.errors import RequestError, StorageError
from node.http_errors import status_of
from storage import CID, Blockstore, export_tree, fetch_car, fetch_input, import_bytes, import_path, write_car
from storage._blockstore import TEMP_PREFIX
from storage._car import encode_header, section_prefix
from tests.storage.conftest import MIB, gateway_server, random_bytes
from tests.storage.netfixtures import (
    closed_port,
    listening,
    make_certificate,
    refused_hosts,
    server_context,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def remote(tmp_path: Path, sample_tree: Path) -> tuple[Blockstore, CID]:
    """The "rest of the network": a second node's store holding the sample tree."""
    store = Blockstore.open(tmp_path / "remote-blocks")
    return store, import_path(sample_tree, store).cid


@asynccontextmanager
async def serving(
    handler: Handler, *, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host=host)
    await server.start_server(ssl=tls)
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def _car_bytes(store: Blockstore, root: CID) -> bytes:
    buf = io.BytesIO()
    write_car(store, root, buf)
    return buf.getvalue()


def _tampering(car: bytes, needle: bytes) -> Handler:
    """A gateway that answers every request with ``car``, one byte of ``needle`` flipped."""
    at = car.index(needle)
    bad = bytearray(car)
    bad[at] ^= 0xFF

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bytes(bad), content_type="application/vnd.ipld.car")

    return handler


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{closed_port()}"


def _config(*gateways: str, max_input_mb: int = 64, **storage: Any) -> StorageSection:
    return StorageSection(
        gateways=list(gateways), max_input_mb=max_input_mb, **{"connect_timeout_seconds": 5, **storage}
    )


# https:// origins in these tests listen on loopback, which the address policy refuses: the operator's
# allow list lets 127.0.0.1 through where a test is about something else.
LOOPBACK_ALLOWED = {"allow_networks": ["127.0.0.1/32"]}


async def test_ipfs_file_is_fetched_verified_and_kept(
    store: Blockstore, remote: tuple[Blockstore, CID], sample_tree: Path, tmp_path: Path
) -> None:
    remote_store, _ = remote
    big = import_path(sample_tree / "big.bin").cid
    async with gateway_server(remote_store) as url:
        got = await fetch_input(f"ipfs://{big}", tmp_path / "in.bin", store=store, config=_config(url))
    expected = (sample_tree / "big.bin").read_bytes()
    assert got.path.read_bytes() == expected
    assert (got.size, got.sha256, got.cid, got.source) == (
        len(expected),
        hashlib.sha256(expected).hexdigest(),
        big,
        url,
    )
    # the blocks are now local: a second fetch needs no gateway at all
    again = await fetch_input(f"ipfs://{big}", tmp_path / "again.bin", store=store, config=_config())
    assert again.source == "local" and again.path.read_bytes() == expected


async def test_ipfs_path_into_a_directory(
    store: Blockstore, remote: tuple[Blockstore, CID], sample_tree: Path, tmp_path: Path
) -> None:
    remote_store, root = remote
    async with gateway_server(remote_store) as url:
        got = await fetch_input(
            f"ipfs://{root}/hls/720p/seg0.ts", tmp_path / "seg.ts", store=store, config=_config(url)
        )
    assert got.path.read_bytes() == (sample_tree / "hls" / "720p" / "seg0.ts").read_bytes()
    assert not store.has(import_path(sample_tree / "big.bin").cid)  # only the path and the file came


async def test_tampered_block_is_rejected_and_nothing_kept(
    store: Blockstore, remote: tuple[Blockstore, CID], sample_tree: Path, tmp_path: Path
) -> None:
    remote_store, _ = remote
    big = import_path(sample_tree / "big.bin").cid
    car = _car_bytes(remote_store, big)
    tamper = _tampering(car, (sample_tree / "big.bin").read_bytes()[MIB + 10 : MIB + 42])
    async with serving(tamper) as url:
        with pytest.raises(StorageError) as info:
            await fetch_input(f"ipfs://{big}", tmp_path / "in.bin", store=store, config=_config(url))
    assert info.value.code == "cid_mismatch"
    assert not info.value.retryable
    assert not (tmp_path / "in.bin").exists()
    assert store.stats().blocks == 0
    assert [p for p in store.root.rglob(f"{TEMP_PREFIX}*")] == []


async def test_tampering_gateway_then_honest_one(
    store: Blockstore, remote: tuple[Blockstore, CID], sample_tree: Path, tmp_path: Path
) -> None:
    remote_store, _ = remote
    big = import_path(sample_tree / "big.bin").cid
    tamper = _tampering(_car_bytes(remote_store, big), (sample_tree / "big.bin").read_bytes()[:32])
    async with serving(tamper) as bad, gateway_server(remote_store) as good:
        got = await fetch_input(f"ipfs://{big}", tmp_path / "in.bin", store=store, config=_config(bad, good))
    assert got.source == good
    assert got.path.read_bytes() == (sample_tree / "big.bin").read_bytes()


async def test_unrelated_blocks_are_refused(store: Blockstore, tmp_path: Path) -> None:
    wanted = import_bytes(random_bytes(1000, seed=20)).cid
    junk = random_bytes(5000, seed=21)
    junk_cid = CID.for_block(0x55, junk)

    async def stuffing(request: web.Request) -> web.StreamResponse:
        body = encode_header([wanted]) + section_prefix(junk_cid, len(junk)) + junk
        return web.Response(body=body, content_type="application/vnd.ipld.car")

    async with serving(stuffing) as url:
        with pytest.raises(StorageError) as info:
            await fetch_input(f"ipfs://{wanted}", tmp_path / "in", store=store, config=_config(url))
    assert info.value.code == "unexpected_block"
    assert not store.has(junk_cid)


# -- fetch_car: one DAG from one gateway, as the validator fetches an artifact -----------------------------


async def test_fetch_car_brings_a_whole_tree_verified(
    store: Blockstore, remote: tuple[Blockstore, CID], sample_tree: Path, tmp_path: Path
) -> None:
    remote_store, root = remote
    car = _car_bytes(remote_store, root)
    async with gateway_server(remote_store) as url, aiohttp.ClientSession() as session:
        read = await fetch_car(session, url, root, store=store, max_bytes=4 * MIB)
    assert read == len(car)
    written = export_tree(store, root, tmp_path / "out", max_bytes=4 * MIB, max_files=10, max_depth=4)
    assert import_path(tmp_path / "out").cid == root
    assert {f.path.relative_to(tmp_path / "out").as_posix() for f in written} == {
        p.relative_to(sample_tree).as_posix() for p in sample_tree.rglob("*") if p.is_file()
    }


async def test_fetch_car_refuses_a_block_outside_the_dag_after_a_whole_one(
    store: Blockstore, remote: tuple[Blockstore, CID]
) -> None:
    remote_store, root = remote
    junk = random_bytes(5000, seed=23)
    junk_cid = CID.for_block(0x55, junk)
    stuffed = _car_bytes(remote_store, root) + section_prefix(junk_cid, len(junk)) + junk

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=stuffed, content_type="application/vnd.ipld.car")

    async with serving(handler) as url, aiohttp.ClientSession() as session:
        with pytest.raises(StorageError) as info:
            await fetch_car(session, url, root, store=store, max_bytes=4 * MIB)
    assert (info.value.code, info.value.details) == ("unexpected_block", {"cid": str(junk_cid)})
    assert store.stats().blocks == 0  # every block of the DAG verified, and still none is kept


async def test_fetch_car_refuses_a_car_whose_roots_are_another_dag_before_any_block(
    store: Blockstore, remote: tuple[Blockstore, CID], sample_tree: Path
) -> None:
    remote_store, root = remote
    wanted = import_path(sample_tree / "index.m3u8").cid
    body = _car_bytes(remote_store, root)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/vnd.ipld.car")

    async with serving(handler) as url, aiohttp.ClientSession() as session:
        with pytest.raises(StorageError) as info:
            await fetch_car(session, url, wanted, store=store, max_bytes=4 * MIB)
    assert info.value.code == "car_root_mismatch"
    assert info.value.details == {"cid": str(wanted), "roots": [str(root)]}


async def test_fetch_car_bounds_the_download_and_says_what_the_gateway_answered(
    store: Blockstore, remote: tuple[Blockstore, CID], sample_tree: Path
) -> None:
    remote_store, _ = remote
    big = import_path(sample_tree / "big.bin").cid
    absent = CID.for_block(0x55, b"on no gateway")
    async with gateway_server(remote_store) as url, aiohttp.ClientSession() as session:
        with pytest.raises(StorageError) as too_large:
            await fetch_car(session, url, big, store=store, max_bytes=MIB)
        with pytest.raises(StorageError) as not_found:
            await fetch_car(session, url, absent, store=store, max_bytes=MIB)
    assert (too_large.value.code, too_large.value.details) == ("input_too_large", {"max_bytes": MIB})
    assert not_found.value.code == "input_not_found" and not_found.value.details["status"] == 404
    assert store.stats().blocks == 0


async def test_unreachable_gateway_is_retryable(store: Blockstore, tmp_path: Path) -> None:
    cid = import_bytes(b"somewhere else").cid
    with pytest.raises(StorageError) as info:
        await fetch_input(f"ipfs://{cid}", tmp_path / "in", store=store, config=_config(_closed_port_url()))
    assert info.value.retryable
    assert info.value.code == "gateways_unavailable"
    assert info.value.details["attempts"][0]["code"] == "gateway_unreachable"


async def test_input_over_the_cap_is_refused(
    store: Blockstore, remote: tuple[Blockstore, CID], sample_tree: Path, tmp_path: Path
) -> None:
    remote_store, _ = remote
    big = import_path(sample_tree / "big.bin").cid  # a little over 2 MiB
    async with gateway_server(remote_store) as url:
        with pytest.raises(StorageError) as info:
            await fetch_input(
                f"ipfs://{big}", tmp_path / "in", store=store, config=_config(url, max_input_mb=1)
            )
    assert info.value.code == "input_too_large"
    assert not info.value.retryable
    assert store.stats().blocks == 0


async def test_bare_cid_is_a_local_blob(store: Blockstore, tmp_path: Path) -> None:
    data = random_bytes(MIB + 7, seed=22)
    cid = import_bytes(data, store).cid
    got = await fetch_input(str(cid), tmp_path / "blob", store=store, config=_config())
    assert got.path.read_bytes() == data and got.source == "local"
    other = import_bytes(b"not here").cid
    with pytest.raises(StorageError) as info:
        await fetch_input(str(other), tmp_path / "x", store=store, config=_config())
    assert info.value.code == "blob_not_found"


# -- https:// -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts over a fresh self-signed certificate for 127.0.0.1 and 127.0.0.2."""
    cert, key = make_certificate(tmp_path_factory.mktemp("tls"))
    return server_context(cert, key), ssl.create_default_context(cafile=str(cert))


def _listing(directory: Path) -> list[Path]:
    return list(directory.iterdir())


def _origin(data: bytes) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=data, content_type="application/octet-stream")

    return handler


async def test_https_with_the_right_sha256(
    store: Blockstore, tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    data = random_bytes(2 * MIB + 3, seed=23)
    server_ctx, client_ctx = tls
    async with serving(_origin(data), tls=server_ctx) as url:
        assert url.startswith("https://")
        got = await fetch_input(
            f"{url}/media/clip.mp4",
            tmp_path / "clip.mp4",
            store=store,
            config=_config(**LOOPBACK_ALLOWED),
            sha256=hashlib.sha256(data).hexdigest(),
            ssl_context=client_ctx,
        )
    assert got.path.read_bytes() == data
    assert got.cid == import_bytes(data).cid and store.has(got.cid)


async def test_https_with_a_wrong_sha256(
    store: Blockstore, tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    server_ctx, client_ctx = tls
    async with serving(_origin(b"what the server has"), tls=server_ctx) as url:
        with pytest.raises(StorageError) as info:
            await fetch_input(
                f"{url}/clip.mp4",
                tmp_path / "clip.mp4",
                store=store,
                config=_config(**LOOPBACK_ALLOWED),
                sha256=hashlib.sha256(b"what the requester expected").hexdigest(),
                ssl_context=client_ctx,
            )
    assert info.value.code == "sha256_mismatch"
    assert not info.value.retryable
    assert _listing(tmp_path) == [store.root]  # neither the file nor a partial download is left


async def test_https_over_the_cap_is_refused(
    store: Blockstore, tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    data = random_bytes(MIB + 1, seed=24)
    server_ctx, client_ctx = tls
    async with serving(_origin(data), tls=server_ctx) as url:
        with pytest.raises(StorageError) as info:
            await fetch_input(
                f"{url}/big",
                tmp_path / "big",
                store=store,
                config=_config(max_input_mb=1, **LOOPBACK_ALLOWED),
                sha256=hashlib.sha256(data).hexdigest(),
                ssl_context=client_ctx,
            )
    assert info.value.code == "input_too_large"


async def test_https_certificate_is_checked_by_default(
    store: Blockstore, tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    server_ctx, _ = tls
    async with serving(_origin(b"x"), tls=server_ctx) as url:
        with pytest.raises(StorageError) as info:
            await fetch_input(
                f"{url}/x",
                tmp_path / "x",
                store=store,
                config=_config(**LOOPBACK_ALLOWED),
                sha256=hashlib.sha256(b"x").hexdigest(),
            )
    assert info.value.code == "input_unreachable"


async def test_https_needs_a_sha256_and_http_is_refused(store: Blockstore, tmp_path: Path) -> None:
    with pytest.raises(RequestError) as info:
        await fetch_input("https://example.invalid/x", tmp_path / "x", store=store, config=_config())
    assert info.value.code == "input_sha256_required"
    with pytest.raises(RequestError) as info:
        await fetch_input(
            "http://example.invalid/x", tmp_path / "x", store=store, config=_config(), sha256="0" * 64
        )
    assert info.value.code == "unsupported_scheme"


# -- the address policy ----------------------------------------------------------------------------------

SHA = "0" * 64  # never reached: every fetch below ends before a byte of content arrives


async def _refusal(uri: str, tmp_path: Path, store: Blockstore, config: StorageSection, **kw: Any) -> Any:
    with pytest.raises(StorageError) as info:
        await fetch_input(uri, tmp_path / "in", store=store, config=config, sha256=SHA, **kw)
    return info.value


async def test_https_inputs_at_private_addresses_are_refused_before_any_connection(
    store: Blockstore, tmp_path: Path
) -> None:
    async with listening("127.0.0.1") as v4, listening("::1") as v6:
        for host in refused_hosts(v4.port, v6.port):
            error = await _refusal(f"https://{host}/clip.mp4", tmp_path, store, _config())
            assert (error.code, status_of(error), error.retryable) == ("input_not_allowed", 403, False), host
            assert error.details == {}, host  # nothing that differs with the address or the port
        assert (v4.connections, v6.connections) == (0, 0)


async def test_a_redirect_to_a_private_address_is_refused_before_it_is_followed(
    store: Blockstore, tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    server_ctx, client_ctx = tls
    async with listening("127.0.0.1") as target, listening("::1") as target6:
        hops: list[str] = []
        locations = [f"https://{h}/x" for h in refused_hosts(target.port, target6.port)]

        async def redirect(request: web.Request) -> web.StreamResponse:
            hops.append(request.path)
            raise web.HTTPFound(locations[int(request.path.strip("/"))])

        async with serving(redirect, tls=server_ctx, host="127.0.0.2") as origin:
            config = _config(allow_networks=["127.0.0.2/32"])
            for n in range(len(locations)):
                error = await _refusal(f"{origin}/{n}", tmp_path, store, config, ssl_context=client_ctx)
                assert error.code == "input_not_allowed", locations[n]
        assert len(hops) == len(locations)  # the allowed origin was asked each time, the targets never
        assert (target.connections, target6.connections) == (0, 0)


async def test_redirects_are_followed_within_the_bound_and_over_https_only(
    store: Blockstore, tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    data = random_bytes(4096, seed=25)
    server_ctx, client_ctx = tls

    async def chain(request: web.Request) -> web.StreamResponse:
        step = request.path.strip("/")
        if step.isdigit() and int(step) > 0:
            raise web.HTTPTemporaryRedirect(f"/{int(step) - 1}")  # relative: the same origin
        if step == "plain":
            raise web.HTTPFound(f"http://127.0.0.2:{request.url.port}/0")
        return web.Response(body=data)

    async with serving(chain, tls=server_ctx, host="127.0.0.2") as origin:
        config = _config(allow_networks=["127.0.0.2/32"], max_redirects=3)
        got = await fetch_input(
            f"{origin}/3",
            tmp_path / "ok",
            store=store,
            config=config,
            sha256=hashlib.sha256(data).hexdigest(),
            ssl_context=client_ctx,
        )
        assert got.path.read_bytes() == data
        too_many = await _refusal(f"{origin}/4", tmp_path, store, config, ssl_context=client_ctx)
        downgrade = await _refusal(f"{origin}/plain", tmp_path, store, config, ssl_context=client_ctx)
    assert (too_many.code, too_many.retryable) == ("too_many_redirects", False)
    assert (downgrade.code, status_of(downgrade)) == ("input_not_allowed", 403)


async def test_connection_failures_all_read_the_same(
    store: Blockstore, tls: tuple[ssl.SSLContext, ssl.SSLContext], tmp_path: Path
) -> None:
    """Closed port, a port that hangs up, one that never answers, a certificate not trusted: one answer.

    That is what keeps a job's failure from telling a closed port from an open one.
    """
    server_ctx, _ = tls
    held: list[asyncio.StreamWriter] = []  # accepted, never answered (closed at the end)
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.2", 0)
    silent_port = int(silent.sockets[0].getsockname()[1])
    config = _config(allow_networks=["127.0.0.2/32"], connect_timeout_seconds=0.5, read_timeout_seconds=0.5)
    try:
        async with (
            listening("127.0.0.2") as hangs_up,
            serving(_origin(b"x"), tls=server_ctx, host="127.0.0.2") as tls_url,
        ):
            uris = [
                f"https://127.0.0.2:{closed_port('127.0.0.2')}/x",
                f"https://127.0.0.2:{hangs_up.port}/x",
                f"https://127.0.0.2:{silent_port}/x",
                f"{tls_url}/x",  # its certificate is not in the system's trust store
            ]
            errors = [await _refusal(uri, tmp_path, store, config) for uri in uris]
        assert hangs_up.connections >= 1  # the open port really was reached
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()
    shapes = {str(e.to_dict()) for e in errors}
    assert len(shapes) == 1, shapes
    assert errors[0].code == "input_unreachable" and errors[0].retryable and errors[0].details == {}


async def test_gateways_are_trusted_as_configured_but_their_redirects_are_not_followed(
    store: Blockstore, remote: tuple[Blockstore, CID], sample_tree: Path, tmp_path: Path
) -> None:
    remote_store, _ = remote
    big = import_path(sample_tree / "big.bin").cid
    async with listening("127.0.0.1") as target:
        asked: list[str] = []

        async def redirecting(request: web.Request) -> web.StreamResponse:
            asked.append(request.path)
            raise web.HTTPFound(f"http://127.0.0.1:{target.port}{request.path_qs}")

        # the operator's loopback gateway (127.0.0.1, as a local Kubo) serves without any allowance
        async with serving(redirecting, host="127.0.0.2") as bad, gateway_server(remote_store) as good:
            with pytest.raises(StorageError) as info:
                await fetch_input(f"ipfs://{big}", tmp_path / "x", store=store, config=_config(bad))
            got = await fetch_input(f"ipfs://{big}", tmp_path / "in", store=store, config=_config(bad, good))
    assert info.value.code == "gateways_unavailable"
    assert info.value.details["attempts"][0]["code"] == "gateway_bad_response"
    assert got.source == good and got.path.read_bytes() == (sample_tree / "big.bin").read_bytes()
    assert len(asked) == 2 and target.connections == 0
