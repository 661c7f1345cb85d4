"""The validator service's store: one row per job, steps only forward, a stored receipt never replaced,
open rows found again after a reopen, and notices' jti recorded once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from core.errors import JournalError
from validator.verdicts import FILENAME, VerdictStore

NODE = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
RECEIPT = {"receipt": {"job": "hj_a", "passed": True, "amount": "100"}, "signature": "0x" + "11" * 65}


def test_steps_go_forward_and_the_receipt_is_kept_as_signed(tmp_path: Path) -> None:
    store = VerdictStore.open(tmp_path)
    row, created = store.admit(NODE, "hj_a", "http://node.example")
    assert created and row.state == "accepted"
    again, created = store.admit(NODE, "hj_a", "http://elsewhere.example")
    assert not created and again.endpoint == "http://node.example"  # the first notice's endpoint stays
    store.validating(NODE, "hj_a")
    judged = store.judged(NODE, "hj_a", RECEIPT, {"passed": True})
    assert judged.state == "judged" and judged.receipt == RECEIPT
    with pytest.raises(JournalError) as info:  # a second verdict for the job is refused
        store.judged(NODE, "hj_a", {**RECEIPT, "signature": "0x" + "22" * 65}, {"passed": True})
    assert info.value.code == "verdict_state_conflict"
    with pytest.raises(JournalError) as info:  # judging again after the verdict is refused too
        store.validating(NODE, "hj_a")
    retried = store.retry_later(NODE, "hj_a", {"code": "node_unreachable"}, 2.0)
    assert retried.state == "judged" and retried.attempts == 1 and retried.view()["attempts"] == 1
    store.close()

    # even a direct write cannot replace the stored receipt
    conn = sqlite3.connect(tmp_path / FILENAME)
    with pytest.raises(sqlite3.IntegrityError, match="receipt_already_signed"):
        conn.execute("UPDATE notices SET receipt_json = '{}' WHERE job = 'hj_a'")
    conn.close()

    reopened = VerdictStore.open(tmp_path)
    [open_row] = reopened.open_rows()
    assert (open_row.job, open_row.state, open_row.receipt) == ("hj_a", "judged", RECEIPT)
    posted = reopened.posted(NODE, "hj_a")
    assert posted.state == "posted" and posted.receipt == RECEIPT and reopened.open_rows() == []
    assert posted.view() == {"node": NODE, "job": "hj_a", "state": "posted", "verdict": {"passed": True}}
    assert reopened.counts() == {"posted": 1}
    reopened.close()


def test_a_refused_job_ends_without_a_receipt(tmp_path: Path) -> None:
    store = VerdictStore.open(tmp_path)
    store.admit(NODE, "hj_b", "http://node.example")
    store.validating(NODE, "hj_b")
    row = store.refused(NODE, "hj_b", {"code": "terms_not_signable"})
    assert (
        row.state == "refused" and row.receipt is None and row.view()["error"]["code"] == "terms_not_signable"
    )
    with pytest.raises(JournalError):
        store.judged(NODE, "hj_b", RECEIPT, {})
    assert store.open_rows() == []
    store.close()


def test_a_jti_is_recorded_once_and_forgotten_after_it_expires(tmp_path: Path) -> None:
    now = [1_000.0]
    store = VerdictStore.open(tmp_path, now=lambda: now[0])
    assert store.check_and_record(NODE, "jti-00000001", 2_000)
    assert store.nonce_seen(NODE, "jti-00000001")
    assert not store.check_and_record(NODE, "jti-00000001", 2_000)
    assert store.check_and_record("did:key:other", "jti-00000001", 2_000)  # per issuer
    now[0] = 3_000.0
    assert store.check_and_record(NODE, "jti-00000002", 4_000)  # prunes what expired
    assert not store.nonce_seen(NODE, "jti-00000001")
    store.close()
