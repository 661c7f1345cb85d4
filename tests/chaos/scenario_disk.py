"""Rows: a real full disk under the journal, and under the blockstore. A clear error, nothing corrupted,
and the node recovers by itself once space returns.

Each row gives one real ``hearth run`` daemon a small tmpfs (``mount -t tmpfs -o size=...``) of its own:
its state directory (the SQLite journal; the sandbox's work directory stays on the real disk) or its
blockstore directory. Each iteration fills that filesystem with a filler file at a random moment while the
node works, keeps it full for a while, deletes the filler, and checks:

- while full: every answer is a success or a structured error; a refusal for lack of space says so
  (507, domain ``storage``, ``details.cause = disk_full``), never a 500; at least one request met the
  full disk (else the iteration did not test anything); ``/healthz`` answers 200 to every probe;
- nothing is corrupted: the journal passes ``PRAGMA integrity_check`` and every job's transitions replay
  to its state; every block file in the store hashes to its CID, no temporary file is left once the
  writers are done, and every upload that was acknowledged exports whole (each block verified);
- refusals have no side effect: a quote refused for lack of space is taken when sent again later;
- after the filler is gone, without a restart: the job that ran through the fault reaches a terminal
  state (completed; for the blockstore, completed or failed in the ``storage`` domain), and a new upload
  and a new job complete.

Journal detail: SQLite reuses its write-ahead log in place, so a small write can still land on a full
disk until the log has to grow. Just before filling, the scenario checkpoints the log to empty
(``wal_checkpoint(TRUNCATE)``, as an operator's ``sqlite3`` shell may), so the fault is met every time.
Everything mounted is unmounted again, whatever happens; nothing outside the row's workdir is touched.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from core.config import load_config, resolve_path
from core.errors import HearthError
from payments.keys import new_ed25519
from requester.client import NodeClient, NodeError, sign_request
from sandbox.ffmpeg import make_test_clip
from storage import CID, Blockstore, write_car
from storage._blockstore import TEMP_PREFIX
from tests.chaos.harness import daemon_home, journal_path, node_did, read_journal, seeded, start
from tests.chaos.scoreboard import Row, scenario
from tests.conftest import DaemonProcess, make_envelope

JOURNAL = "disk full: journal"
BLOCKSTORE = "disk full: blockstore"
STATE_FS_MB = 16
BLOCKS_FS_MB = 48
FULL_SECONDS = 3.0  # how long the disk stays full while the node works
FILL_WINDOW_SECONDS = 1.0  # the fill lands uniformly this long after the work started
PROBE_EVERY_SECONDS = 0.1  # /healthz while the disk is full
QUOTE_EVERY_SECONDS = 0.25  # quotes arriving while the disk is full
UPLOAD_BYTES = 2 * 1024 * 1024
UPLOAD_PIECE_BYTES = 64 * 1024
UPLOAD_PIECE_PAUSE_SECONDS = 0.04  # an upload that takes about a second: the fill lands inside it
STEP_TIMEOUT_SECONDS = 90.0  # one job on a loaded 2-core machine
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)
SMALL = {"timeout_seconds": 120, "max_output_mb": 20, "cpus": 0.25, "memory_mb": 256, "gpus": 0}
TINY = {"timeout_seconds": 60, "max_output_mb": 5, "cpus": 0.05, "memory_mb": 64, "gpus": 0}
SPEC = {"format": "mp4", "resolution": "360p", "codec": "h264", "audio_codec": "aac"}
TERMINAL = ("completed", "failed", "expired", "cancelled", "rejected")


class Stuck(Exception):
    """A job did not reach a terminal state in time: the iteration is counted bad and abandoned."""


# -- a sized filesystem -------------------------------------------------------------------------------


@contextmanager
def _tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` MiB mounted on ``path`` (inside the row's workdir), unmounted on the way out."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}M,mode=0700", "tmpfs", str(path)],
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)


def _fill(fs: Path) -> Path:
    """Write a filler file into ``fs`` until the filesystem has not one byte left (ENOSPC)."""
    filler = fs / "filler"
    with open(filler, "ab", buffering=0) as f:
        for size in (1024 * 1024, 65536, 4096, 512, 1):  # the last pieces fill the last page
            chunk = b"\0" * size
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


# -- the node and the probes --------------------------------------------------------------------------


@dataclass
class _World:
    daemon: DaemonProcess
    client: NodeClient
    http: aiohttp.ClientSession
    did: str
    cid: str  # the input clip, stored before any fault
    row: Row
    outcomes: dict[str, int] = field(default_factory=dict)  # answers seen during the current fault

    @property
    def url(self) -> str:
        return self.daemon.url

    async def submit(self, name: str, limits: dict[str, Any], cid: str | None = None) -> str:
        env = make_envelope(name, input_uri=cid or self.cid, output_spec=SPEC, limits=limits)
        body = await self.client.submit(sign_request(new_ed25519(), self.did, {"job": env}))
        return str(body["job"]["id"])

    async def until(self, job: str, states: tuple[str, ...]) -> dict[str, Any]:
        deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
        while True:
            view: dict[str, Any] = (await self.client.status(job))["job"]
            if view["state"] in states:
                return view
            if time.monotonic() > deadline:
                raise Stuck(f"{job} still {view['state']} after {STEP_TIMEOUT_SECONDS:.0f}s")
            await asyncio.sleep(0.1)

    def judge(self, what: str, status: int, text: str) -> dict[str, Any] | None:
        """Count one answer: a success, the full-disk refusal, another structured refusal, or a bad one."""
        if status < 400:
            self.outcomes["ok"] = self.outcomes.get("ok", 0) + 1
            return None
        try:
            error = json.loads(text)["error"]
            code, domain = error["code"], error["domain"]
        except (ValueError, KeyError, TypeError):
            self.row.fail("unstructured_error", f"{what}: {status} {text[:200]!r}")
            return None
        if status == 500:
            self.row.fail("internal_error", f"{what}: 500 {code} ({domain}): {error.get('message')}")
        elif status == 507 and domain == "storage" and error.get("details", {}).get("cause") == "disk_full":
            self.outcomes["disk_full"] = self.outcomes.get("disk_full", 0) + 1
        else:
            key = f"{status} {code}"
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
        return error  # type: ignore[no-any-return]

    async def healthz(self) -> None:
        try:
            async with self.http.get(f"{self.url}/healthz") as resp:
                if resp.status != 200:
                    self.row.fail("healthz_failed", f"/healthz answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.row.fail("healthz_failed", f"/healthz: {type(exc).__name__}: {exc}")


@asynccontextmanager
async def _meanwhile(*loops: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
    """Run each ``loop`` body over and over (as background tasks) while the block runs."""

    async def forever(body: Callable[[], Awaitable[None]]) -> None:
        while True:
            await body()

    tasks = [asyncio.create_task(forever(body)) for body in loops]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


async def _probe(w: _World) -> None:
    await w.healthz()
    await asyncio.sleep(PROBE_EVERY_SECONDS)


# -- disk full: journal -------------------------------------------------------------------------------


def _truncate_wal(path: Path) -> None:
    with closing(sqlite3.connect(path, timeout=10)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()


def _check_journal(home: Path, row: Row) -> None:
    with closing(sqlite3.connect(f"file:{journal_path(home)}?mode=ro", uri=True, timeout=10)) as conn:
        verdict = conn.execute("PRAGMA integrity_check").fetchall()
    if verdict != [("ok",)]:
        row.fail("journal_corrupt", f"integrity_check: {verdict[:5]}")
    for job in read_journal(home).jobs.values():
        if not job.moves or job.moves[-1][1] != job.state:
            row.fail("journal_inconsistent", f"{job.id} is {job.state}, its transitions end {job.moves[-1:]}")


async def _journal_iteration(w: _World, state: Path, rng: random.Random, n: int) -> None:
    row = w.row
    job = await w.submit(f"journal-{n}", SMALL)
    await w.until(job, ("running", *TERMINAL))
    refused: list[str] = []

    async def quote() -> None:
        token = sign_request(
            new_ed25519(), w.did, {"job": make_envelope(f"q-{n}-{time.time_ns()}", limits=TINY)}
        )
        async with w.http.post(
            f"{w.url}/v1/quotes", data=token, headers={"Content-Type": "application/jwt"}
        ) as resp:
            error = w.judge("quote", resp.status, await resp.text())
        if error is not None and error.get("domain") == "storage":
            refused.append(token)
        await asyncio.sleep(QUOTE_EVERY_SECONDS)

    async def read_job() -> None:
        # a read that saw another request's write which then failed is refused as such (507), not a 500
        async with w.http.get(f"{w.url}/v1/jobs/{job}") as resp:
            w.judge("job status", resp.status, await resp.text())
        await asyncio.sleep(QUOTE_EVERY_SECONDS)

    w.outcomes = {}
    await asyncio.sleep(rng.uniform(0, FILL_WINDOW_SECONDS))
    await asyncio.to_thread(_truncate_wal, journal_path(w.daemon.home))
    filler = _fill(state)
    try:
        async with _meanwhile(lambda: _probe(w), quote, read_job):
            await asyncio.sleep(FULL_SECONDS)
    finally:
        filler.unlink()
    space_back = time.time()
    _tally(row, w.outcomes)
    if not w.outcomes.get("disk_full"):
        row.fail("fault_not_met", f"no request met the full disk: {w.outcomes}")

    view = await w.until(job, TERMINAL)  # recorded once space is back, without a restart
    if view["state"] != "completed":
        row.fail("job_not_completed", f"{job} ended {view['state']}: {view.get('failure')}")
    elif view["updated_at"] >= space_back:
        row.good["job_outcome_waited_for_space"] = row.good.get("job_outcome_waited_for_space", 0) + 1
    if refused:  # a refused quote left nothing behind, not even its nonce: sent again, it is taken
        async with w.http.post(
            f"{w.url}/v1/quotes", data=refused[0], headers={"Content-Type": "application/jwt"}
        ) as resp:
            if resp.status != 201:
                row.fail(
                    "refusal_left_a_trace", f"a refused quote sent again: {resp.status} {await resp.text()}"
                )
    await _new_job_completes(w, f"journal-after-{n}")
    _check_journal(w.daemon.home, row)


# -- disk full: blockstore ----------------------------------------------------------------------------


class _Store:
    """The daemon's blockstore, read beside it: every block verified once, acknowledged uploads whole."""

    def __init__(self, root: Path, row: Row) -> None:
        self.root = root
        self.row = row
        self.verified: set[str] = set()
        self.acknowledged: list[CID] = []

    def check(self) -> None:
        for shard in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for entry in os.scandir(shard):
                if entry.name.startswith(TEMP_PREFIX):
                    self.row.fail("temp_file_left", f"{entry.path} is left after the writers finished")
                elif entry.path not in self.verified:
                    try:
                        ok = CID.parse(entry.name).matches(Path(entry.path).read_bytes())
                    except HearthError:
                        ok = False
                    if not ok:
                        self.row.fail("partial_block_visible", f"{entry.path} does not hash to its name")
                    self.verified.add(entry.path)
        store = Blockstore.open(self.root)  # the store exists: opening it writes nothing
        with open(os.devnull, "wb") as sink:
            for root in self.acknowledged:
                try:
                    write_car(store, root, sink)  # every block of the DAG, each verified
                except HearthError as exc:
                    self.row.fail("acknowledged_upload_incomplete", f"{root}: {exc.code}: {exc.message}")
        self.row.good["blocks_verified"] = len(self.verified)


