"""One SQLite file opened the way Hearth's side files are: WAL, explicit transactions, shared across threads.

The requester home, the reputation cache and the validator's verdicts each keep a small SQLite file beside
the node's journal (which opens its own with more settings: :mod:`core.journal.engine`). :func:`open_wal`
is the one way they open it; each caller turns a failure into its own error.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal

__all__ = ["open_wal"]


def open_wal(
    path: Path, *, synchronous: Literal["normal", "full"] = "normal", busy_timeout_ms: int = 5000
) -> sqlite3.Connection:
    """Open (creating it and its folder) the SQLite file at ``path`` in WAL mode.

    Autocommit (transactions are the caller's ``BEGIN IMMEDIATE ... COMMIT``), usable from any thread,
    writes waiting up to ``busy_timeout_ms`` for another process. Raises ``sqlite3.Error`` (also when the
    file cannot use WAL) or ``OSError``; nothing is left open on failure.
    """
    if synchronous not in ("normal", "full"):
        raise ValueError(f"synchronous must be 'normal' or 'full', not {synchronous!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
    )
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    except BaseException:
        conn.close()
        raise
    return conn
