"""Fixtures for the storage tests: a blockstore, the npm ``ipfs-car`` CLI, gateways on real sockets.

``ipfs-car`` (pinned in package.json) is the independent implementation the CIDs and CARs are checked
against. Without node or node_modules these tests fail with the reason: there is no fallback.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.config import StorageSection
from core.errors import HearthError
from node.http_errors import status_of
from storage import Blockstore, Gateway

ROOT = Path(__file__).resolve().parents[2]
IPFS_CAR = ROOT / "node_modules" / "ipfs-car" / "bin.js"
LAYOUT_SCRIPT = Path(__file__).resolve().parent / "interop" / "layout_cid.mjs"
NODE_TIMEOUT_SECONDS = 120
MIB = 1024 * 1024


def _require_node_tooling() -> None:
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH; the storage tests check CIDs against npm ipfs-car")
    if not IPFS_CAR.is_file():
        pytest.fail(f"{IPFS_CAR} is missing; run npm ci in {ROOT}")


def ipfs_car(*args: str, cwd: Path | None = None) -> str:
    """Run the ``ipfs-car`` CLI; returns its stdout (it prints the root CID there with --output)."""
    _require_node_tooling()
    done = subprocess.run(
        ["node", str(IPFS_CAR), *args],
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_SECONDS,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, f"ipfs-car {' '.join(args)} failed: {done.stderr}"
    return done.stdout.strip()


def ipfs_car_pack(path: Path, car: Path, *, wrap: bool) -> str:
    """``ipfs-car pack`` of a file (``--no-wrap``) or a directory; returns the root CID it printed."""
    args = ["pack", str(path), "--output", str(car), "--hidden"]
    if not wrap:
        args.append("--no-wrap")
    return ipfs_car(*args).splitlines()[-1]


def layout_cid(path: Path, *, chunk_size: int, width: int) -> str:
    """The CID ipfs-car's encoder gives ``path`` with a chosen chunk size and DAG width."""
    _require_node_tooling()
    done = subprocess.run(
        ["node", str(LAYOUT_SCRIPT)],
        input=json.dumps({"path": str(path), "chunk_size": chunk_size, "width": width}),
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["cid"])


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    path.write_bytes(random_bytes(size, seed))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Blockstore:
    return Blockstore.open(tmp_path / "blocks")


@pytest.fixture(scope="session")
def sample_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job-output-like tree: renditions in a subdirectory, a dotfile, a multi-chunk file, UTF-8 names."""
    root = tmp_path_factory.mktemp("tree") / "out"
    (root / "hls" / "720p").mkdir(parents=True)
    write_random(root / "big.bin", 2 * MIB + 17, seed=1)
    (root / "index.m3u8").write_text("#EXTM3U\n720p/index.m3u8\n")
    (root / "hls" / "720p" / "seg0.ts").write_bytes(random_bytes(70_000, seed=2))
    (root / "hls" / "720p" / "seg1.ts").write_bytes(random_bytes(1, seed=3))
    (root / ".meta").write_text("{}")
    (root / "thumbnail é.jpg").write_bytes(random_bytes(3000, seed=4))
    (root / "empty.txt").write_bytes(b"")
    return root


@web.middleware
async def hearth_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """What node/server.py's error middleware does with a HearthError, without a whole node."""
    try:
        return await handler(request)
    except HearthError as exc:
        return web.json_response(exc.to_dict(), status=status_of(exc))


@asynccontextmanager
async def gateway_server(store: Blockstore, config: StorageSection | None = None) -> AsyncIterator[str]:
    """A gateway over ``store`` on a real socket; yields its base URL."""
    app = web.Application(middlewares=[hearth_errors])
    cfg = config or StorageSection()
    Gateway(store, max_blob_bytes=cfg.max_blob_mb * MIB, stall_seconds=cfg.upload_stall_seconds).add_routes(
        app
    )
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def json_error(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error: dict[str, Any] = body["error"]
    return error
