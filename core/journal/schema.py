"""The journal's database: its tables, triggers and indexes, the statements the stores run, and migrations.

:data:`SCHEMA_VERSION` is the version a new journal is created with; :func:`_prepare_schema` creates it on
first open, brings a journal of an older version up to it (versions 2 and 3 added tables; version 4 rebuilt
``chain_txs`` for the wallet's registry transactions, which belong to no job; version 5 added the validation
notices), refuses one of another, and
re-derives the ``transitions`` table from :data:`~core.lifecycle.TRANSITIONS` on every open.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Final

from core.errors import JournalError
from core.lifecycle import EVENT_TYPES, JOB_STATES, TRANSITIONS

__all__ = ["SCHEMA_VERSION"]

SCHEMA_VERSION: Final = 5

_JOB_COLUMNS: Final = (
    "id, iss, job_id, kind, idem_key, envelope_hash, envelope_json, state, price, quote_id, quote_jwt, "
    "quote_expires_at, cpus, memory_mb, gpus, attempts, failure_domain, failure_code, failure_message, "
    "failure_retryable, result_json, created_at, updated_at"
)
_EVENT_COLUMNS: Final = (
    "seq, job, at, type, from_state, to_state, actor, reason, domain, retryable, data_json"
)


def _sql_list(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


_SCHEMA: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    """CREATE TABLE transitions (
        from_state TEXT NOT NULL,
        to_state TEXT NOT NULL,
        PRIMARY KEY (from_state, to_state)
    ) WITHOUT ROWID""",
    f"""CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        iss TEXT NOT NULL,
        job_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        envelope_hash TEXT NOT NULL,
        envelope_json TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ({_sql_list(JOB_STATES)})),
        price TEXT,
        quote_id TEXT,
        quote_jwt TEXT,
        quote_expires_at REAL,
        cpus REAL NOT NULL CHECK (cpus >= 0),
        memory_mb INTEGER NOT NULL CHECK (memory_mb >= 0),
        gpus INTEGER NOT NULL CHECK (gpus >= 0),
        attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        failure_domain TEXT,
        failure_code TEXT,
        failure_message TEXT,
        failure_retryable INTEGER CHECK (failure_retryable IN (0, 1)),
        result_json TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (iss, job_id)
    )""",
    # (state, quote_expires_at) serves every lookup by state and the live-quote range of held_resources.
    "CREATE INDEX jobs_state ON jobs (state, quote_expires_at)",
    "CREATE INDEX jobs_iss_state ON jobs (iss, state, quote_expires_at)",
    # No AUTOINCREMENT: rows are never deleted (see the triggers), so the rowid already only grows, and
    # AUTOINCREMENT would add a write to sqlite_sequence to every transaction.
    f"""CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        job TEXT NOT NULL REFERENCES jobs (id),
        at REAL NOT NULL,
        type TEXT NOT NULL CHECK (type IN ({_sql_list(EVENT_TYPES)})),
        from_state TEXT,
        to_state TEXT,
        actor TEXT NOT NULL,
        reason TEXT NOT NULL,
        domain TEXT,
        retryable INTEGER CHECK (retryable IN (0, 1)),
        data_json TEXT
    )""",
    "CREATE INDEX events_job ON events (job, seq)",
    """CREATE TABLE nonces (
        iss TEXT NOT NULL,
        jti TEXT NOT NULL,
        exp REAL NOT NULL,
        PRIMARY KEY (iss, jti)
    ) WITHOUT ROWID""",
    "CREATE INDEX nonces_exp ON nonces (exp)",
    """CREATE TRIGGER jobs_insert_created BEFORE INSERT ON jobs
    WHEN NEW.state IS NOT 'created'
    BEGIN SELECT RAISE(ABORT, 'illegal_transition: a job starts as created'); END""",
    """CREATE TRIGGER jobs_transition_guard BEFORE UPDATE OF state ON jobs
    WHEN NEW.state IS NOT OLD.state AND NOT EXISTS (
        SELECT 1 FROM transitions WHERE from_state = OLD.state AND to_state = NEW.state
    )
    BEGIN SELECT RAISE(ABORT, 'illegal_transition'); END""",
    """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events_append_only'); END""",
    """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events_append_only'); END""",
)

# Schema 4: every transaction the node's wallet signs. A payment's (fund, release, refund) belongs to its
# job; a registry transaction (register, leave: the node's own listing) belongs to none.
_CHAIN_TXS_TABLE: Final = """CREATE TABLE chain_txs (
        id INTEGER PRIMARY KEY,
        job TEXT REFERENCES jobs (id),
        purpose TEXT NOT NULL CHECK (purpose IN ('fund', 'release', 'refund', 'register', 'leave')),
        sender TEXT NOT NULL,
        nonce INTEGER NOT NULL CHECK (nonce >= 0),
        hash TEXT NOT NULL UNIQUE,
        raw TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('signed', 'sent', 'mined', 'confirmed', 'reverted', 'dropped')),
        block_number INTEGER,
        block_hash TEXT,
        gas_used INTEGER,
        gas_price INTEGER,
        error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        CHECK ((job IS NULL) = (purpose IN ('register', 'leave')))
    )"""
