"""Group commits: concurrent requests' writes share one commit, across every store, and fail or land together;
the WAL is checkpointed off the writers.
"""

from __future__ import annotations

import asyncio
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConflictError, JournalError
from core.journal import Journal
from tests.core.journal_support import ISS, T0, Clock, make_job, node_id


def _nonce_rows(path: Path, jti: str) -> int:
    """Nonce rows as another connection sees them: only what is committed."""
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM nonces WHERE jti = ?", (jti,)).fetchone()[0])
    finally:
        conn.close()


def _count_commits(j: Journal) -> list[str]:
    """The COMMITs the journal's connection runs from now on."""
    seen: list[str] = []
    j._connection().set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


async def test_batched_writes_of_concurrent_tasks_share_one_commit(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        commits = _count_commits(j)
        answered: list[int] = []

        async def request(n: int) -> None:
            async with j.batched():
                assert j.check_and_record(ISS, f"jti-b{n}", T0 + 60) is True
                make_job(j, n)
                # written into the open group: this connection sees it, another does not yet
                assert j.get(node_id(n)) is not None
                assert _nonce_rows(path, f"jti-b{n}") == 0
            # the block ended: committed, so the answer may leave
            assert _nonce_rows(path, f"jti-b{n}") == 1
            answered.append(n)

        await asyncio.gather(*(request(n) for n in range(1, 6)))
        assert sorted(answered) == [1, 2, 3, 4, 5]
        assert commits == ["COMMIT"]  # five requests, one commit
        assert j.check_and_record(ISS, "jti-b1", T0 + 60) is False  # a replay, also after the group


async def test_a_failed_write_in_a_group_is_undone_alone(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        make_job(j, 1)
        outcomes: dict[str, object] = {}

        async def duplicate() -> None:
            async with j.batched():
                j.check_and_record(ISS, "jti-dup", T0 + 60)
                try:
                    make_job(j, 1)  # job-1 exists: this write is rolled back, its savepoint alone
                except ConflictError as exc:
                    outcomes["dup"] = exc.code

        async def fresh() -> None:
            async with j.batched():
                make_job(j, 2)
            outcomes["fresh"] = "ok"

        await asyncio.gather(duplicate(), fresh())
        assert outcomes == {"dup": "job_exists", "fresh": "ok"}
        assert _nonce_rows(path, "jti-dup") == 1  # the nonce written before the failed write stays
        assert [e.to_state for e in j.events(node_id(2))] == ["created", "priced"]
        assert [e.to_state for e in j.events(node_id(1))] == ["created", "priced"]  # nothing doubled


async def test_a_write_outside_a_batch_commits_the_open_group_at_once(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        seen: list[int] = []
        j.add_listener(lambda event: seen.append(event.seq))
        async with j.batched():
            make_job(j, 1)
            assert seen == [] and _nonce_rows(path, "jti-x") == 0
            # e.g. the scheduler, in a task of its own: its write must be durable when it returns
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: j.check_and_record(ISS, "jti-x", T0 + 60)
            )
            assert _nonce_rows(path, "jti-x") == 1
            assert len(j.events(node_id(1))) == 2
            conn = sqlite3.connect(path)
            assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2  # the group went too
            conn.close()
            assert seen == [1, 2]  # listeners heard the group's events once it committed


async def test_a_failed_group_commit_fails_every_member_and_keeps_nothing(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        errors: list[str] = []

        async def request(n: int, orphan: bool) -> None:
            try:
                async with j.batched():
                    make_job(j, n)
                    if orphan:  # a constraint checked only at COMMIT makes the whole group fail there
                        j._connection().execute("PRAGMA defer_foreign_keys = ON")
                        with j._write() as txn:
                            txn.conn.execute(
                                "INSERT INTO events (job, at, type, actor, reason) "
                                "VALUES ('hj_missing', 0, 'note', 'test', 'orphan')"
                            )
            except JournalError as exc:
                errors.append(exc.code)

        await asyncio.gather(request(1, False), request(2, True))
        assert errors == ["journal_write_failed", "journal_write_failed"]
        assert j.get(node_id(1)) is None and j.get(node_id(2)) is None
        make_job(j, 3)  # the journal takes writes again
        assert j.get(node_id(3)) is not None


def _committed(path: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    """Rows as another connection sees them: only what is committed."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _accepted_with_payment(j: Journal, n: int) -> str:
    id = make_job(j, n).id
    j.transition(id, "accepted", actor="node", reason="accepted")
    j.open_payment(id, escrow_job_id=f"0x{n:064x}", terms={"amount": "1250000"}, wait_until=T0 + 600)
    return id


async def _nonce_move_and_tx(j: Journal, id: str, n: int, *, fail_at_commit: bool) -> None:
    """In one batch: a replay nonce, a job's move with an event, a payment's funding and a signed tx."""
    async with j.batched():
        assert j.check_and_record(ISS, f"jti-span-{n}", T0 + 60) is True
        j.transition(id, "running", actor="node", reason="started")
        j.set_funding(id, "funded", reason="escrow funded")
        j.record_tx(id, "release", sender="0xnode", nonce=n, hash=f"0x{n:02x}", raw="0x01")
        assert j.require(id).state == "running" and len(j.txs(id)) == 1  # this connection sees the group
        assert _nonce_rows(j.path, f"jti-span-{n}") == 0  # another does not, until the group commits
        if fail_at_commit:  # a constraint checked only at COMMIT: the whole group fails there
            j._connection().execute("PRAGMA defer_foreign_keys = ON")
            j.append_event(id, "note", "a write of the same group")
            with j._write() as txn:
                txn.conn.execute(
                    "INSERT INTO events (job, at, type, actor, reason) "
                    "VALUES ('hj_missing', 0, 'note', 'test', 'orphan')"
                )


async def test_one_group_commit_spans_every_store(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        landed, lost = _accepted_with_payment(j, 1), _accepted_with_payment(j, 2)
        events_before = _committed(path, "SELECT COUNT(*) FROM events")[0][0]
        heard: list[int] = []
        j.add_listener(lambda event: heard.append(event.seq))
        commits = _count_commits(j)

        await _nonce_move_and_tx(j, landed, 1, fail_at_commit=False)
        assert commits == ["COMMIT"]  # nonces, jobs, events, payments and chain_txs: one commit
        assert _nonce_rows(path, "jti-span-1") == 1
        assert _committed(path, "SELECT state FROM jobs WHERE id = ?", landed) == [("running",)]
        assert _committed(path, "SELECT funding FROM payments WHERE job = ?", landed) == [("funded",)]
        assert _committed(path, "SELECT hash, state FROM chain_txs WHERE job = ?", landed) == [
            ("0x01", "signed")
        ]
        assert len(heard) == 3  # the transition, the funding note and the tx note, once committed

        del heard[:]
        with pytest.raises(JournalError) as info:
            await _nonce_move_and_tx(j, lost, 2, fail_at_commit=True)
        assert info.value.code == "journal_write_failed"
        assert heard == []  # nothing is announced of a group that did not commit
        for sql, want in (
            ("SELECT COUNT(*) FROM nonces WHERE jti = 'jti-span-2'", [(0,)]),
            ("SELECT state FROM jobs WHERE id = ?", [("accepted",)]),
            ("SELECT funding FROM payments WHERE job = ?", [("awaiting",)]),
            ("SELECT COUNT(*) FROM chain_txs WHERE job = ?", [(0,)]),
        ):
            assert _committed(path, sql, *([lost] if "?" in sql else [])) == want, sql
        assert _committed(path, "SELECT COUNT(*) FROM events")[0][0] == events_before + 3
        # the journal itself reads the same: the group was rolled back, not only left uncommitted
        assert j.require(lost).state == "accepted" and j.txs(lost) == [] and j.next_nonce("0xnode") == 2
        assert j.check_and_record(ISS, "jti-span-2", T0 + 60) is True  # the nonce was never kept


def _wal_frames(path: Path) -> tuple[int, int]:
    """``(frames in the WAL, frames of them already copied into the database)``, as SQLite's shared
    wal-index (the ``-shm`` file, native byte order) records them: ``mxFrame`` at byte 16 of its header,
    ``nBackfill`` at byte 96. Reading it takes no lock and checkpoints nothing."""
    head = path.with_name(path.name + "-shm").read_bytes()[:100]
    (version,) = struct.unpack_from("=I", head, 0)
    assert version == 3007000, f"unknown wal-index format {version}"  # the only one since SQLite 3.7.0
    (frames,) = struct.unpack_from("=I", head, 16)
    (backfilled,) = struct.unpack_from("=I", head, 96)
    return frames, backfilled


def _wal_restarts(path: Path) -> int:
    """The WAL header's checkpoint sequence number (big-endian, byte 12): +1 each time a write starts
    the WAL over from its first frame."""
    (restarts,) = struct.unpack_from(">I", path.with_name(path.name + "-wal").read_bytes()[:16], 12)
    return int(restarts)


def _caught_up(path: Path, limit: float = 30.0) -> None:
    """Wait (no writes meanwhile) until a checkpoint copied every frame of the WAL into the database."""
    deadline = time.monotonic() + limit
    while (state := _wal_frames(path))[1] != state[0]:
        assert time.monotonic() < deadline, f"no complete checkpoint within {limit} s: {state}"
        time.sleep(0.01)


def test_background_checkpoints_start_the_wal_over_and_stop_on_close(tmp_path: Path, clock: Clock) -> None:
    unchecked = tmp_path / "a.sqlite3"
    with Journal.open(unchecked, now=clock) as j:
        j._connection().execute("PRAGMA wal_autocheckpoint = 0")  # what the thread replaces
        for n in range(1, 301):
            make_job(j, n)
        appended = unchecked.with_name(unchecked.name + "-wal").stat().st_size

    path = tmp_path / "b.sqlite3"
    wal = path.with_name(path.name + "-wal")
    with Journal.open(path, now=clock) as j:
        j.checkpoint_in_background(interval_seconds=0.02)
        assert "hearth-journal-checkpoint" in {t.name for t in threading.enumerate()}
        # commits no longer checkpoint: every restart below is the thread's work
        assert j._connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        for n in range(1, 101):
            make_job(j, n)
        first, restarts = wal.stat().st_size, _wal_restarts(path)
        for burst in range(4):  # the same 300 writes: 100 first, then bursts of 50, each after a checkpoint
            _caught_up(path)
            for n in range(101 + 50 * burst, 151 + 50 * burst):
                make_job(j, n)
            assert _wal_restarts(path) > restarts  # the burst began at the WAL's first frame
            restarts = _wal_restarts(path)
        # each burst after the first overwrote frames the first one left: the file never grew past it
        assert wal.stat().st_size == first
    assert 2 * first < appended  # without the thread the same writes only append
    assert "hearth-journal-checkpoint" not in {t.name for t in threading.enumerate()}  # close() stopped it
