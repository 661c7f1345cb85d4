"""Journals written by every released schema version open with today's code, migrate, and keep every row.

Each fixture in fixtures/journal/ was written by the journal code of the last commit with that schema
(README.md there names the commits; record.py re-records them). ``vN.json`` beside ``vN.sqlite`` holds
what that code read back from the file it had just written: today's journal must read the same rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import ConflictError, IllegalTransitionError
from core.journal import SCHEMA_VERSION, TRANSITIONS, Journal

FIXTURES = Path(__file__).parent / "fixtures" / "journal"
VERSIONS = (1, 2, 3, 4, 5)
TABLES = {
    1: {"meta", "transitions", "jobs", "events", "nonces"},
    2: {"meta", "transitions", "jobs", "events", "nonces", "payments", "chain_txs"},
    3: {"meta", "transitions", "jobs", "events", "nonces", "payments", "chain_txs", "webhooks"},
    4: {"meta", "transitions", "jobs", "events", "nonces", "payments", "chain_txs", "webhooks"},
    5: {
        *("meta", "transitions", "jobs", "events", "nonces", "payments", "chain_txs", "webhooks"),
        "validation_notices",
    },
}
"""The tables each schema version had: what the fixture must show it was written by."""
NODE_ADDRESS = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"  # the recording's sender of chain transactions
CALLBACK = "https://requester.example/hooks/hearth"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclasses.dataclass
class Recorded:
    """One fixture: a fresh copy of its journal file and what its version's code read back from it."""

    version: int
    path: Path
    expected: dict[str, Any]
    clock: Clock

    def id(self, name: str) -> str:
        return str(self.expected["jobs"][name]["id"])

    def names(self) -> list[str]:
        return sorted(self.expected["jobs"])


@pytest.fixture(params=VERSIONS, ids=[f"schema{v}" for v in VERSIONS])
def recorded(request: pytest.FixtureRequest, tmp_path: Path) -> Recorded:
    version: int = request.param
    path = tmp_path / f"v{version}.sqlite"
    shutil.copyfile(FIXTURES / f"v{version}.sqlite", path)
    expected = json.loads((FIXTURES / f"v{version}.json").read_text())
    # Later than anything recorded, earlier than the live quote's expiry (T0 + 3610).
    return Recorded(version, path, expected, Clock(expected["t0"] + 400.0))


@pytest.fixture
def journal(recorded: Recorded) -> Iterator[Journal]:
    with Journal.open(recorded.path, now=recorded.clock) as j:
        yield j


def _schema_of(path: Path) -> set[tuple[str, str, str, str | None]]:
    conn = sqlite3.connect(path)
    try:
        return set(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall())
    finally:
        conn.close()


def _query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _as_recorded(record: Any, recorded: dict[str, Any]) -> dict[str, Any]:
    """``record``'s fields, limited to those the old code recorded (all of them must still exist)."""
    now = dataclasses.asdict(record)
    assert set(recorded) <= set(now), f"fields gone since the recording: {set(recorded) - set(now)}"
    return {name: now[name] for name in recorded}