_CHAIN_TXS_EXTRAS: Final = (
    # One nonce, one transaction (a dropped one gave its nonce back), payments and registry alike; one live
    # transaction per job and purpose: the database itself refuses a second release while the first may
    # still land; and one open registry transaction per wallet: a registration is never sent twice.
    "CREATE UNIQUE INDEX chain_txs_nonce ON chain_txs (sender, nonce) WHERE state != 'dropped'",
    "CREATE UNIQUE INDEX chain_txs_purpose ON chain_txs (job, purpose) "
    "WHERE state NOT IN ('dropped', 'reverted')",
    "CREATE UNIQUE INDEX chain_txs_registry ON chain_txs (sender) "
    "WHERE purpose IN ('register', 'leave') AND state IN ('signed', 'sent', 'mined')",
    "CREATE INDEX chain_txs_state ON chain_txs (state)",
    """CREATE TRIGGER chain_txs_no_delete BEFORE DELETE ON chain_txs
    BEGIN SELECT RAISE(ABORT, 'chain_txs_append_only'); END""",
)
_CHAIN_TXS: Final = (_CHAIN_TXS_TABLE, *_CHAIN_TXS_EXTRAS)

# Schema 2: escrow terms and funding per job, and every transaction the node signs (in the shape of today's
# schema). Applied on creation and as the migration from schema 1.
_SCHEMA_PAYMENTS: Final = (
    """CREATE TABLE payments (
        job TEXT PRIMARY KEY REFERENCES jobs (id),
        escrow_job_id TEXT NOT NULL UNIQUE,
        terms_json TEXT NOT NULL,
        authorization_json TEXT,
        funding TEXT NOT NULL CHECK (funding IN ('awaiting', 'funded', 'refused')),
        wait_until REAL NOT NULL,
        receipt_json TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX payments_funding ON payments (funding)",
    *_CHAIN_TXS,
)
# Webhook delivery: per job with a callback URL, the last transition event the requester has acknowledged.
# The events table is the outbox; this row is the cursor, advanced only after a 2xx (at least once).
_SCHEMA_WEBHOOKS: Final = (
    """CREATE TABLE webhooks (
        job TEXT PRIMARY KEY REFERENCES jobs (id),
        url TEXT NOT NULL,
        delivered_seq INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        next_at REAL NOT NULL,
        last_error TEXT,
        gave_up INTEGER NOT NULL DEFAULT 0 CHECK (gave_up IN (0, 1))
    ) WITHOUT ROWID""",
    "CREATE INDEX webhooks_due ON webhooks (gave_up, next_at)",
)
# Validation notices: per job whose envelope names validation.validator_url, the notice the node owes its
# validator once the job is completed. Delivered at least once (``delivered`` set only after a 2xx) by the
# webhook dispatcher, with the webhooks' backoff and attempts.
_SCHEMA_NOTICES: Final = (
    """CREATE TABLE validation_notices (
        job TEXT PRIMARY KEY REFERENCES jobs (id),
        url TEXT NOT NULL,
        delivered INTEGER NOT NULL DEFAULT 0 CHECK (delivered IN (0, 1)),
        attempts INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        next_at REAL NOT NULL,
        last_error TEXT,
        gave_up INTEGER NOT NULL DEFAULT 0 CHECK (gave_up IN (0, 1))
    ) WITHOUT ROWID""",
    "CREATE INDEX validation_notices_due ON validation_notices (delivered, gave_up, next_at)",
)
_PAYMENT_COLUMNS: Final = (
    "job, escrow_job_id, terms_json, authorization_json, funding, wait_until, receipt_json, "
    "created_at, updated_at"
)
_TX_COLUMNS: Final = (
    "id, job, purpose, sender, nonce, hash, raw, state, block_number, block_hash, gas_used, gas_price, "
    "error, created_at, updated_at"
)
_TX_FIELDS: Final = frozenset({"state", "block_number", "block_hash", "gas_used", "gas_price", "error"})

_SQL_GET: Final = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?"
_SQL_FIND: Final = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE iss = ? AND job_id = ?"
_SQL_STATE: Final = "SELECT state FROM jobs WHERE id = ?"
_SQL_INSERT_JOB: Final = (
    "INSERT INTO jobs (id, iss, job_id, kind, idem_key, envelope_hash, envelope_json, state, "
    "cpus, memory_mb, gpus, attempts, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 'created', ?, ?, ?, 0, ?, ?)"
)
_SQL_INSERT_EVENT: Final = (
    "INSERT INTO events (job, at, type, from_state, to_state, actor, reason, domain, retryable, data_json) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQL_EVENTS: Final = f"SELECT {_EVENT_COLUMNS} FROM events WHERE job = ? AND seq > ? ORDER BY seq LIMIT ?"
_SQL_LAST_EXPIRY_SOURCE: Final = (
    "SELECT from_state FROM events WHERE job = ? AND type = 'transition' AND to_state = 'expired' "
    "ORDER BY seq DESC LIMIT 1"
)
_SQL_DUE_QUOTES: Final = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'priced' AND quote_expires_at <= ?"
# Two indexed ranges joined, rather than one OR that could fall back to scanning every job.
_SQL_HELD: Final = (
    "SELECT id, cpus, memory_mb, gpus, NULL, iss FROM jobs WHERE state IN ('accepted', 'running') "
    "UNION ALL SELECT id, cpus, memory_mb, gpus, quote_expires_at, iss FROM jobs "
    "WHERE state = 'priced' AND quote_expires_at > ?"
)
_SQL_HOLDING: Final = (
    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN ('accepted', 'running') "
    f"UNION ALL SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'priced' AND quote_expires_at > ?"
)
# Counting stops at ?3: the concurrency policy only asks whether a requester reached its limit, and a
# requester with thousands of queued jobs must not make every one of its requests scan them all.
_SQL_ACTIVE_COUNT: Final = (
    "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE iss = ?1 AND ("
    "state IN ('accepted', 'running') OR (state = 'priced' AND quote_expires_at > ?2)) LIMIT ?3)"
)
_SQL_COUNT_BY_STATE: Final = "SELECT state, COUNT(*) FROM jobs GROUP BY state"
_SQL_FAILED_BY_DOMAIN: Final = "SELECT failure_domain, COUNT(*) FROM jobs WHERE state = 'failed' GROUP BY 1"
_SQL_NONCE_INSERT: Final = "INSERT OR IGNORE INTO nonces (iss, jti, exp) VALUES (?, ?, ?)"
_SQL_NONCE_PRUNE: Final = "DELETE FROM nonces WHERE exp < ?"
_SQL_NONCE_SEEN: Final = "SELECT 1 FROM nonces WHERE iss = ? AND jti = ?"


def _rebuild_chain_txs(conn: sqlite3.Connection) -> None:
    """Schema 2 or 3 -> 4 inside the opening transaction: ``chain_txs`` rebuilt with a nullable ``job``, the
    registry purposes and the one-open-registry-transaction index, every row copied as it was.

    SQLite cannot alter a CHECK, so the old table is renamed aside, the new one created with the same
    statement a new journal runs, the rows copied (ids kept), and the old table dropped with its indexes
    and its no-delete trigger (a DROP TABLE deletes no row through a trigger); then today's indexes and
    trigger are made. Nothing outside this table refers to it.
    """
    conn.execute("ALTER TABLE chain_txs RENAME TO chain_txs_old")
    conn.execute(_CHAIN_TXS_TABLE)
    conn.execute(f"INSERT INTO chain_txs ({_TX_COLUMNS}) SELECT {_TX_COLUMNS} FROM chain_txs_old ORDER BY id")
    conn.execute("DROP TABLE chain_txs_old")
    for statement in _CHAIN_TXS_EXTRAS:
        conn.execute(statement)


def _prepare_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema on first open; check its version and re-derive the transitions table otherwise.

    The ``transitions`` table is a copy of :data:`TRANSITIONS` (the one definition), refreshed on every open
    so the database guard and the Python check can never disagree. Reads a handful of rows, never the jobs.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if exists is None:
            for statement in (*_SCHEMA, *_SCHEMA_PAYMENTS, *_SCHEMA_WEBHOOKS, *_SCHEMA_NOTICES):
                conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        else:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = None if row is None else int(row[0])
            # 1 lacks the payment tables (it gets today's), 2 the webhook cursor; 2 and 3 have the chain_txs
            # of payments alone, which 4 rebuilds to take the wallet's registry transactions; 1 to 4 lack
            # the validation notices
            missing = {
                1: (*_SCHEMA_PAYMENTS, *_SCHEMA_WEBHOOKS, *_SCHEMA_NOTICES),
                2: (*_SCHEMA_WEBHOOKS, *_SCHEMA_NOTICES),
                3: _SCHEMA_NOTICES,
                4: _SCHEMA_NOTICES,
            }.get(version or 0)
            if missing is not None:
                for statement in missing:
                    conn.execute(statement)
                if version in (2, 3):
                    _rebuild_chain_txs(conn)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                version = SCHEMA_VERSION
            if version != SCHEMA_VERSION:
                raise JournalError(
                    "journal_schema_mismatch",
                    f"{path} has journal schema {version}, this node reads {SCHEMA_VERSION}",
                    retryable=False,
                )
        wanted = {(src, dst) for src, dsts in TRANSITIONS.items() for dst in dsts}
        stored = set(conn.execute("SELECT from_state, to_state FROM transitions").fetchall())
        if stored != wanted:
            conn.execute("DELETE FROM transitions")
            conn.executemany("INSERT INTO transitions (from_state, to_state) VALUES (?, ?)", sorted(wanted))
        conn.execute("COMMIT")
    except BaseException:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
