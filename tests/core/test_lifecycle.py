"""The lifecycle's state groupings agree with its transition table; the journal re-exports them unchanged."""

from __future__ import annotations

import core.journal
import core.lifecycle
from core.lifecycle import (
    CANCELLABLE_STATES,
    CLOSED_STATES,
    ENDED_WITHOUT_RESULT,
    HOLDING_STATES,
    JOB_STATES,
    PAST_ACCEPTANCE_STATES,
    RECEIPT_STATES,
    RESULT_STATES,
    STREAM_END_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    JobState,
)


def reachable(start: JobState, avoiding: frozenset[JobState] = frozenset()) -> set[JobState]:
    """Every state allowed moves lead to from ``start``, never passing through ``avoiding``.

    ``start`` itself is in it only if a way leads back to it.
    """
    seen: set[JobState] = set()
    frontier = list(TRANSITIONS.get(start, ()))
    while frontier:
        state = frontier.pop()
        if state not in seen and state not in avoiding:
            seen.add(state)
            frontier.extend(TRANSITIONS.get(state, ()))
    return seen


def test_a_job_is_cancellable_exactly_where_a_move_to_cancelled_exists() -> None:
    assert {s for s in JOB_STATES if "cancelled" in TRANSITIONS.get(s, ())} == CANCELLABLE_STATES
    assert set(HOLDING_STATES) == CANCELLABLE_STATES


def test_result_and_receipt_states_are_completed_and_what_follows_it() -> None:
    assert reachable("completed") == RECEIPT_STATES  # only a verdict leaves completed
    assert {"completed"} | RECEIPT_STATES == RESULT_STATES
    assert not RESULT_STATES & ENDED_WITHOUT_RESULT
    assert not RESULT_STATES & CANCELLABLE_STATES  # a job with a result is not cancelled any more


def test_the_states_past_acceptance_are_those_no_job_reaches_without_one() -> None:
    unaccepted = {"created"} | reachable("created", avoiding=frozenset({"accepted"}))
    assert unaccepted == {"created", "priced", "rejected", "expired", "cancelled"}
    assert set(JOB_STATES) - unaccepted == PAST_ACCEPTANCE_STATES
    assert not PAST_ACCEPTANCE_STATES & CLOSED_STATES


def test_closed_and_ended_states_take_no_work_forward() -> None:
    assert CLOSED_STATES <= TERMINAL_STATES
    # what leaves a state that ended without a result only starts over: a retry or a re-quote
    assert {dst for src in ENDED_WITHOUT_RESULT for dst in TRANSITIONS.get(src, ())} == {"accepted", "priced"}


def test_an_event_stream_ends_where_nothing_more_comes_without_a_new_request() -> None:
    assert TERMINAL_STATES <= STREAM_END_STATES
    assert {"completed", "expired", "failed"} <= STREAM_END_STATES
    assert not STREAM_END_STATES & {"created", "priced", "accepted", "running"}  # work still under way


def test_the_journal_re_exports_the_lifecycle() -> None:
    for name in core.lifecycle.__all__:
        assert getattr(core.journal, name) is getattr(core.lifecycle, name), name
        assert name in core.journal.__all__, name
