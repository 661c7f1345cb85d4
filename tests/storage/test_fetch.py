"""Fetching inputs: ipfs:// from real gateways (honest, tampering, down), https:// over TLS, local CIDs."""

from __future__ import annotations

import hashlib
import io
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from node.config import StorageSection
from node.errors import RequestError, StorageError
from storage import CID, Blockstore, fetch_input, import_bytes, import_path, write_car
from storage._blockstore import TEMP_PREFIX
from storage._car import encode_header, section_prefix
from tests.storage.conftest import MIB, gateway_server, random_bytes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def remote(tmp_path: Path, sample_tree: Path) -> tuple[Blockstore, CID]:
    """The "rest of the network": a second node's store holding the sample tree."""
    store = Blockstore.open(tmp_path / "remote-blocks")
    return store, import_path(sample_tree, store).cid


@asynccontextmanager
async def serving(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket closes


def _config(*gateways: str, max_input_mb: int = 64) -> StorageSection:
    return StorageSection(gateways=list(gateways), max_input_mb=max_input_mb, connect_timeout_seconds=5)


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
    """(server, client) TLS contexts over a fresh self-signed certificate for 127.0.0.1."""
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(d / "cert.pem", d / "key.pem")
    return server, ssl.create_default_context(cafile=str(d / "cert.pem"))


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
            config=_config(),
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
                config=_config(),
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
                config=_config(max_input_mb=1),
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
                config=_config(),
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
