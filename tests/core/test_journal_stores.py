"""The journal's stores beside the job moves: the capacity ledger and its reads, the replay cache, payments
and chain transactions.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from core.errors import ConflictError
from core.journal import JOB_STATES, Event, JobRecord, Journal
from core.journal.schema import (
    _SQL_ACTIVE_COUNT,
    _SQL_COUNT_BY_STATE,
    _SQL_DUE_QUOTES,
    _SQL_EVENTS,
    _SQL_FIND,
    _SQL_HELD,
    _SQL_HOLDING,
    _SQL_LAST_EXPIRY_SOURCE,
)
from tests.core.journal_support import ISS, OTHER_ISS, QUOTE_TTL, ROUTES, T0, Clock, make_job, step

# --------------------------------------------------------------------------------------------- capacity


def test_held_resources_and_active_count(journal: Journal, path: Path, clock: Clock) -> None:
    live = make_job(journal, 1, cpus=1, memory_mb=100, gpus=0).id
    lapsing = make_job(journal, 2, expires_at=T0 + 10, cpus=2, memory_mb=200).id
    accepted = make_job(journal, 3, cpus=4, memory_mb=400, gpus=1).id
    step(journal, accepted, "accepted")
    running = make_job(journal, 4, iss=OTHER_ISS, cpus=8, memory_mb=800).id
    step(journal, running, "accepted")
    step(journal, running, "running")
    done = make_job(journal, 5).id
    for to in ROUTES["completed"]:
        step(journal, done, to)
    cancelled = make_job(journal, 6).id
    step(journal, cancelled, "cancelled")

    held = sorted(journal.held_resources(T0))
    assert held == sorted(
        [
            (live, 1.0, 100, 0, T0 + QUOTE_TTL, ISS),
            (lapsing, 2.0, 200, 0, T0 + 10, ISS),
            (accepted, 4.0, 400, 1, None, ISS),  # held until it moves on, not until its old quote's expiry
            (running, 8.0, 800, 0, None, OTHER_ISS),
        ]
    )
    # A quote stops holding the moment it expires, before expire_quotes has even run.
    assert lapsing not in {h[0] for h in journal.held_resources(T0 + 10)}
    assert sorted(j.id for j in journal.holding(T0 + 10)) == [live, accepted, running]
    assert all(j.holds_capacity(T0 + 10) for j in journal.holding(T0 + 10))
    assert journal.active_count(ISS, T0) == 3
    assert journal.active_count(ISS, T0 + 10) == 2
    assert journal.active_count(OTHER_ISS, T0) == 1
    assert journal.active_count("did:key:z6MkNobody", T0) == 0
    clock.t = T0 + 10
    assert journal.active_count(ISS) == 2  # defaults to the journal's clock


def test_expire_quotes(journal: Journal, clock: Clock) -> None:
    soon = make_job(journal, 1, expires_at=T0 + 10).id
    exact = make_job(journal, 2, expires_at=T0 + 20).id
    later = make_job(journal, 3, expires_at=T0 + 30).id
    accepted = make_job(journal, 4, expires_at=T0 + 5).id
    step(journal, accepted, "accepted")
    seen: list[Event] = []
    journal.add_listener(seen.append)

    clock.t = T0 + 20
    expired = journal.expire_quotes(T0 + 20)
    assert sorted(j.id for j in expired) == [soon, exact]
    assert all(j.state == "expired" and j.updated_at == T0 + 20 for j in expired)
    assert {(e.job, e.actor, e.reason, e.from_state, e.to_state) for e in seen} == {
        (soon, "node", "quote expired", "priced", "expired"),
        (exact, "node", "quote expired", "priced", "expired"),
    }
    assert journal.require(later).state == "priced" and journal.require(accepted).state == "accepted"
    assert journal.expire_quotes(T0 + 20) == []
    assert journal.count_by_state()["expired"] == 2


def test_count_by_state_and_list_jobs(journal: Journal) -> None:
    ids = [make_job(journal, n, iss=ISS if n % 2 else OTHER_ISS).id for n in range(6)]
    step(journal, ids[0], "accepted")
    step(journal, ids[1], "rejected")
    counts = journal.count_by_state()
    assert set(counts) == set(JOB_STATES)
    assert (counts["priced"], counts["accepted"], counts["rejected"], counts["settled"]) == (4, 1, 1, 0)
    assert [j.id for j in journal.list_jobs()] == ids
    assert [j.id for j in journal.list_jobs(limit=2)] == ids[:2]
    assert [j.id for j in journal.list_jobs(limit=2, after_id=ids[1])] == ids[2:4]
    assert [j.id for j in journal.list_jobs(state="priced", iss=ISS)] == [ids[3], ids[5]]
    assert [j.id for j in journal.list_jobs(iss=OTHER_ISS, after_id=ids[0])] == [ids[2], ids[4]]


def test_hot_queries_use_indexes(journal: Journal, path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        for sql, params in (
            (_SQL_HELD, (T0,)),
            (_SQL_HOLDING, (T0,)),
            (_SQL_ACTIVE_COUNT, (ISS, T0, 4)),
            (_SQL_DUE_QUOTES, (T0,)),
            (_SQL_FIND, (ISS, "job-1")),
            (_SQL_EVENTS, ("hj_1", 0, 10)),
            (_SQL_LAST_EXPIRY_SOURCE, ("hj_1",)),
            (_SQL_COUNT_BY_STATE, ()),
        ):
            plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            for detail in plan.split(" | "):
                # scanning a subquery's own (bounded) result is not a table scan
                if detail.startswith("SCAN") and detail != "SCAN CONSTANT ROW" and "(subquery-" not in detail:
                    assert "COVERING INDEX" in detail, f"{sql!r} scans a table: {plan}"
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------- replay cache


def test_replay_cache_survives_restart_and_prunes(path: Path, clock: Clock) -> None:
    with Journal.open(path, now=clock) as j:
        assert j.check_and_record(ISS, "nonce-1", T0 + 60) is True
        assert j.check_and_record(ISS, "nonce-1", T0 + 60) is False
        assert j.check_and_record(OTHER_ISS, "nonce-1", T0 + 60) is True
        assert j.check_and_record(ISS, "nonce-2", T0 + 600) is True
    with Journal.open(path, now=clock) as j:
        assert j.check_and_record(ISS, "nonce-1", T0 + 60) is False
        assert j.prune_nonces(T0 + 60) == 0  # exp == now is still live
        assert j.prune_nonces(T0 + 61) == 2
        assert j.check_and_record(ISS, "nonce-2", T0 + 600) is False
        assert j.check_and_record(ISS, "nonce-1", T0 + 60) is True  # forgotten, as its token is expired
        with pytest.raises(ValueError):
            j.check_and_record(ISS, "nonce-3", float("nan"))


def test_active_count_stops_at_the_limit(journal: Journal) -> None:
    for i in range(5):
        make_job(journal, i)
    assert journal.active_count(ISS) == 5
    assert journal.active_count(ISS, limit=3) == 3
    assert journal.active_count(ISS, limit=10) == 5


# -- payments and chain transactions (schema 2) ------------------------------------------------------------


def _accepted_with_payment(j: Journal, n: int = 0) -> JobRecord:
    job = make_job(j, n)
    j.transition(job.id, "accepted", actor="node", reason="accepted")
    j.open_payment(job.id, escrow_job_id=f"0x{n:064x}", terms={"amount": "1250000"}, wait_until=T0 + 600)
    return job


def test_open_payment_is_idempotent_and_only_adds_a_missing_authorization(journal: Journal) -> None:
    job = _accepted_with_payment(journal)
    again = journal.open_payment(job.id, escrow_job_id="0x" + "f" * 64, terms={"other": 1}, wait_until=T0 + 1)
    assert (
        again.terms == {"amount": "1250000"} and again.wait_until == T0 + 600 and again.authorization is None
    )
    auth = {"from": "0xpayer", "signature": "0x01"}
    with_auth = journal.open_payment(job.id, escrow_job_id="x", terms={}, wait_until=0, authorization=auth)
    assert with_auth.authorization == auth
    other = journal.open_payment(job.id, escrow_job_id="x", terms={}, wait_until=0, authorization={"b": 2})
    assert other.authorization == auth  # the first authorization stays


def test_funding_is_decided_once_and_noted_on_the_job(journal: Journal) -> None:
    job = _accepted_with_payment(journal)
    assert [p.job for p in journal.payments_awaiting()] == [job.id]
    journal.set_funding(job.id, "funded", reason="escrow funded", data={"amount": "1250000"})
    assert journal.payments_awaiting() == []
    with pytest.raises(ConflictError) as info:
        journal.set_funding(job.id, "refused", reason="late")
    assert info.value.code == "funding_decided"
    note = journal.events(job.id)[-1]
    assert note.type == "note" and note.data == {"funding": "funded", "amount": "1250000"}


def test_the_database_refuses_a_second_live_transaction_for_one_payment_or_nonce(journal: Journal) -> None:
    job = _accepted_with_payment(journal)
    journal.record_tx(job.id, "release", sender="0xnode", nonce=0, hash="0xa", raw="0x01")
    with pytest.raises(ConflictError) as info:  # same job and purpose while the first may still land
        journal.record_tx(job.id, "release", sender="0xnode", nonce=1, hash="0xb", raw="0x02")
    assert info.value.code == "tx_exists"
    other = _accepted_with_payment(journal, 1)
    with pytest.raises(ConflictError):  # the nonce is taken
        journal.record_tx(other.id, "release", sender="0xnode", nonce=0, hash="0xc", raw="0x03")
    # once the first is known dead (dropped), a new one may be sent, and its nonce is free again
    journal.update_tx("0xa", state="dropped", note="dropped")
    assert journal.next_nonce("0xnode") == 0
    journal.record_tx(job.id, "release", sender="0xnode", nonce=0, hash="0xd", raw="0x04")
    assert journal.next_nonce("0xnode") == 1
    assert [t.state for t in journal.txs(job.id)] == ["dropped", "signed"]
    with pytest.raises(sqlite3.IntegrityError):  # the record is append-only, even to raw SQL
        raw = sqlite3.connect(journal.path)
        with raw:
            raw.execute("DELETE FROM chain_txs")


def test_a_verdict_moves_the_job_and_stores_the_receipt_together_or_not_at_all(journal: Journal) -> None:
    job = _accepted_with_payment(journal)
    with pytest.raises(ConflictError) as info:  # not completed yet: nothing is written
        journal.record_verdict(job.id, "validated", {"receipt": 1}, actor="v", reason="r")
    payment = journal.payment(job.id)
    assert info.value.code == "state_changed" and payment is not None and payment.receipt is None
    journal.transition(job.id, "running", actor="node", reason="run")
    journal.transition(job.id, "completed", actor="node", reason="done", fields={"result_json": {"ok": 1}})
    receipt = {"receipt": {"amount": "1000000"}, "signature": "0x01"}
    record, event = journal.record_verdict(job.id, "validated", receipt, actor="validator", reason="passed")
    assert record.state == "validated" and event.from_state == "completed"
    payment = journal.payment(job.id)
    assert payment is not None and payment.receipt == receipt
    with pytest.raises(ConflictError):
        journal.record_verdict(job.id, "disputed", receipt, actor="validator", reason="again")
    assert journal.payment_totals()["earned"] == 0  # earned once settled, not before
    journal.record_tx(job.id, "release", sender="0xnode", nonce=0, hash="0xa", raw="0x01")
    journal.update_tx("0xa", state="confirmed", gas_used=80_000, gas_price=2)
    journal.transition(job.id, "settled", actor="settlement", reason="released")
    assert journal.payment_totals() == {
        "earned": 1_000_000,
        "gas_fund": 0,
        "gas_release": 160_000,
        "gas_refund": 0,
        "gas_register": 0,
        "gas_leave": 0,
    }