async def _upload(w: _World, data: bytes) -> dict[str, Any] | None:
    """PUT a blob in pieces with pauses (an upload in flight for about a second); its answer judged."""

    async def pieces() -> AsyncIterator[bytes]:
        for at in range(0, len(data), UPLOAD_PIECE_BYTES):
            yield data[at : at + UPLOAD_PIECE_BYTES]
            await asyncio.sleep(UPLOAD_PIECE_PAUSE_SECONDS)

    async with w.http.put(f"{w.url}/v1/blobs", data=pieces()) as resp:
        text = await resp.text()
        w.judge("upload", resp.status, text)
        return json.loads(text) if resp.status == 201 else None


async def _blockstore_iteration(w: _World, blocks: Path, store: _Store, rng: random.Random, n: int) -> None:
    row = w.row
    # a clip of its own: an artifact the store already holds would need no space at all
    clip = await asyncio.to_thread(
        make_test_clip, blocks.parent.parent / f"clip-{n}.mp4", seconds=4, width=176 + 16 * n, height=120
    )
    job = await w.submit(f"blocks-{n}", SMALL, (await w.client.put_blob(clip))["cid"])
    w.outcomes = {}
    upload = asyncio.create_task(_upload(w, os.urandom(UPLOAD_BYTES)))
    await asyncio.sleep(rng.uniform(0, FILL_WINDOW_SECONDS))
    filler = _fill(blocks)
    try:
        async with _meanwhile(lambda: _probe(w)):
            stored = await upload
            small = await _upload(w, os.urandom(4096))  # a whole new block on a full disk
            await asyncio.sleep(FULL_SECONDS)
        view = await w.until(job, TERMINAL)  # a job may fail here: its artifact cannot be stored
    finally:
        filler.unlink()
    _tally(row, w.outcomes)
    if not w.outcomes.get("disk_full"):
        row.fail("fault_not_met", f"no upload met the full disk: {w.outcomes}")
    store.acknowledged += [CID.parse(doc["cid"]) for doc in (stored, small) if doc is not None]
    failure = view.get("failure") or {}
    if view["state"] == "failed" and failure.get("domain") == "storage":
        row.good["jobs_failed_storage"] = row.good.get("jobs_failed_storage", 0) + 1
    elif view["state"] == "completed":  # its artifact was stored before the disk filled up
        row.good["jobs_completed_before_full"] = row.good.get("jobs_completed_before_full", 0) + 1
    else:
        row.fail("job_unclear_end", f"{job} ended {view['state']}: {failure}")
    store.check()

    after = await _upload(w, os.urandom(UPLOAD_BYTES))
    if after is None:
        row.fail("no_recovery", "an upload after space returned was refused")
    else:
        store.acknowledged.append(CID.parse(after["cid"]))
    await _new_job_completes(w, f"blocks-after-{n}")
    store.check()


