"""The journal's engine: the one connection, its writes and reads, group commits, listeners, checkpoints.

Every store of the journal (jobs, nonces, payments and transactions, webhooks, the overview's reads) is a
subclass of :class:`JournalEngine` and writes only through :meth:`JournalEngine._write`, so a group commit
spans them all: :class:`~core.journal.Journal` is all of them over one engine.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, Self

from core.errors import JournalError
from core.journal.commit import (
    _BATCH,
    _READ_IN_GROUP,
    _Batch,
    _Checkpointer,
    _Group,
    _Txn,
    _write_error,
)
from core.journal.records import Event, Listener
from core.journal.schema import _SQL_INSERT_EVENT, _prepare_schema
from core.lifecycle import EventType, JobState

__all__ = ["DEFAULT_BUSY_TIMEOUT_MS", "JournalEngine"]

logger = logging.getLogger("hearth.journal")

DEFAULT_BUSY_TIMEOUT_MS: Final = 2000
# Keeps the WAL file from growing without bound after a burst of writes.
_JOURNAL_SIZE_LIMIT_BYTES: Final = 64 * 1024 * 1024


class JournalEngine:
    """The journal's connection and transactions; the stores add the tables' methods on top of it.

    Open with :meth:`open`; close with :meth:`close` or a ``with`` block. All methods are synchronous and
    short (one indexed query or one small transaction). They are safe to call from several threads, but
    are designed for the event loop thread.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, now: Callable[[], float]) -> None:
        """Use :meth:`open`; this wraps an already configured connection."""
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._now = now
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self._group: _Group | None = None  # the open group commit (see batched())
        self._checkpointer: _Checkpointer | None = None

    # ----------------------------------------------------------------------------------------- lifetime

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        synchronous: Literal["normal", "full"] = "normal",
        now: Callable[[], float] = time.time,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> Self:
        """Open (creating if needed) the journal at ``path``.

        ``synchronous="normal"`` survives a crash of the daemon; ``"full"`` also survives a power cut, at the
        cost of an fsync per commit. ``busy_timeout_ms`` bounds how long a write waits for another process
        holding the database (e.g. an operator's sqlite3 shell) before it fails as ``journal_write_failed``;
        the wait blocks the calling thread. Opening reads no job rows, so it stays fast however large the
        journal. Raises :class:`JournalError`: ``journal_open_failed`` when the file is not a usable SQLite
        database, ``journal_schema_mismatch`` when it was written by another schema version.
        """
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
        conn: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                path,
                timeout=busy_timeout_ms / 1000,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
                check_same_thread=False,
                cached_statements=256,
            )
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise JournalError("journal_open_failed", f"{path}: cannot use WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT_BYTES}")
            # Each write in a group commit is a savepoint, whose undo copies (a few 4 KiB pages a write)
            # SQLite keeps in a statement journal; past 64 KiB in a transaction it spills them to a temporary
            # file (created, written and unlinked per group). In memory they cost a copy and no system call.
            conn.execute("PRAGMA temp_store = MEMORY")
            _prepare_schema(conn, path)
        except (sqlite3.Error, OSError) as exc:
            if conn is not None:
                conn.close()
            raise JournalError(
                "journal_open_failed", f"cannot open the journal at {path}: {exc}", retryable=False
            ) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return cls(conn, path, now)

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        """Commit a pending group, then close; later calls raise ``journal_closed``; twice is harmless."""
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()
        with self._lock:
            group = self._group
            if group is not None:
                with suppress(JournalError):
                    self._commit_group(group)
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- listeners

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(event)`` after each commit, once per new event, in ``seq`` order.

        A listener runs on the writer's thread and must be quick; an exception it raises is logged and
        swallowed so that a broken subscriber can never undo or block a recorded fact.
        """
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        with suppress(ValueError):
            self._listeners.remove(callback)

    def _notify(self, events: list[Event]) -> None:
        for event in events:
            for listener in tuple(self._listeners):
                try:
                    listener(event)
                except Exception:
                    logger.exception("journal listener %r failed on event %d", listener, event.seq)

    # ----------------------------------------------------------------------------------------- plumbing

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError("journal_closed", "the journal is closed", retryable=False)
        return self._conn

    @contextmanager
    def _write(self, *, one_statement: bool = False) -> Iterator[_Txn]:
        """One write, whole or not at all; listeners are told after it is committed.

        Alone, a write is one ``BEGIN IMMEDIATE ... COMMIT``. Inside :meth:`batched` (on the loop's thread) it
        joins the open group transaction as a savepoint and is committed with the group. Any other write
        while a group is open joins it too and commits the whole group at once, so that a caller outside
        a batch still finds its write durable when the call returns. ``one_statement``: the write is a
        single statement, which SQLite already applies whole or not at all; in a group it needs no
        savepoint of its own.
        """
        batch = _BATCH.get()
        deferred = batch is not None and batch.journal is self and batch.thread == threading.get_ident()
        with self._lock:
            conn = self._connection()
            if deferred or self._group is not None:
                group = self._group if self._group is not None else self._open_group(conn)
                txn = _Txn(conn)
                savepoint = not one_statement
                try:
                    if savepoint:
                        conn.execute("SAVEPOINT hearth_write")
                    yield txn
                    if savepoint:
                        conn.execute("RELEASE hearth_write")
                except BaseException as exc:
                    self._undo_savepoint(conn, group, exc, savepoint)
                    if isinstance(exc, sqlite3.Error):
                        raise _write_error(exc) from exc
                    raise
                group.events.extend(txn.events)
                if deferred:
                    assert batch is not None
                    if not batch.groups or batch.groups[-1] is not group:
                        batch.groups.append(group)
                    return
                events = self._commit_group(group)
            else:
                txn = _Txn(conn)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise _write_error(exc) from exc
                try:
                    yield txn
                    conn.execute("COMMIT")
                except BaseException as exc:
                    if conn.in_transaction:
                        with suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.Error):
                        raise _write_error(exc) from exc
                    raise
                events = txn.events
        self._notify(events)

    # ----------------------------------------------------------------------------------------- group commit

    @asynccontextmanager
    async def batched(self) -> AsyncIterator[None]:
        """Let this task's writes share one commit with those of other tasks in the same loop iteration.

        Within the block, a write returns once it is written into the open group transaction; the group
        commits from the event loop right after the tasks that are ready have run (one ``COMMIT`` for
        many requests, not one each). On the way out the block waits until everything the task wrote is
        committed, so nothing is answered before it is durable; a failed commit raises ``JournalError``
        (``journal_write_failed``) here or from :meth:`committed`. Only writes made on the loop's thread
        are deferred; any other write commits the open group at once.
        """
        batch = _Batch(self, threading.get_ident())
        token = _BATCH.set(batch)
        try:
            yield
        finally:
            _BATCH.reset(token)
            await self._wait(batch)

    async def committed(self) -> None:
        """Inside :meth:`batched`: wait until this task's writes so far are committed (raises if not)."""
        batch = _BATCH.get()
        if batch is not None and batch.journal is self:
            await self._wait(batch)

    async def settled(self) -> None:
        """Wait for the open group commit, if any (a reader about to answer with what it read).

        A failed commit is raised only to a task that read while that group was open, since what it read
        may have been rolled back. Any other task (a health check, a reader of committed rows) is not
        failed by writes that were not its own, e.g. other requests' writes on a full disk.
        """
        group = self._group
        if group is not None and group.thread == threading.get_ident():
            with suppress(JournalError):
                await self._until(group)
        seen = _READ_IN_GROUP.get()
        if seen is not None and seen.thread == threading.get_ident():
            await self._until(seen)

    @classmethod
    async def _wait(cls, batch: _Batch) -> None:
        groups, batch.groups = batch.groups, []
        for group in groups:
            await cls._until(group)

    @staticmethod
    async def _until(group: _Group) -> None:
        """Wait until ``group`` is committed; raise its error if the commit failed.

        Like ``asyncio.shield(group.done)``: a cancelled waiter leaves the group alone (its writes are
        committed anyway), but the task waits on a future of its own that the commit resolves directly,
        where a shield goes through two more callbacks of the event loop per wait.
        """
        if not group.done.done():
            waiter = group.loop.create_future()
            group.waiters.append(waiter)
            await waiter
        return group.done.result()

    def _open_group(self, conn: sqlite3.Connection) -> _Group:
        loop = asyncio.get_running_loop()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _write_error(exc) from exc
        group = _Group(loop, threading.get_ident(), loop.create_future())
        self._group = group
        loop.call_soon(self._commit_scheduled, group)
        return group

    def _commit_scheduled(self, group: _Group) -> None:
        with suppress(JournalError):  # the members get the error from their future
            with self._lock:
                events = self._commit_group(group)
            self._notify(events)

    def _commit_group(self, group: _Group) -> list[Event]:
        """Commit ``group`` (lock held) if it is still open; returns its events for the listeners."""
        if self._group is not group:
            return []
        self._group = None
        conn = self._connection()
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = _write_error(exc)
            self._resolve(group, error)
            raise error from exc
        self._resolve(group, None)
        return group.events

    def _undo_savepoint(
        self, conn: sqlite3.Connection, group: _Group, exc: BaseException, savepoint: bool
    ) -> None:
        """Undo one failed write of ``group``; should SQLite have dropped the whole transaction, fail it."""
        if conn.in_transaction and not savepoint:
            return  # one statement: SQLite undid it alone
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK TO hearth_write")
                conn.execute("RELEASE hearth_write")
                return
            except sqlite3.Error:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
        if self._group is group:
            self._group = None
            full = _write_error(exc) if isinstance(exc, sqlite3.Error) else None
            if isinstance(exc, JournalError):
                error: BaseException = exc
            elif full is not None and full.domain == "storage":
                error = full  # a full disk: every writer of the group is told so, not of a bug
            else:
                error = JournalError("journal_write_failed", f"the journal dropped a transaction: {exc}")
            self._resolve(group, error)

    @staticmethod
    def _resolve(group: _Group, error: BaseException | None) -> None:
        def settle() -> None:
            if group.done.done():
                return
            if error is None:
                group.done.set_result(None)
            else:
                group.done.set_exception(error)
                if group.waiters:
                    group.done.exception()  # told to its waiters (as a shield marks it retrieved)
            for waiter in group.waiters:
                if not waiter.done():  # a cancelled waiter is done already
                    waiter.set_result(None)

        if threading.get_ident() == group.thread:
            settle()
        else:
            with suppress(RuntimeError):  # the loop is gone: nobody is waiting
                group.loop.call_soon_threadsafe(settle)

    # ----------------------------------------------------------------------------------------- checkpoints

    def checkpoint_in_background(self, interval_seconds: float = 0.5) -> None:
        """Move WAL checkpoints off the writers: a thread with its own connection copies committed pages
        into the database every ``interval_seconds``; commits then only append to the WAL."""
        if self._checkpointer is None:
            with self._lock:
                self._connection().execute("PRAGMA wal_autocheckpoint = 0")
            self._checkpointer = _Checkpointer(self._path, interval_seconds)

    # ----------------------------------------------------------------------------------------- reads, events

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            if self._group is not None:
                _READ_IN_GROUP.set(self._group)
            try:
                yield conn
            except sqlite3.Error as exc:
                raise JournalError("journal_read_failed", f"the journal could not be read: {exc}") from exc

    def _append(
        self,
        txn: _Txn,
        job: str,
        at: float,
        type: EventType,
        from_state: JobState | None,
        to_state: JobState | None,
        actor: str,
        reason: str,
        domain: str | None = None,
        retryable: bool | None = None,
        data_json: str | None = None,
    ) -> Event:
        """Append one event inside the write ``txn``; listeners hear of it once that write commits."""
        flag = None if retryable is None else int(retryable)
        cur = txn.conn.execute(
            _SQL_INSERT_EVENT, (job, at, type, from_state, to_state, actor, reason, domain, flag, data_json)
        )
        seq = cur.lastrowid
        assert seq is not None
        event = Event(seq, job, at, type, from_state, to_state, actor, reason, domain, retryable, data_json)
        txn.events.append(event)
        return event