def test_each_fixture_is_a_clean_journal_of_its_version(recorded: Recorded) -> None:
    fixture = FIXTURES / f"v{recorded.version}.sqlite"
    assert not Path(f"{fixture}-wal").exists() and not Path(f"{fixture}-shm").exists()
    assert fixture.stat().st_size <= 128 * 1024
    assert recorded.expected["schema_version"] == recorded.version
    assert "+changes" not in recorded.expected["commit"]
    tables = {row[0] for row in _query(recorded.path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == TABLES[recorded.version]
    version = _query(recorded.path, "SELECT value FROM meta WHERE key = 'schema_version'")
    assert version == [(str(recorded.version),)]
    assert _query(recorded.path, "PRAGMA journal_mode") == [("wal",)]  # as a node leaves it


def test_it_migrates_to_the_schema_a_new_journal_has(recorded: Recorded, tmp_path: Path) -> None:
    Journal.open(recorded.path, now=recorded.clock).close()
    fresh = tmp_path / "fresh.sqlite"
    Journal.open(fresh).close()
    assert _schema_of(recorded.path) == _schema_of(fresh)
    assert _query(recorded.path, "SELECT value FROM meta") == [(str(SCHEMA_VERSION),)]
    wanted = {(src, dst) for src, dsts in TRANSITIONS.items() for dst in dsts}
    assert set(_query(recorded.path, "SELECT from_state, to_state FROM transitions")) == wanted
    assert _query(recorded.path, "PRAGMA integrity_check") == [("ok",)]
    assert _query(recorded.path, "PRAGMA foreign_key_check") == []


def test_every_recorded_row_reads_back(recorded: Recorded, journal: Journal) -> None:
    expected = recorded.expected
    for name, job in expected["jobs"].items():
        record = journal.require(job["id"])
        assert _as_recorded(record, job) == job, name
        events = journal.events(job["id"])
        assert [_as_recorded(e, old) for e, old in zip(events, expected["events"][name], strict=True)] == (
            expected["events"][name]
        ), name
        # replaying the transition events still ends at the job's state
        transitions = [e for e in events if e.type == "transition"]
        assert transitions[0].from_state is None and transitions[-1].to_state == record.state, name
        assert all(a.to_state == b.from_state for a, b in itertools.pairwise(transitions))
    assert len(journal.list_jobs(limit=1000)) == len(expected["jobs"])

    for iss, jti, exp in expected["nonces"]:
        assert journal.nonce_seen(iss, jti)
        assert not journal.check_and_record(iss, jti, exp + 3600)  # still refused as a replay
    nonces = _query(recorded.path, "SELECT iss, jti, exp FROM nonces ORDER BY iss, jti")
    assert [list(row) for row in nonces] == expected["nonces"]

    payments = expected.get("payments", {})
    for name in recorded.names():
        payment = journal.payment(recorded.id(name))
        if name in payments:
            assert payment is not None and _as_recorded(payment, payments[name]) == payments[name], name
        else:
            assert payment is None, name
    txs = journal.txs()
    assert [_as_recorded(tx, old) for tx, old in zip(txs, expected.get("txs", []), strict=True)] == (
        expected.get("txs", [])
    )
    webhooks = expected.get("webhooks", {})
    for name in recorded.names():
        assert journal.webhook(recorded.id(name)) == webhooks.get(name), name
    notices = expected.get("notices", {})
    for name in recorded.names():
        assert journal.notice(recorded.id(name)) == notices.get(name), name


def test_the_recorded_facts_mean_what_they_meant(recorded: Recorded, journal: Journal) -> None:
    """A few rows read through today's views, written out by hand rather than taken from the recording."""
    failed = journal.require(recorded.id("failed"))
    assert failed.state == "failed" and failed.failure == {
        "domain": "execution",
        "code": "ffmpeg_failed",
        "message": "ffmpeg exited with status 1",
        "retryable": False,
    }
    retryable = journal.require(recorded.id("retryable"))
    assert retryable.failure is not None and retryable.failure["domain"] == "storage"
    assert retryable.failure["retryable"] is True and retryable.attempts == 0
    succeeded = journal.require(recorded.id("succeeded"))
    assert succeeded.state == ("completed" if recorded.version == 1 else "settled")
    assert succeeded.result is not None and succeeded.result["usage"] == {
        "cpu_seconds": 18.25,
        "wall_seconds": 20.5,
    }
    assert journal.require(recorded.id("quoted")).price == "1.25"
    assert journal.require(recorded.id("expired")).state == "expired"
    assert journal.require(recorded.id("cancelled")).state == "cancelled"
    progress = journal.attempt_progress(recorded.id("running"))
    assert progress is not None and progress.data == {"stage": "transcode", "percent": 40.0, "frames": 480}

    holding = {hold[0] for hold in journal.held_resources()}
    assert holding == {recorded.id("quoted"), recorded.id("running")} | (
        {recorded.id("awaiting")} if recorded.version >= 2 else set()
    )
    failures = journal.failure_counts()
    assert failures[("execution", "ffmpeg_failed")] == 1 and failures[("storage", "fetch_failed")] == 1
    if recorded.version >= 2:
        assert failures[("funding", "funding_refused")] == 1
        assert journal.payment_totals()["earned"] == 1_250_000
        assert journal.payment_totals()["gas_release"] == 61_234 * 1_000_000_007
        assert [p.job for p in journal.payments_awaiting()] == [recorded.id("awaiting")]
        # nonce 2 was dropped: free again; from schema 4 a register (3) and a leave (4) follow it
        assert journal.next_nonce(NODE_ADDRESS) == (5 if recorded.version >= 4 else 2)
    else:
        assert journal.payment_totals() == {
            "earned": 0,
            "gas_fund": 0,
            "gas_release": 0,
            "gas_refund": 0,
            "gas_register": 0,
            "gas_leave": 0,
        }
    registry = journal.txs(purposes=("register", "leave"))
    if recorded.version >= 4:
        assert [(tx.purpose, tx.job, tx.state) for tx in registry] == [
            ("register", None, "confirmed"),
            ("leave", None, "sent"),
        ]
        assert journal.payment_totals()["gas_register"] == 151_234 * 1_000_000_007
        open_tx = journal.registry_tx(NODE_ADDRESS)
        assert open_tx is not None and open_tx.purpose == "leave"
    else:
        assert registry == [] and journal.registry_tx(NODE_ADDRESS) is None
    due = {d.job for d in journal.webhooks_due(recorded.clock.t)}
    if recorded.version >= 3:  # the quoted job's hook gave up; the failed one's retry time has come
        assert due == {recorded.id(n) for n in ("running", "succeeded", "failed", "awaiting")}
    else:
        assert due == set()


def _write_after_migration(recorded: Recorded, j: Journal) -> str:
    """A transition of each kind, a new job with payment, transaction and webhook; returns its id."""
    t0 = recorded.expected["t0"]
    j.transition(
        recorded.id("running"),
        "completed",
        actor="node",
        reason="artifact ipfs://bafkreinew",
        expect="running",
        fields={"result_json": {"artifact_uri": "ipfs://bafkreinew"}},
    )
    retried, _ = j.transition(
        recorded.id("retryable"), "accepted", actor="node", reason="retry", retry_budget=2, expect="failed"
    )
    assert retried.attempts == 1
    with pytest.raises(IllegalTransitionError) as refused:
        j.transition(recorded.id("failed"), "accepted", actor="node", reason="retry", retry_budget=2)
    assert refused.value.code == "failure_not_retryable"
    j.transition(recorded.id("quoted"), "accepted", actor="requester", reason="accepted", expect="priced")
    assert j.check_and_record("did:key:z6MkNew", "jti-new", t0 + 9000)

    new = j.create_priced(
        id="hj_" + "n" * 26,
        iss="did:key:z6MkNew",
        job_id="clip-new",
        kind="ffmpeg_transcode",
        idem_key="1" * 64,
        envelope_hash="2" * 64,
        envelope={"job_id": "clip-new", "kind": "ffmpeg_transcode"},
        price="2.5",
        quote_id="q_new",
        quote_jwt="eyJ.new.sig",
        quote_expires_at=t0 + 1000,
        cpus=1.0,
        memory_mb=512,
        gpus=0,
        actor="did:key:z6MkNew",
        reason="quoted 2.5 USDC",
        callback_url=CALLBACK,
    )
    recorded_seqs = [e["seq"] for events in recorded.expected["events"].values() for e in events]
    assert min(e.seq for e in j.events(new.id)) > max(recorded_seqs)
    j.transition(new.id, "accepted", actor="did:key:z6MkNew", reason="accepted", expect="priced")
    j.open_payment(new.id, escrow_job_id="0x" + "9" * 64, terms={"amount": "2500000"}, wait_until=t0 + 2000)
    j.set_funding(new.id, "funded", reason="escrow funded")
    nonce = j.next_nonce(NODE_ADDRESS)
    j.record_tx(new.id, "fund", sender=NODE_ADDRESS, nonce=nonce, hash="0x" + "7" * 64, raw="0x02")
    j.transition(new.id, "running", actor="node", reason="attempt 1", expect="accepted")
    j.append_event(new.id, "progress", "transcode 10%", {"stage": "transcode", "percent": 10.0})
    assert {d.job for d in j.webhooks_due(recorded.clock.t)} >= {new.id}
    return new.id


def test_new_writes_work_after_migration(recorded: Recorded, journal: Journal) -> None:
    new = _write_after_migration(recorded, journal)
    assert journal.require(recorded.id("running")).state == "completed"
    assert journal.require(recorded.id("retryable")).state == "accepted"
    assert journal.require(new).state == "running"
    assert [tx.purpose for tx in journal.txs(new)] == ["fund"]
    assert journal.webhook(new) == {
        "url": CALLBACK,
        "delivered_seq": 0,
        "attempts": 0,
        "last_error": None,
        "gave_up": False,
    }
    holding = {hold[0] for hold in journal.held_resources()}
    assert {recorded.id("quoted"), recorded.id("retryable"), new} <= holding
    assert recorded.id("running") not in holding


def test_registry_transactions_after_migration(recorded: Recorded, journal: Journal) -> None:
    """A migrated journal takes the wallet's registry transactions: no job, one open per wallet, nonces shared
    with payments; rows recorded before the migration keep their ids and facts."""
    before = journal.txs()
    wallet = "0x90F79bf6EB2c4f870365E96b9E3ab0c7d62C9Ae2"
    payment_nonce = journal.next_nonce(wallet)
    register = journal.record_tx(
        None, "register", sender=wallet, nonce=payment_nonce, hash="0x" + "1" * 64, raw="0x02"
    )
    assert register.job is None and register.state == "signed"
    with pytest.raises(ConflictError) as twice:  # a second registry transaction while the first is open
        journal.record_tx(
            None, "leave", sender=wallet, nonce=payment_nonce + 1, hash="0x" + "2" * 64, raw="0x02"
        )
    assert twice.value.code == "tx_exists"
    with pytest.raises(ValueError):  # a registry transaction belongs to no job, a payment to one
        journal.record_tx(
            recorded.id("quoted"), "register", sender=wallet, nonce=9, hash="0x" + "3" * 64, raw="0x02"
        )
    with pytest.raises(ValueError):
        journal.record_tx(None, "fund", sender=wallet, nonce=9, hash="0x" + "4" * 64, raw="0x02")
    if recorded.version >= 2:  # the nonce is shared with the payment transactions
        with pytest.raises(ConflictError):
            journal.record_tx(
                None, "register", sender=NODE_ADDRESS, nonce=0, hash="0x" + "5" * 64, raw="0x02"
            )
    journal.update_tx(register.hash, state="confirmed", note="register transaction confirmed")
    assert journal.registry_tx(wallet) is None
    leave = journal.record_tx(
        None, "leave", sender=wallet, nonce=payment_nonce + 1, hash="0x" + "6" * 64, raw="0x02"
    )
    assert journal.registry_tx(wallet) == leave
    assert journal.next_nonce(wallet) == payment_nonce + 2
    assert journal.txs()[: len(before)] == before
    with pytest.raises(sqlite3.IntegrityError):  # still append-only after the rebuild
        conn = sqlite3.connect(recorded.path)
        try:
            conn.execute("DELETE FROM chain_txs")
        finally:
            conn.close()


def test_the_migrated_journal_reopens(recorded: Recorded) -> None:
    with Journal.open(recorded.path, now=recorded.clock) as j:
        new = _write_after_migration(recorded, j)
        jobs = j.list_jobs(limit=1000)
        events = {job.id: j.events(job.id) for job in jobs}
        txs = j.txs()
    schema = _schema_of(recorded.path)
    assert not Path(f"{recorded.path}-wal").exists()

    recorded.clock.t += 60
    with Journal.open(recorded.path, now=recorded.clock) as j:
        assert j.list_jobs(limit=1000) == jobs
        assert {job.id: j.events(job.id) for job in jobs} == events
        assert j.txs() == txs
        j.transition(new, "completed", actor="node", reason="artifact ipfs://bafkreiafter", expect="running")
        assert j.require(new).state == "completed"
    assert _schema_of(recorded.path) == schema
    assert _query(recorded.path, "SELECT value FROM meta") == [(str(SCHEMA_VERSION),)]