# -- shared -------------------------------------------------------------------------------------------


def _tally(row: Row, outcomes: dict[str, int]) -> None:
    for key, value in outcomes.items():
        row.good[key] = row.good.get(key, 0) + value


async def _new_job_completes(w: _World, name: str) -> None:
    job = await w.submit(name, SMALL)
    view = await w.until(job, TERMINAL)
    if view["state"] != "completed":
        w.row.fail(
            "no_recovery", f"a new job after space returned ended {view['state']}: {view.get('failure')}"
        )


async def _rows(name: str, count: int, workdir: Path, mount: str, size_mb: int, kind: str) -> Row:
    row = Row(name, count)
    rng = seeded(row)
    config: dict[str, Any] = {"scheduler": {"paused": False}, "sandbox": {"work_dir": str(workdir / "work")}}
    daemon = daemon_home(workdir, config)
    cfg = load_config(daemon.home)
    target = resolve_path(daemon.home, cfg.node.state_dir if kind == "journal" else cfg.storage.blocks_dir)
    assert target.parent == daemon.home and target.name == mount  # the mount stays inside the workdir
    clip = make_test_clip(workdir / "clip.mp4", seconds=4, width=160, height=120)
    with _tmpfs(target, size_mb):
        try:
            start(daemon)
            async with (
                NodeClient(daemon.url) as client,
                aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http,
            ):
                cid = (await client.put_blob(clip))["cid"]
                w = _World(daemon, client, http, node_did(daemon.home), cid, row)
                store = _Store(target, row)
                for n in range(count):
                    try:
                        if kind == "journal":
                            await _journal_iteration(w, target, rng, n)
                        else:
                            await _blockstore_iteration(w, target, store, rng, n)
                    except (Stuck, NodeError) as exc:
                        row.fail("stuck", str(exc))
                        continue
                    row.runs += 1
        finally:
            daemon.stop()
    return row


@scenario(JOURNAL, stated=5, short=1)
def run_journal(count: int, workdir: Path) -> Row:
    """The journal's filesystem fills while a job runs and quotes arrive."""
    return asyncio.run(_rows(JOURNAL, count, workdir, "state", STATE_FS_MB, "journal"))


@scenario(BLOCKSTORE, stated=5, short=1)
def run_blockstore(count: int, workdir: Path) -> Row:
    """The blockstore's filesystem fills while a job runs and a blob uploads."""
    return asyncio.run(_rows(BLOCKSTORE, count, workdir, "blocks", BLOCKS_FS_MB, "blockstore"))
