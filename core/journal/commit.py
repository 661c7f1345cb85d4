"""The pieces of the journal's transactions: one write, a group commit and a task's share in it, the
checkpoint thread, and the translation of SQLite's errors into :class:`~core.errors.JournalError`.

The journal's engine puts them together; nothing here touches a table, and nothing here imports the engine.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import IllegalTransitionError, JournalError
from core.journal.records import Event

logger = logging.getLogger("hearth.journal")


def _write_error(exc: sqlite3.Error) -> JournalError:
    message = str(exc)
    if message.startswith("illegal_transition"):
        return IllegalTransitionError("illegal_transition", f"the database refused the change: {message}")
    if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL:
        # the operator's problem, not a bug: say so (storage, 507) so clients retry and alerts name the disk
        return JournalError(
            "journal_write_failed",
            "the journal could not record the change: the disk holding it is full",
            domain="storage",
            details={"cause": "disk_full"},
        )
    return JournalError("journal_write_failed", f"the journal could not record the change: {message}")


@dataclass(slots=True)
class _Txn:
    conn: sqlite3.Connection
    events: list[Event] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Group:
    """Writes of concurrent requests sharing one open transaction, committed once (:meth:`Journal.batched`).

    Each write is a savepoint inside it, so a write that fails is undone alone. ``done`` resolves, on the
    event loop, when the commit has happened or failed.
    """

    loop: asyncio.AbstractEventLoop
    thread: int
    done: asyncio.Future[None]
    events: list[Event] = field(default_factory=list)
    # one future per task waiting for the commit (see JournalEngine._until), woken when ``done`` resolves
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class _Batch:
    """One task's share in group commits: the journal, its thread and the groups it wrote into."""

    journal: object  # the engine whose groups these are (compared by identity only)
    thread: int
    groups: list[_Group] = field(default_factory=list)


_BATCH: ContextVar[_Batch | None] = ContextVar("hearth_journal_batch", default=None)
# The open group a task last read from: those rows were not committed yet (see Journal.settled).
_READ_IN_GROUP: ContextVar[_Group | None] = ContextVar("hearth_journal_read_in_group", default=None)


class _Checkpointer:
    """A thread that checkpoints the WAL through its own connection (``PASSIVE``: it never blocks a writer).

    SQLite releases the GIL while it copies pages and syncs the database file, so this runs beside the
    event loop rather than inside the commit that happens to cross the autocheckpoint threshold.
    """

    def __init__(self, path: Path, interval_seconds: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(path, interval_seconds), name="hearth-journal-checkpoint", daemon=True
        )
        self._thread.start()

    def _run(self, path: Path, interval_seconds: float) -> None:
        try:
            conn = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            logger.warning("journal checkpoints: cannot open %s: %s", path, exc)
            return
        try:
            while not self._stop.wait(interval_seconds):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # e.g. a full disk: the WAL keeps the data; try again later
                    logger.warning("journal checkpoint failed: %s", exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
