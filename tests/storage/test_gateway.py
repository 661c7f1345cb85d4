"""The trustless gateway and blob upload over real HTTP (aiohttp test server, real sockets)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from core.config import StorageSection
from storage import CID, Blockstore, import_bytes, import_path, read_car
from storage._blockstore import TEMP_PREFIX
from storage._dag import iter_blocks
from tests.storage.conftest import MIB, gateway_server, ipfs_car, json_error, random_bytes

RAW = "application/vnd.ipld.raw"
CAR = "application/vnd.ipld.car"


@pytest.fixture
async def served(store: Blockstore, sample_tree: Path) -> AsyncIterator[tuple[str, CID]]:
    root = import_path(sample_tree, store).cid
    async with gateway_server(store, StorageSection(max_blob_mb=1)) as url:
        yield url, root


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def test_raw_block_by_accept_and_by_query(store: Blockstore, served: tuple[str, CID]) -> None:
    url, root = served
    status, headers, body = await _get(f"{url}/ipfs/{root}", headers={"Accept": RAW})
    assert status == 200
    assert body == store.get(root)
    assert headers["Content-Type"] == RAW
    assert headers["Content-Length"] == str(len(body))
    assert headers["Etag"] == f'"{root}.raw"'
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "immutable" in headers["Cache-Control"]
    status, _, by_query = await _get(f"{url}/ipfs/{root}?format=raw")
    assert (status, by_query) == (200, body)


async def test_car_of_a_directory_unpacks_with_ipfs_car(
    served: tuple[str, CID], sample_tree: Path, tmp_path: Path
) -> None:
    url, root = served
    status, headers, body = await _get(f"{url}/ipfs/{root}", headers={"Accept": f"{CAR}; version=1"})
    assert status == 200
    assert headers["Content-Type"].startswith(f"{CAR}; version=1; order=dfs")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Etag"].endswith('.car"')
    car = tmp_path / "got.car"
    car.write_bytes(body)
    ipfs_car("unpack", str(car), "--output", str(tmp_path / "out"))
    assert (tmp_path / "out" / "big.bin").read_bytes() == (sample_tree / "big.bin").read_bytes()
    seg = tmp_path / "out" / "hls" / "720p" / "seg0.ts"
    assert seg.read_bytes() == (sample_tree / "hls" / "720p" / "seg0.ts").read_bytes()


async def test_car_in_dfs_order_matches_the_store(store: Blockstore, served: tuple[str, CID]) -> None:
    url, root = served
    _, _, body = await _get(f"{url}/ipfs/{root}?format=car")
    roots, blocks = read_car(io.BytesIO(body))
    assert roots == [root]
    assert list(blocks) == list(iter_blocks(store, root))


async def test_car_for_a_path_carries_the_path_then_the_file(
    store: Blockstore, served: tuple[str, CID], sample_tree: Path
) -> None:
    url, root = served
    status, headers, body = await _get(f"{url}/ipfs/{root}/hls/720p/seg0.ts?format=car")
    assert status == 200
    roots, blocks = read_car(io.BytesIO(body))
    got = list(blocks)
    assert roots == [root]
    assert got[0][0] == root  # the directories crossed come first, from the root down
    seg = import_bytes((sample_tree / "hls" / "720p" / "seg0.ts").read_bytes()).cid
    assert headers["X-Ipfs-Roots"].split(",")[-1] == str(seg)
    assert [cid for cid, _ in got[3:]] == [cid for cid, _ in iter_blocks(store, seg)]


async def test_dag_scope_block_sends_only_the_root(served: tuple[str, CID]) -> None:
    url, root = served
    _, _, body = await _get(f"{url}/ipfs/{root}?format=car&dag-scope=block")
    _, blocks = read_car(io.BytesIO(body))
    assert [cid for cid, _ in blocks] == [root]


async def test_dag_scope_entity_is_a_whole_file_but_only_a_directory_node(
    store: Blockstore, served: tuple[str, CID]
) -> None:
    url, root = served
    _, _, body = await _get(f"{url}/ipfs/{root}?format=car&dag-scope=entity")
    _, blocks = read_car(io.BytesIO(body))
    assert [cid for cid, _ in blocks] == [root]
    _, _, body = await _get(f"{url}/ipfs/{root}/big.bin?format=car&dag-scope=entity")
    _, blocks = read_car(io.BytesIO(body))
    got = [cid for cid, _ in blocks]
    big = got[1]
    assert got == [root, *(cid for cid, _ in iter_blocks(store, big))]
    assert len(got) == 2 + 3  # the directory, the file's root, its three leaves


async def test_plain_file_bytes_without_a_format(served: tuple[str, CID], sample_tree: Path) -> None:
    url, root = served
    status, headers, body = await _get(f"{url}/ipfs/{root}/big.bin")
    assert status == 200
    assert body == (sample_tree / "big.bin").read_bytes()
    assert headers["Content-Length"] == str(len(body))
    assert headers["X-Content-Type-Options"] == "nosniff"


async def test_directory_without_a_format_is_406(served: tuple[str, CID]) -> None:
    url, root = served
    status, _, body = await _get(f"{url}/ipfs/{root}")
    assert status == 406
    assert json_error(json.loads(body))["code"] == "format_required"


async def test_unknown_cid_is_404_in_the_error_shape(served: tuple[str, CID]) -> None:
    url, _ = served
    missing = CID.for_block(0x55, b"nobody stored this")
    for fmt in ("raw", "car"):
        status, headers, body = await _get(f"{url}/ipfs/{missing}?format={fmt}")
        assert status == 404
        assert headers["Content-Type"].startswith("application/json")
        error = json_error(json.loads(body))
        assert error["code"] == "block_not_found"
        assert set(error) == {"code", "domain", "message", "retryable", "details"}


async def test_missing_path_is_404(served: tuple[str, CID]) -> None:
    url, root = served
    status, _, body = await _get(f"{url}/ipfs/{root}/no/such/file?format=car")
    assert status == 404
    assert json_error(json.loads(body))["code"] == "path_not_found"


async def test_bad_cid_is_400(served: tuple[str, CID]) -> None:
    url, _ = served
    for bad in ("not-a-cid", "bafyinvalid", "Qm" + "1" * 44):
        status, _, body = await _get(f"{url}/ipfs/{bad}?format=raw")
        assert status == 400, bad
        assert json_error(json.loads(body))["code"] == "invalid_cid"


async def test_incomplete_dag_is_404_before_any_byte(store: Blockstore, served: tuple[str, CID]) -> None:
    url, _ = served
    partial = import_bytes(random_bytes(2 * MIB + 1, seed=11))  # computed, never stored...
    status, _, _ = await _get(f"{url}/ipfs/{partial.cid}?format=car")
    assert status == 404
    store.put(b"")  # ...and a store that has other blocks changes nothing
    status, _, _ = await _get(f"{url}/ipfs/{partial.cid}?format=car")
    assert status == 404


async def test_head_gives_headers_without_a_body(store: Blockstore, served: tuple[str, CID]) -> None:
    url, root = served
    async with aiohttp.ClientSession() as session:
        async with session.head(f"{url}/ipfs/{root}", headers={"Accept": RAW}) as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(len(store.get(root)))
            assert r.headers["Content-Type"] == RAW
            assert await r.read() == b""
        async with session.head(f"{url}/ipfs/{root}?format=car") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith(CAR)
            assert await r.read() == b""
        async with session.head(f"{url}/ipfs/{root}/big.bin") as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(2 * MIB + 17)
            assert await r.read() == b""
        missing = CID.for_block(0x55, b"absent")
        async with session.head(f"{url}/ipfs/{missing}?format=raw") as r:
            assert r.status == 404


async def test_if_none_match_gives_304(served: tuple[str, CID]) -> None:
    url, root = served
    _, headers, _ = await _get(f"{url}/ipfs/{root}?format=car")
    status, _, body = await _get(f"{url}/ipfs/{root}?format=car", headers={"If-None-Match": headers["Etag"]})
    assert (status, body) == (304, b"")


async def test_unsupported_format_and_params_are_400(served: tuple[str, CID]) -> None:
    url, root = served
    for query in ("format=tar", "format=car&dag-scope=some", "format=car&entity-bytes=0:10"):
        status, _, _ = await _get(f"{url}/ipfs/{root}?{query}")
        assert status == 400, query


# -- PUT /v1/blobs ---------------------------------------------------------------------------------


async def test_put_blob_stores_and_serves_it(store: Blockstore, served: tuple[str, CID]) -> None:
    url, _ = served
    data = random_bytes(MIB - 3, seed=12)
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{url}/v1/blobs", data=data) as r:
            assert r.status == 201
            doc = await r.json()
        assert doc == {"cid": str(import_bytes(data).cid), "size": len(data)}
        async with session.get(f"{url}/ipfs/{doc['cid']}") as r:
            assert await r.read() == data
        async with session.put(f"{url}/v1/blobs", data=data) as r:  # idempotent
            assert r.status == 201 and (await r.json())["cid"] == doc["cid"]


async def test_put_blob_streams_chunked_bodies(store: Blockstore, tmp_path: Path) -> None:
    data = random_bytes(3 * MIB + 5, seed=13)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    async with (
        gateway_server(store, StorageSection(max_blob_mb=4)) as url,
        aiohttp.ClientSession() as s,
        s.put(f"{url}/v1/blobs", data=pieces()) as r,
    ):
        assert r.status == 201
        doc = await r.json()
    assert doc["cid"] == str(import_bytes(data).cid)
    assert doc["size"] == len(data)


def _nothing_stored(store: Blockstore, before: int) -> None:
    assert Blockstore.open(store.root).stats().blocks == before
    assert [p for p in store.root.rglob(f"{TEMP_PREFIX}*")] == []


async def test_put_blob_over_the_cap_by_content_length_is_413(
    store: Blockstore, served: tuple[str, CID]
) -> None:
    url, _ = served
    before = Blockstore.open(store.root).stats().blocks
    async with (
        aiohttp.ClientSession() as session,
        session.put(f"{url}/v1/blobs", data=io.BytesIO(bytes(MIB + 1))) as r,
    ):
        assert r.status == 413
        assert json_error(await r.json())["code"] == "blob_too_large"
    _nothing_stored(store, before)


async def test_put_blob_over_the_cap_mid_stream_is_413_and_leaves_nothing(
    store: Blockstore, served: tuple[str, CID]
) -> None:
    url, _ = served
    before = Blockstore.open(store.root).stats().blocks
    data = random_bytes(3 * MIB, seed=14)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 256 * 1024):
            yield data[i : i + 256 * 1024]

    async with aiohttp.ClientSession() as session, session.put(f"{url}/v1/blobs", data=pieces()) as r:
        assert r.status == 413
        assert json_error(await r.json())["code"] == "blob_too_large"
    _nothing_stored(store, before)
    first_chunk = CID.for_block(0x55, data[:MIB])
    assert not store.has(first_chunk)


async def test_block_corrupted_on_disk_breaks_the_stream(store: Blockstore, tmp_path: Path) -> None:
    data = random_bytes(3 * MIB, seed=15)
    root = import_bytes(data, store).cid
    leaf = CID.for_block(0x55, data[2 * MIB :])
    path = store.root / leaf.digest[:1].hex() / str(leaf)
    path.write_bytes(b"rotten" + path.read_bytes()[6:])
    async with (
        gateway_server(store) as url,
        aiohttp.ClientSession() as session,
        session.get(f"{url}/ipfs/{root}?format=car") as r,
    ):
        assert r.status == 200  # the corruption is met mid-stream, after the status went out
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
