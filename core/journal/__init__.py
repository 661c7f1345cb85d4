"""The job journal: SQLite (WAL) record of every job and every state change; the lifecycle's source of truth.

Each fact is committed here *before* the node acts on it (docs/architecture.md), so after a crash the journal
says what was decided and nothing more. Three rules hold by construction:

- The allowed transitions live in one mapping, :data:`~core.lifecycle.TRANSITIONS`. Python checks it before
  writing, and the database checks it again: a ``transitions`` table is filled from the mapping and a
  trigger aborts any ``UPDATE`` of ``jobs.state`` whose (from, to) pair is absent, so not even raw SQL can
  write an illegal move.
- The ``events`` table is append-only (triggers abort ``UPDATE`` and ``DELETE``); replaying a job's
  ``transition`` events in ``seq`` order always ends at its current state.
- Every write is whole or absent after a crash: one short ``BEGIN IMMEDIATE ... COMMIT``, or a savepoint in a
  group transaction that concurrent requests share and that commits before any of them is answered
  (:meth:`Journal.batched`).

Capacity is not stored separately: a job holds its ``cpus``/``memory_mb``/``gpus`` while it is ``priced``
with a live quote, ``accepted`` or ``running``; :meth:`Journal.held_resources` derives the ledger from that.

The :class:`Journal` is synchronous and owns one connection; it is meant to be called from the event loop
thread, each call costing tens of microseconds. No ``sqlite3`` exception leaves this package: they become
:class:`~core.errors.JournalError` (``journal_write_failed``, retryable) at the boundary.

Inside, one module per concern: ``records`` (the records handed out, value checks), ``schema`` (tables,
statements, migrations), ``commit`` and ``engine`` (the connection, writes, group commits, listeners,
checkpoints), and one store per aggregate over the engine: ``jobs``, ``nonces``, ``payments`` (payments and
chain transactions), ``webhooks`` (the outbox cursor), ``notices`` (validation notices) and ``overview``
(the operator's reads).
:class:`Journal` is all the stores over one engine, so one group commit spans every table. Import from
here, not from those modules; the lifecycle itself (states, transitions, state groupings) is
:mod:`core.lifecycle`, re-exported.
"""

from __future__ import annotations

from core.journal.engine import DEFAULT_BUSY_TIMEOUT_MS
from core.journal.jobs import JobStore
from core.journal.nonces import NonceStore
from core.journal.notices import NoticeDue, NoticeStore
from core.journal.overview import OverviewStore
from core.journal.payments import PaymentStore
from core.journal.records import (
    REGISTRY_PURPOSES,
    TX_OPEN_STATES,
    Event,
    FundingState,
    HeldResources,
    JobFields,
    JobRecord,
    Listener,
    PaymentRecord,
    TxPurpose,
    TxRecord,
    TxState,
    WebhookDue,
)
from core.journal.schema import SCHEMA_VERSION
from core.journal.webhooks import WebhookStore
from core.lifecycle import (
    CANCELLABLE_STATES,
    CLOSED_STATES,
    ENDED_WITHOUT_RESULT,
    EVENT_TYPES,
    HOLDING_STATES,
    JOB_STATES,
    MAX_EVENT_SEQ,
    PAST_ACCEPTANCE_STATES,
    RECEIPT_STATES,
    RESULT_STATES,
    STREAM_END_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    EventType,
    JobState,
    is_allowed,
)

__all__ = [
    "CANCELLABLE_STATES",
    "CLOSED_STATES",
    "DEFAULT_BUSY_TIMEOUT_MS",
    "ENDED_WITHOUT_RESULT",
    "EVENT_TYPES",
    "HOLDING_STATES",
    "JOB_STATES",
    "MAX_EVENT_SEQ",
    "PAST_ACCEPTANCE_STATES",
    "RECEIPT_STATES",
    "REGISTRY_PURPOSES",
    "RESULT_STATES",
    "SCHEMA_VERSION",
    "STREAM_END_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "TX_OPEN_STATES",
    "Event",
    "EventType",
    "FundingState",
    "HeldResources",
    "JobFields",
    "JobRecord",
    "JobState",
    "Journal",
    "Listener",
    "NoticeDue",
    "PaymentRecord",
    "TxPurpose",
    "TxRecord",
    "TxState",
    "WebhookDue",
    "is_allowed",
]


class Journal(PaymentStore, JobStore, NonceStore, WebhookStore, NoticeStore, OverviewStore):
    """The durable job journal. Open with :meth:`open`; close with :meth:`close` or a ``with`` block.

    Every store's methods over the one engine: jobs and events, replay nonces, payments and chain
    transactions, webhook cursors, validation notices and the operator's reads. Writes of any of them
    made inside one :meth:`batched` block share the group commit, so they are committed together or not
    at all.

    All methods are synchronous and short (one indexed query or one small transaction). They are safe to
    call from several threads, but are designed for the event loop thread.
    """
