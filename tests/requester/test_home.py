"""The requester home (requester/home.py): idempotency keys, pinned nodes, budgets reserved before signing.

Everything here runs against the real SQLite file: reopened as after a restart, held by a process killed
with SIGKILL, and shared by processes and threads reserving at once.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.errors import BudgetError, ConfigError, ConflictError, HearthError
from requester.budgets import Budgets, config_path, load_budgets
from requester.home import RequesterHome, default_path, utc_day
from tests.conftest import REPO

NODE_A, NODE_B = "did:key:z6MkA", "did:key:z6MkB"
URL_A, URL_B = "http://a.example:8000", "http://b.example:8000"
H1, H2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64


class Clock:
    def __init__(self, at: str) -> None:
        self.t = datetime.fromisoformat(at).replace(tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.t


def submitted(
    node: str = NODE_A, endpoint: str = URL_A, job: str = "hj_1", amount: int = 12_000
) -> dict[str, Any]:
    """The JSON of a routing decision that submitted and funded a job (as RoutingDecision.to_json())."""
    return {
        "outcome": "submitted",
        "winner": node,
        "job": {
            "id": job,
            "job_id": "j1",
            "node": node,
            "endpoint": endpoint,
            "state": "accepted",
            "funding": {"terms": {"amount": str(amount)}},
        },
    }


def open_home(tmp_path: Path, clock: Clock | None = None, **budgets: Any) -> RequesterHome:
    return RequesterHome.open(
        default_path(tmp_path), budgets=Budgets(**budgets), now=clock or Clock("2026-12-07T10:00:00")
    )


def test_the_same_key_and_envelope_return_the_recorded_job_after_a_restart(tmp_path: Path) -> None:
    with open_home(tmp_path, per_day=50_000) as home:
        first = home.claim("k1", envelope_hash=H1, job_id="j1", workflow="default")
        assert (first.kind, first.record.state, first.record.attempts, first.decision) == (
            "new",
            "routing",
            1,
            None,
        )
        home.hold("k1", amount=12_000, node=NODE_A, endpoint=URL_A, job="hj_1")
        done = home.finish("k1", submitted(), charge=12_000)
        assert (done.state, done.node, done.endpoint, done.job) == ("submitted", NODE_A, URL_A, "hj_1")
        assert home.reservation("k1") == ("committed", 12_000)
    with open_home(tmp_path, per_day=50_000) as home:  # a restart
        again = home.claim("k1", envelope_hash=H1, job_id="j1", workflow="default")
        assert again.kind == "replay" and again.decision == submitted()
        assert (again.record.job, again.record.node, again.record.attempts) == ("hj_1", NODE_A, 1)
        assert home.left()["per_day"]["left"] == 38_000  # spent once, not twice
        assert [d["outcome"] for d in home.decisions("k1")] == ["submitted"]
        with pytest.raises(ConflictError) as exc:
            home.take("k1")  # a submitted key is never routed again
        assert exc.value.code == "idempotency_key_state"


def test_the_same_key_with_another_envelope_is_a_conflict_and_changes_nothing(tmp_path: Path) -> None:
    with open_home(tmp_path) as home:
        home.claim("k1", envelope_hash=H1, job_id="j1", workflow="default")
        with pytest.raises(ConflictError) as exc:
            home.claim("k1", envelope_hash=H2, job_id="j2", workflow="default")
        err = exc.value
        assert (err.code, err.domain, err.retryable) == ("idempotency_key_conflict", "request", False)
        assert err.details == {
            "key": "k1",
            "job_id": "j1",
            "recorded_envelope_hash": H1,
            "envelope_hash": H2,
            "state": "routing",
        }
        rec = home.record("k1")
        assert rec is not None and (rec.envelope_hash, rec.job_id, rec.attempts) == (H1, "j1", 1)


def test_a_spend_exactly_at_the_budget_passes_and_one_unit_over_is_refused_with_what_is_left(
    tmp_path: Path,
) -> None:
    with open_home(tmp_path, per_day=30_000, workflows={"video": 20_000}) as home:
        home.claim("k1", envelope_hash=H1, job_id="j1", workflow="video")
        home.hold("k1", amount=20_000, node=NODE_A, endpoint=URL_A, job="hj_1")  # the workflow's whole budget
        home.finish("k1", submitted(amount=20_000), charge=20_000)
        home.claim("k2", envelope_hash=H2, job_id="j2", workflow="other")
        with pytest.raises(BudgetError) as exc:
            home.hold("k2", amount=10_001, node=NODE_B, endpoint=URL_B, job="hj_2")
        err = exc.value
        assert (err.code, err.domain, err.retryable) == ("budget_exceeded", "budget", False)
        assert err.details["budget"] == "per_day" and err.details["asked"] == 10_001
        day = err.details["left"]["per_day"]
        assert (day["limit"], day["used"], day["left"], day["left_usdc"]) == (30_000, 20_000, 10_000, "0.01")
        assert day["day"] == "2026-12-07" and day["resets_at"] == "2026-12-08T00:00:00Z"
        assert "workflow" not in err.details["left"]  # 'other' has no budget of its own
        # the refusal left no trace: no reservation, no node pinned
        rec = home.record("k2")
        assert home.reservation("k2") is None and rec is not None and rec.node is None
        home.hold("k2", amount=10_000, node=NODE_B, endpoint=URL_B, job="hj_2")  # exactly what is left
        assert home.left()["per_day"]["left"] == 0
        home.claim("k3", envelope_hash="sha256:" + "3" * 64, job_id="j3", workflow="video")
        with pytest.raises(BudgetError) as exc:
            home.hold("k3", amount=1, node=NODE_A, endpoint=URL_A, job="hj_3")
        assert exc.value.details["budget"] == "per_day"
        assert exc.value.details["left"]["workflow"] == {
            "name": "video",
            "limit": 20_000,
            "used": 20_000,
            "left": 0,
            "limit_usdc": "0.02",
            "used_usdc": "0.02",
            "left_usdc": "0",
        }


def test_a_refused_or_failed_job_releases_its_reservation(tmp_path: Path) -> None:
    with open_home(tmp_path, workflows={"video": 10_000}, attempts_per_key=5) as home:
        home.claim("k1", envelope_hash=H1, job_id="j1", workflow="video")
        home.hold("k1", amount=10_000, node=NODE_A, endpoint=URL_A, job="hj_1")
        assert home.left("video")["workflow"]["left"] == 0
        refused = [{"node": NODE_A, "step": "accept", "outcome": "refused"}]
        rec = home.finish("k1", {"outcome": "no_provider", "job": None, "attempts": refused})
        assert rec.state == "failed" and not rec.sticky and home.reservation("k1") == ("released", 10_000)
        assert home.left("video")["workflow"]["left"] == 10_000
        again = home.take("k1")  # refused before the node took it: the key may go to any node
        assert (again.state, again.attempts, again.node) == ("routing", 2, None)
        home.hold("k1", amount=8_000, node=NODE_B, endpoint=URL_B, job="hj_1")
        accepted = [
            {"node": NODE_B, "step": "accept", "outcome": "ok"},
            {"node": NODE_B, "step": "fund", "outcome": "refused"},
        ]
        job_b = submitted(NODE_B, URL_B)["job"]
        rec = home.finish("k1", {"outcome": "funding_failed", "job": job_b, "attempts": accepted})
        assert (rec.state, rec.node, rec.sticky) == ("failed", NODE_B, True)  # node B took the job
        assert home.reservation("k1") == ("released", 8_000)
        third = home.take("k1")
        assert (third.node, third.attempts) == (NODE_B, 3)  # so the key stays there
        with pytest.raises(ConflictError):
            home.hold("k1", amount=8_000, node=NODE_A, endpoint=URL_A, job="hj_1")
        home.hold("k1", amount=8_000, node=NODE_B, endpoint=URL_B, job="hj_1")
        home.finish("k1", submitted(NODE_B, URL_B, amount=8_000), charge=8_000)
        assert home.left("video")["workflow"]["left"] == 2_000
        home.release("k1")  # refunded later
        assert home.left("video")["workflow"]["left"] == 10_000
        outcomes = [d["outcome"] for d in home.decisions("k1")]
        assert outcomes == ["no_provider", "funding_failed", "submitted"]


def test_the_daily_budget_starts_again_at_midnight_utc(tmp_path: Path) -> None:
    clock = Clock("2026-12-07T23:59:59")
    with open_home(tmp_path, clock, per_day=10_000) as home:
        home.claim("k1", envelope_hash=H1, job_id="j1", workflow="default")
        home.hold("k1", amount=10_000, node=NODE_A, endpoint=URL_A, job="hj_1")
        home.finish("k1", submitted(amount=10_000), charge=10_000)
        home.claim("k2", envelope_hash=H2, job_id="j2", workflow="default")
        with pytest.raises(BudgetError):
            home.hold("k2", amount=1, node=NODE_A, endpoint=URL_A, job="hj_2")
        clock.t += 1  # 2026-12-08T00:00:00Z
        assert utc_day(clock()) == "2026-12-08"
        home.hold("k2", amount=10_000, node=NODE_A, endpoint=URL_A, job="hj_2")
        left = home.left()["per_day"]
        assert (left["day"], left["used"], left["left"]) == ("2026-12-08", 10_000, 0)


def test_the_retry_budget_bounds_the_routings_of_one_key(tmp_path: Path) -> None:
    with open_home(tmp_path, attempts_per_key=2) as home:
        home.claim("k1", envelope_hash=H1, job_id="j1", workflow="default")
        home.finish("k1", {"outcome": "no_provider", "job": None})
        assert home.claim("k1", envelope_hash=H1, job_id="j1", workflow="default").kind == "failed"
        assert home.take("k1").attempts == 2
        home.finish("k1", {"outcome": "no_provider", "job": None})
        with pytest.raises(BudgetError) as exc:
            home.take("k1")
        assert exc.value.details["budget"] == "attempts"
        assert exc.value.details["left"]["attempts"] == {"key": "k1", "limit": 2, "used": 2, "left": 0}
        rec = home.record("k1")
        assert rec is not None and (rec.state, rec.attempts) == ("failed", 2)


_HOLD_AND_HANG = """
import sys, time
from pathlib import Path
from requester.budgets import Budgets
from requester.home import RequesterHome
home = RequesterHome.open(Path(sys.argv[1]), budgets=Budgets(per_day=50_000))
home.claim("k1", envelope_hash=sys.argv[2], job_id="j1", workflow="default")
home.hold("k1", amount=12_000, node=sys.argv[3], endpoint=sys.argv[4], job="hj_1")
print("held", flush=True)
time.sleep(120)  # the node's answer never comes: killed here
"""


def test_a_requester_killed_mid_routing_resumes_on_the_same_node_only(tmp_path: Path) -> None:
    path = default_path(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AND_HANG, str(path), H1, NODE_A, URL_A],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with open_home(tmp_path, per_day=50_000) as home:
        claim = home.claim("k1", envelope_hash=H1, job_id="j1", workflow="default")
        assert claim.kind == "in_flight" and (claim.record.node, claim.record.endpoint) == (NODE_A, URL_A)
        resumed = home.take("k1")
        assert (resumed.state, resumed.attempts, resumed.node, resumed.job) == ("routing", 2, NODE_A, "hj_1")
        assert resumed.sticky  # the killed run may have reached the node: the key never leaves it
        with pytest.raises(ConflictError) as exc:
            home.hold("k1", amount=10_000, node=NODE_B, endpoint=URL_B, job="hj_1")
        assert exc.value.code == "idempotency_key_pinned" and exc.value.details["node"] == NODE_A
        assert home.reservation("k1") == ("held", 12_000)  # still the crashed run's hold, counted once
        assert home.left()["per_day"]["used"] == 12_000
        home.hold("k1", amount=12_000, node=NODE_A, endpoint=URL_A, job="hj_1")
        assert home.left()["per_day"]["used"] == 12_000
        # an unknown outcome keeps the key in flight, its node pinned, its reservation held
        unknown = {"outcome": "outcome_unknown", "job": submitted()["job"]}
        assert home.finish("k1", unknown).state == "routing"
        assert home.reservation("k1") == ("held", 12_000)


def _reserve_until_refused(path: str, worker: int, amount: int, limit: int, start: Any = None) -> int:
    """Claim and hold keys until the per-day budget refuses; how many holds passed. ``start``: a barrier
    every worker waits at once its home is open, so that they all reserve at the same time."""
    with RequesterHome.open(Path(path), budgets=Budgets(per_day=limit)) as home:
        if start is not None:
            start.wait()
        n = 0
        while True:
            key = f"w{worker}-{n}"
            home.claim(key, envelope_hash=H1, job_id=key, workflow="default")
            try:
                home.hold(key, amount=amount, node=NODE_A, endpoint=URL_A, job=key)
            except BudgetError:
                return n
            n += 1


def _worker(path: str, worker: int, amount: int, limit: int, start: Any, results: Any) -> None:
    results.put(_reserve_until_refused(path, worker, amount, limit, start))


def test_concurrent_processes_never_overspend(tmp_path: Path) -> None:
    path = str(default_path(tmp_path))
    RequesterHome.open(Path(path)).close()
    limit, amount, workers = 1_000_000, 7_000, 4  # 142 holds fit; 6_000 base units stay unspendable
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(path, w, amount, limit, start, results)) for w in range(workers)
    ]
    for p in procs:
        p.start()
    counts = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sum(counts) == limit // amount, counts
    with RequesterHome.open(Path(path), budgets=Budgets(per_day=limit)) as home:
        assert home.left()["per_day"]["used"] == (limit // amount) * amount <= limit


def test_concurrent_threads_never_overspend(tmp_path: Path) -> None:
    path = str(default_path(tmp_path))
    RequesterHome.open(Path(path)).close()
    counts: list[int] = []
    limit, amount, workers = 100_000, 3_000, 6
    start = threading.Barrier(workers)
    threads = [
        threading.Thread(
            target=lambda w=w: counts.append(_reserve_until_refused(path, w, amount, limit, start))
        )
        for w in range(workers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(counts) == workers and sum(counts) == limit // amount, counts


def test_requester_toml_sets_the_budgets(tmp_path: Path) -> None:
    assert load_budgets(tmp_path) == Budgets()  # no file: no caps
    path = config_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(
        '[budgets]\nper_day = "5.00"\nattempts_per_key = 5\n\n[budgets.workflows]\ntranscode = "1.5"\n'
    )
    assert load_budgets(tmp_path) == Budgets(
        per_day=5_000_000, workflows={"transcode": 1_500_000}, attempts_per_key=5
    )
    for bad in ('[budgets]\nper_day = "0.0000001"\n', "[budgets]\nper_week = 1\n", "[budgets\n"):
        path.write_text(bad)
        with pytest.raises(ConfigError) as exc:
            load_budgets(tmp_path)
        assert exc.value.code == "invalid_requester_config"


def test_a_file_that_is_not_a_home_is_refused(tmp_path: Path) -> None:
    path = default_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not sqlite at all, " * 100)
    with pytest.raises(HearthError) as exc:
        RequesterHome.open(path)
    assert (exc.value.code, exc.value.domain) == ("requester_home_failed", "storage")
