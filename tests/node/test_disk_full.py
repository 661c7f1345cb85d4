"""A real full disk (a sized tmpfs) under the journal and under the blockstore.

- The API answers a write it cannot record with 507, domain ``storage``, ``details.cause = disk_full``
  (not a 500), leaves no trace of it, keeps ``/healthz`` answering, and takes the same request once
  space returns, without a restart. The blockstore likewise refuses an upload and leaves no partial block.
- A group commit that fails on the full disk fails only the tasks that read its uncommitted rows, not a
  health check or a reader of committed rows.
- An attempt whose outcome the journal cannot record waits, holding its capacity, and records it once
  space returns: the job is neither lost in ``running`` nor left out of the queue.

SQLite reuses its write-ahead log in place, so small writes can land on a full disk until the log must
grow; each test empties the log (``wal_checkpoint(TRUNCATE)``) before filling, so the disk is really full.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from core.errors import JournalError
from core.journal import Journal
from node.http_errors import status_of
from payments.keys import Signer, load_key
from requester.client import sign_request
from storage._blockstore import TEMP_PREFIX
from tests.conftest import DaemonProcess, free_port, make_envelope, write_home
from tests.node.test_scheduler import ScriptedExecutor, accept, make, until

FS_MB = 8


@contextmanager
def tmpfs(path: Path, size_mb: int = FS_MB) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}M", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=False)


@contextmanager
def full(fs: Path, journal: Path | None = None) -> Iterator[None]:
    """``fs`` without one free byte while the block runs (the journal's log emptied first)."""
    if journal is not None:
        with closing(sqlite3.connect(journal, timeout=10)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    filler = fs / "filler"
    with open(filler, "ab", buffering=0) as f:
        for size in (1024 * 1024, 4096, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    try:
        yield
    finally:
        filler.unlink()


def assert_disk_full(status: int, body: dict[str, Any], code: str) -> None:
    error = body["error"]
    assert (status, error["code"], error["domain"], error["retryable"]) == (507, code, "storage", True), body
    assert error["details"]["cause"] == "disk_full"


def start(tmp_path: Path, mount: str) -> tuple[DaemonProcess, Path]:
    port = free_port()
    home = write_home(tmp_path / "home", {"sandbox": {"work_dir": str(tmp_path / "work")}}, port=port)
    return DaemonProcess(home, port), home / mount


async def test_a_full_journal_disk_refuses_writes_with_507_and_the_same_request_is_taken_later(
    tmp_path: Path, requester: Signer
) -> None:
    daemon, state = start(tmp_path, "state")
    with tmpfs(state):
        try:
            daemon.start()
            did = load_key(daemon.home / "node.key").did
            token = sign_request(requester, did, {"job": make_envelope("full-1")})
            headers = {"Content-Type": "application/jwt"}
            async with aiohttp.ClientSession() as http:
                with full(state, state / "journal.sqlite3"):
                    async with http.post(f"{daemon.url}/v1/quotes", data=token, headers=headers) as resp:
                        assert_disk_full(resp.status, await resp.json(), "journal_write_failed")
                    async with http.get(f"{daemon.url}/healthz") as resp:
                        assert resp.status == 200
                async with http.post(f"{daemon.url}/v1/quotes", data=token, headers=headers) as resp:
                    assert resp.status == 201, await resp.text()  # the refusal recorded nothing, not its jti
        finally:
            daemon.stop()
        with closing(sqlite3.connect(state / "journal.sqlite3")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


async def test_a_full_blockstore_disk_refuses_an_upload_with_507_and_leaves_no_partial_block(
    tmp_path: Path,
) -> None:
    daemon, blocks = start(tmp_path, "blocks")
    data = os.urandom(3 * 1024 * 1024)
    with tmpfs(blocks):
        try:
            daemon.start()
            async with aiohttp.ClientSession() as http:
                with full(blocks):
                    async with http.put(f"{daemon.url}/v1/blobs", data=io.BytesIO(data)) as resp:
                        assert_disk_full(resp.status, await resp.json(), "blockstore_io_error")
                    assert list(blocks.glob(f"*/{TEMP_PREFIX}*")) == []
                    assert [p for p in blocks.glob("*/*")] == []  # not one block of it is visible
                    async with http.get(f"{daemon.url}/healthz") as resp:
                        assert resp.status == 200
                async with http.put(f"{daemon.url}/v1/blobs", data=io.BytesIO(data)) as resp:
                    assert resp.status == 201
                    cid = (await resp.json())["cid"]
                async with http.get(f"{daemon.url}/ipfs/{cid}") as resp:
                    assert resp.status == 200 and await resp.read() == data
        finally:
            daemon.stop()


async def test_a_failed_group_commit_fails_only_the_tasks_that_read_its_rows(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    with tmpfs(fs), Journal.open(fs / "journal.sqlite3") as journal:
        journal.check_and_record("did:key:z6MkA", "before", time.time() + 60)
        outcome: dict[str, Any] = {}

        async def writer() -> None:
            try:
                async with journal.batched():
                    journal.check_and_record("did:key:z6MkA", "during", time.time() + 60)
                outcome["writer"] = "ok"
            except JournalError as exc:
                outcome["writer"] = (exc.code, status_of(exc), exc.domain)

        async def task(read: bool) -> object:
            # gathered after the writer, this runs right after its write: the group is open, uncommitted
            if read:
                journal.nonce_seen("did:key:z6MkA", "during")
            try:
                await journal.settled()
            except JournalError as exc:
                return (exc.code, status_of(exc))
            return "answered"

        with full(fs, fs / "journal.sqlite3"):
            _, reader, bystander = await asyncio.gather(writer(), task(True), task(False))
        assert outcome["writer"] == ("journal_write_failed", 507, "storage")
        assert reader == ("journal_write_failed", 507)  # it read a row that was rolled back
        assert bystander == "answered"  # a health check is not failed by others' writes
        assert journal.nonce_seen("did:key:z6MkA", "before")
        assert not journal.nonce_seen("did:key:z6MkA", "during")
        journal.check_and_record("did:key:z6MkA", "after", time.time() + 60)  # space back: writes work


async def test_an_attempt_records_its_outcome_once_the_journal_can_and_holds_its_capacity_meanwhile(
    tmp_path: Path,
) -> None:
    fs = tmp_path / "fs"
    with tmpfs(fs), Journal.open(fs / "journal.sqlite3") as journal:
        ex = ScriptedExecutor()
        sched, ledger = make(journal, ex)
        key = accept(journal, ledger, "j0")
        await sched.start()
        try:
            await until(lambda: ex.running_now() == {"j0"})
            with full(fs, fs / "journal.sqlite3"):
                ex.finish("j0")
                await asyncio.sleep(2.5)  # a few retries of the completion
                assert journal.require(key).state == "running"  # not recorded, not lost
                assert key in ledger and sched.running == [key]
            await until(lambda: journal.require(key).state == "completed", limit=10)
            assert key not in ledger and sched.running == []

            later = accept(journal, ledger, "j1")  # a start the journal cannot record waits too
            with full(fs, fs / "journal.sqlite3"):
                await asyncio.sleep(1.5)
                assert journal.require(later).state == "accepted" and ex.running_now() == set()
            await until(lambda: ex.running_now() == {"j1"}, limit=10)
            ex.finish("j1")
            await until(lambda: journal.require(later).state == "completed", limit=10)
        finally:
            await sched.stop()
