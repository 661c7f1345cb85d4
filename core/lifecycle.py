"""The job lifecycle: every state a job can be in, the moves between them, and the groupings of states.

:data:`TRANSITIONS` is the one definition of the allowed moves; the journal checks it before writing and
copies it into its database, whose trigger refuses any other move. The state groupings below are the
questions the floors above ask of a job's state (may it still be cancelled? has it a result? does its
event stream end here?), named once so that every caller answers them alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal, cast, get_args

__all__ = [
    "CANCELLABLE_STATES",
    "CLOSED_STATES",
    "ENDED_WITHOUT_RESULT",
    "EVENT_TYPES",
    "HOLDING_STATES",
    "JOB_STATES",
    "MAX_EVENT_SEQ",
    "PAST_ACCEPTANCE_STATES",
    "RECEIPT_STATES",
    "RESULT_STATES",
    "STREAM_END_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "EventType",
    "JobState",
    "is_allowed",
]

JobState = Literal[
    "created",
    "priced",
    "accepted",
    "running",
    "completed",
    "validated",
    "settled",
    "disputed",
    "refunded",
    "rejected",
    "expired",
    "cancelled",
    "failed",
]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)

EventType = Literal["transition", "progress", "note"]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)
MAX_EVENT_SEQ: Final = 2**63 - 1
"""The largest event position there can be (SQLite's largest integer); a position beyond names nothing."""

TRANSITIONS: Mapping[JobState, frozenset[JobState]] = MappingProxyType(
    {
        "created": frozenset({"priced", "rejected"}),
        "priced": frozenset({"accepted", "expired", "rejected", "cancelled"}),
        "accepted": frozenset({"running", "cancelled", "failed", "expired"}),
        "running": frozenset({"completed", "failed", "cancelled"}),
        "completed": frozenset({"validated", "disputed"}),
        "validated": frozenset({"settled"}),
        "disputed": frozenset({"refunded"}),
        # A retry, only while the failure is retryable and attempts < the caller's retry budget.
        "failed": frozenset({"accepted"}),
        # A re-quote, only of a quote that expired before it was ever accepted.
        "expired": frozenset({"priced"}),
    }
)
"""Every allowed state change, and the only place they are defined. States absent here have no way out."""

TERMINAL_STATES: frozenset[JobState] = frozenset(s for s in JOB_STATES if not TRANSITIONS.get(s))
"""States no transition leaves. ``failed`` and ``expired`` are final too once no retry or re-quote remains."""

HOLDING_STATES: tuple[JobState, ...] = ("priced", "accepted", "running")
"""States in which a job holds its resources (``priced`` only while its quote is live)."""

CANCELLABLE_STATES: frozenset[JobState] = frozenset(HOLDING_STATES)
"""States a requester may cancel a job from: quoted, accepted or running, with no result yet."""

RESULT_STATES: frozenset[JobState] = frozenset({"completed", "validated", "settled", "disputed", "refunded"})
"""States of a job that produced its result: ``completed`` and every state validation and settlement lead to
from there. Cancelling such a job changes nothing; it is already complete."""

RECEIPT_STATES: frozenset[JobState] = frozenset({"validated", "settled", "disputed", "refunded"})
"""States after a validator's verdict (``validated`` or ``disputed``, then paid out or refunded): the job's
receipt is recorded, and a second verdict is the same receipt again or a conflict."""

ENDED_WITHOUT_RESULT: frozenset[JobState] = frozenset({"cancelled", "expired", "failed"})
"""States of a job that stopped short of a result: cancelled, its quote or acceptance lapsed, or it failed.
Nothing waits on such a job's payment any more (a retry or re-quote, where allowed, starts over)."""

PAST_ACCEPTANCE_STATES: frozenset[JobState] = frozenset(
    {"accepted", "running", "completed", "validated", "settled", "disputed", "refunded", "failed"}
)
"""States of a job that was accepted (and may since have run, ended or failed): it takes no new quote or
acceptance, and submitting it again returns the job as it is."""

CLOSED_STATES: frozenset[JobState] = frozenset({"rejected", "cancelled"})
"""States of a job that was refused or cancelled: it takes neither a quote nor a submission again."""

STREAM_END_STATES: frozenset[JobState] = TERMINAL_STATES | {"expired", "completed", "failed"}
"""States where a job's event stream ends: a terminal state, an expired quote (re-quoting starts anew), a
completed job (its result is ready; validation and settlement are later, separate steps) or a failure that
is not being retried. A result not yet there in any other state is still coming."""


def is_allowed(src: str, dst: str) -> bool:
    """Whether the lifecycle connects ``src`` to ``dst`` (ignoring the retry and re-quote conditions)."""
    return dst in TRANSITIONS.get(cast(JobState, src), frozenset())
