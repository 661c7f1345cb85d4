"""Shared fixtures: real nodes (in-process and as a daemon process), keys, envelopes.

Under CI=true a skipped test fails the run unless it is marked ``gpu``: on CI every part that can run
on the machine (node, npm interop tools, ...) must really run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from core.config import parse_config
from node.daemon import Node
from node.server import build_app
from payments.keys import Signer, new_ed25519, new_eth
from requester.client import NodeClient, sign_request

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_ci_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if IN_CI and report.skipped and "gpu" not in report.keywords:
        _ci_skips.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _ci_skips:
        print("\nCI=true: these tests were skipped but must run on CI:", file=sys.stderr)
        for nodeid in _ci_skips:
            print(f"  {nodeid}", file=sys.stderr)
        session.exitstatus = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_envelope(job_id: str = "clip-1", *, max_price: str = "5.00", **overrides: Any) -> dict[str, Any]:
    """A valid ffmpeg_transcode envelope; keyword overrides replace top-level fields."""
    env: dict[str, Any] = {
        "job_id": job_id,
        "kind": "ffmpeg_transcode",
        "input_uri": "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
        "output_spec": {"format": "mp4", "resolution": "720p", "codec": "h264", "audio_codec": "aac"},
        "limits": {"timeout_seconds": 600, "max_output_mb": 200, "cpus": 0.5, "memory_mb": 512, "gpus": 0},
        "validation": {"min_duration_seconds": 1, "required_streams": ["video", "audio"]},
        "payment": {
            "max_price": max_price,
            "currency": "usdc",
            "chain_id": 31337,
            "escrow": "0x" + "e" * 40,
            "payer": "0x" + "a" * 40,
            "validator": "did:pkh:eip155:31337:0x" + "b" * 40,
        },
    }
    env.update(overrides)
    return env


@pytest.fixture
def requester() -> Signer:
    return new_ed25519()


@pytest.fixture
def eth_requester() -> Signer:
    return new_eth(31337)


def write_home(home: Path, config: dict[str, Any] | None = None, *, port: int = 0) -> Path:
    """A node home with a key and a node.toml (as TOML) built from ``config`` sections."""
    from payments.keys import save_key

    home.mkdir(parents=True, exist_ok=True)
    # Jobs stay queued unless a test asks for execution: admission tests watch states the scheduler
    # would otherwise move on.
    cfg = {"api": {"host": "127.0.0.1", "port": port}, "scheduler": {"paused": True}, **(config or {})}
    parse_config(cfg)  # fail here, not in the node, on a bad test config
    lines: list[str] = []
    for section, values in cfg.items():
        # a list is an array of tables ([[models]]), anything else one table
        for table in values if isinstance(values, list) else [values]:
            lines.append(f"[[{section}]]" if isinstance(values, list) else f"[{section}]")
            for key, value in table.items():
                lines.append(f"{key} = {json.dumps(value)}")
    (home / "node.toml").write_text("\n".join(lines) + "\n")
    if not (home / "node.key").exists():
        save_key(new_ed25519(), home / "node.key")
    return home


class LiveNode:
    """An in-process node behind a real HTTP server on an ephemeral port."""

    def __init__(self, node: Node, server: TestServer) -> None:
        self.node = node
        self.server = server

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def did(self) -> str:
        return self.node.did

    def sign(self, signer: Signer, claims: dict[str, Any], **kw: Any) -> str:
        return sign_request(signer, self.did, claims, **kw)

    def client(self) -> NodeClient:
        return NodeClient(self.url)


@pytest.fixture
async def live_node(tmp_path: Path) -> AsyncIterator[LiveNode]:
    async with _live(write_home(tmp_path / "home")) as ln:
        yield ln


from contextlib import asynccontextmanager  # noqa: E402


@asynccontextmanager
async def _live(home: Path) -> AsyncIterator[LiveNode]:
    node = Node.from_home(home)
    server = TestServer(build_app(node), host="127.0.0.1")
    await server.start_server()
    try:
        yield LiveNode(node, server)
    finally:
        await server.close()


live = _live


class DaemonProcess:
    """``hearth run`` as a real child process; ``kill()`` sends SIGKILL, ``stop()`` SIGTERM."""

    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "daemon.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``hearth run`` (with ``env`` added to the environment) without waiting for it."""
        with self.log.open("a") as log:  # a file, not a pipe: a full pipe would stall the daemon
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "run", "--home", str(self.home), "--port", str(self.port)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        return self.proc

    def start(self, timeout: float = 20.0, env: dict[str, str] | None = None) -> float:
        """Start and wait for /readyz; returns seconds from spawn to ready."""
        import urllib.request

        t0 = time.perf_counter()
        self.spawn(env)
        assert self.proc is not None
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("daemon did not become ready")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    port = free_port()
    d = DaemonProcess(write_home(tmp_path / "dhome", port=port), port)
    try:
        yield d
    finally:
        d.stop()


def labelled_containers(label: str, value: str) -> set[str]:
    """IDs of every container whose ``label`` is ``value``, running or not (one listing: no race between
    listing and inspecting one container after another)."""
    import docker

    from core.defaults import DEFAULT_DOCKER_URL

    client = docker.APIClient(base_url=DEFAULT_DOCKER_URL)
    try:
        rows = client.containers(all=True, filters={"label": f"{label}={value}"})
        return {str(row["Id"]) for row in rows}
    finally:
        client.close()


@dataclass(frozen=True)
class TinyModel:
    """The test model (provider.testmodel): where its weights are and their CID."""

    path: Path
    cid: str


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny Llama-architecture model with random weights, built here (no download), as a catalog entry."""
    from provider.catalog import hash_model_dir
    from provider.testmodel import build_test_model

    path = build_test_model(tmp_path_factory.mktemp("models") / "tiny-llama")
    return TinyModel(path, hash_model_dir(path)[0])


SANDBOX_SETUP_TIMEOUT_SECONDS = 1800  # a fresh machine runs debootstrap and an apt-get build


@pytest.fixture(scope="session")
def docker_client(sandbox_images: dict[str, str]) -> Iterator[Any]:
    """A plain docker SDK client, for tests that act on the engine behind the runner's back."""
    import docker

    from core.defaults import DEFAULT_DOCKER_URL

    client = docker.DockerClient(base_url=DEFAULT_DOCKER_URL)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def sandbox_images() -> dict[str, str]:
    """Tag -> image ID of every image ``scripts/docker.sh`` provides, after making sure they exist.

    Seconds when the engine runs and the images are built; minutes on a fresh machine, which it sets up.
    """
    import docker

    from core.defaults import DEFAULT_DOCKER_URL

    proc = subprocess.run(
        [str(REPO / "scripts" / "docker.sh")],
        capture_output=True,
        text=True,
        timeout=SANDBOX_SETUP_TIMEOUT_SECONDS,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/docker.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    client = docker.DockerClient(base_url=DEFAULT_DOCKER_URL)
    try:
        tags = ("hearth/ffmpeg:latest", "hearth/vllm-cpu:latest", "hearth/base:bookworm")
        return {tag: str(client.images.get(tag).id) for tag in tags}
    finally:
        client.close()
