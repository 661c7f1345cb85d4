"""The operator's overview (GET /v1/overview and `hearth status`) of a real node with jobs in many states.

The queue, cancels and quotes go through the API; the later lifecycle (a run's progress, failures,
settlement) is written to the journal the way the scheduler and settlement write it, on a paused node where
nothing else moves the jobs. One test watches a real transcode run, with Docker.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cli import common as cli_common
from cli import main as cli
from cli.status_view import sparkline
from core.errors import Domain
from core.journal import JobFields, Journal
from node.daemon import Node
from node.overview import PERIODS
from payments.keys import Signer
from sandbox.ffmpeg import make_test_clip
from tests.conftest import REPO, LiveNode, live, make_envelope, write_home
from tests.node.test_execution import RUN_CONFIG, submit, transcode, upload, wait_state

ACTOR = "test"
SMALL_CPUS = 0.1


def small(job_id: str) -> dict[str, Any]:
    limits = {"timeout_seconds": 60, "max_output_mb": 10, "cpus": SMALL_CPUS, "memory_mb": 64, "gpus": 0}
    return make_envelope(job_id, limits=limits)


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json(content_type=None)


async def post_jwt(url: str, token: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url, data=token, headers={"Content-Type": "application/jwt"}) as r,
    ):
        body: dict[str, Any] = await r.json()
        assert r.status in (200, 201), body
        return body


async def overview(ln: LiveNode, query: str = "") -> dict[str, Any]:
    status, body = await get_json(f"{ln.url}/v1/overview{query}")
    assert status == 200, body
    return dict(body)


def start(journal: Journal, job: str) -> None:
    journal.transition(job, "running", actor=ACTOR, reason="attempt 1", expect="accepted")


def fail(node: Node, job: str, domain: Domain, code: str) -> None:
    start(node.journal, job)
    node.journal.transition(
        job,
        "failed",
        actor=ACTOR,
        reason=f"{code}: it broke",
        domain=domain,
        retryable=False,
        fields={"failure_code": code, "failure_message": f"{code} happened"},
    )
    node.ledger.release(job)  # as the scheduler does once a failure is final


def settle(node: Node, job: str, amount_units: int) -> float:
    """Run, complete, validate and settle ``job`` for ``amount_units``; when it settled."""
    journal = node.journal
    journal.open_payment(
        job, escrow_job_id="0x" + job.encode().hex()[:64].ljust(64, "0"), terms={}, wait_until=0
    )
    start(journal, job)
    journal.transition(job, "completed", actor=ACTOR, reason="done", fields={"result_json": {"cost": "1"}})
    receipt = {"receipt": {"amount": str(amount_units)}, "signature": "0x01"}
    journal.record_verdict(job, "validated", receipt, actor="validator", reason="passed")
    record, _ = journal.transition(job, "settled", actor="settlement", reason="released")
    node.ledger.release(job)
    return record.updated_at


def walk_keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield key
            yield from walk_keys(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from walk_keys(inner)


async def hearth(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``hearth ARGS`` in a thread (it runs its own event loop) while this loop serves the node."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, list(args))
    return code, capsys.readouterr().out


async def test_the_overview_shows_queue_running_progress_failures_and_earnings(
    tmp_path: Path, requester: Signer, capsys: pytest.CaptureFixture[str]
) -> None:
    # paused: accepted jobs stay queued; small jobs, so that eight fit on any machine
    config = {"policy": {"per_did_concurrency": 10}}
    async with live(write_home(tmp_path / "home", config)) as ln:
        node, journal = ln.node, ln.node.journal
        ids = []
        for n in range(7):
            body = await post_jwt(f"{ln.url}/v1/jobs", ln.sign(requester, {"job": small(f"j{n}")}))
            ids.append(body["job"]["id"])
        quoted = (await post_jwt(f"{ln.url}/v1/quotes", ln.sign(requester, {"job": small("q")})))["job"]
        await post_jwt(f"{ln.url}/v1/jobs/{ids[6]}/cancel", ln.sign(requester, {"cancel": ids[6]}))
        running, oom, mismatch, paid, paid_too = ids[:5]
        start(journal, running)
        journal.append_event(
            running, "progress", "transcoding 42%", {"stage": "transcoding", "percent": 42.5}
        )
        fail(node, oom, "execution", "oom_killed")
        fail(node, mismatch, "storage", "sha256_mismatch")
        settled_at = settle(node, paid, 1_500_000)
        settle(node, paid_too, 250_000)

        doc = await overview(ln)

        jobs = doc["jobs"]
        assert {k: v for k, v in jobs["by_state"].items() if v} == {
            "priced": 1,
            "accepted": 1,
            "running": 1,
            "failed": 2,
            "settled": 2,
            "cancelled": 1,
        }
        assert jobs["queued"] == 1  # ids[5]; the node is paused
        assert [j["id"] for j in jobs["running"]] == [running]
        run = jobs["running"][0]
        assert (run["stage"], run["percent"], run["attempt"], run["kind"]) == (
            "transcoding",
            42.5,
            1,
            "ffmpeg_transcode",
        )
        assert run["started_at"] <= run["progress_at"]
        # newest first, as recorded: the quote, then the jobs in reverse order of submission
        assert [j["id"] for j in jobs["recent"]] == [quoted["id"], *reversed(ids)]
        assert jobs["recent"][2]["failure"] is None and jobs["recent"][0]["state"] == "priced"

        failures = doc["failures"]
        assert failures["total"] == 2
        assert failures["by_domain"] == {
            "execution": {"count": 1, "codes": {"oom_killed": 1}},
            "storage": {"count": 1, "codes": {"sha256_mismatch": 1}},
        }
        assert [f["id"] for f in failures["recent"]] == [mismatch, oom]
        assert failures["recent"][1]["message"] == "oom_killed happened"

        earnings = doc["earnings"]
        assert (earnings["earned"], earnings["earned_units"], earnings["currency"]) == (
            "1.75",
            1_750_000,
            "usdc",
        )
        series = earnings["series"]
        seconds, count = PERIODS["hour"]
        assert series["period"] == "hour" and len(series["points"]) == count
        starts = [p["start"] for p in series["points"]]
        assert all(b - a == seconds for a, b in itertools.pairwise(starts))
        assert starts[-1] <= doc["generated_at"] < starts[-1] + seconds  # the current hour last
        earning = [p for p in series["points"] if p["jobs"]]
        assert len(earning) == 1 and earning[0]["start"] == math.floor(settled_at / seconds) * seconds
        assert (earning[0]["earned"], earning[0]["jobs"]) == ("1.75", 2)

        # capacity: what the held jobs (the live quote, the queued and the running job) take of the total
        resources = doc["capacity"]["resources"]
        assert resources["used"]["cpus"] == pytest.approx(3 * SMALL_CPUS)
        assert resources["free"]["cpus"] == pytest.approx(resources["total"]["cpus"] - 3 * SMALL_CPUS)
        assert resources["used"]["memory_mb"] == 3 * 64
        assert doc["capacity"]["kinds"] == ["ffmpeg_transcode", "vllm_batch"]
        assert doc["node"] == {
            "did": ln.did,
            "name": "hearth-node",
            "ready": True,
            "started_at": node.started_at,
            "paused": True,
            "payments": False,
            "market": None,
        }

        # nothing secret: no key material, no tokens, no envelopes
        text = json.dumps(doc)
        seed = json.loads((node.home / "node.key").read_text())["seed"]
        assert seed not in text and bytes.fromhex(seed).hex().upper() not in text
        assert not {"jwt", "quote_jwt", "envelope", "result", "receipt"} & set(walk_keys(doc))

        # progress is fresh on every read; a new settlement shows at once (the cached sums are rebuilt)
        journal.append_event(
            running, "progress", "transcoding 60%", {"stage": "transcoding", "percent": 60.0}
        )
        later = await overview(ln, "?recent=2&period=day")
        assert later["jobs"]["running"][0]["percent"] == 60.0
        assert [j["id"] for j in later["jobs"]["recent"]] == [quoted["id"], ids[6]]
        settle(node, ids[5], 5)
        later = await overview(ln, "?period=day")
        assert later["earnings"]["earned"] == "1.750005"
        days = later["earnings"]["series"]
        assert days["period_seconds"] == 86400 and len(days["points"]) == PERIODS["day"][1]
        assert all(p["start"] % 86400 == 0 for p in days["points"])
        assert sum(p["jobs"] for p in days["points"]) == 3
        assert [j["percent"] for j in later["jobs"]["running"]] == [60.0] and later["jobs"]["queued"] == 0

        # `hearth status --json` prints the same document; people get tables
        code, out = await hearth(capsys, "status", "--node", ln.url, "--json", "--recent", "3")
        assert code == 0
        shown = json.loads(out)
        assert shown["failures"] == later["failures"] and shown["earnings"]["earned"] == "1.750005"
        assert [j["id"] for j in shown["jobs"]["recent"]] == [quoted["id"], ids[6], ids[5]]

        code, out = await hearth(capsys, "status", "--node", ln.url)
        assert code == 0
        for expected in (
            "Capacity",
            "execution",
            "oom_killed",
            "storage",
            "sha256_mismatch",
            "1.750005 USDC",
        ):
            assert expected in out, (expected, out)
        assert mismatch in out and "Running jobs (1 running, 0 queued)" in out
        bar_line = next(line for line in out.splitlines() if running in line)
        assert "transcoding" in bar_line and "60.0%" in bar_line and "━" in bar_line

        code, out = await hearth(
            capsys, "status", "--node", ln.url, "--json", "--watch", "0.2", "--count", "2"
        )
        assert code == 0
        lines = out.splitlines()
        assert len(lines) == 2 and all(json.loads(line)["node"]["did"] == ln.did for line in lines)


async def test_bad_queries_are_refused_with_the_error_shape(live_node: LiveNode) -> None:
    for query, field in (("?period=week", "period"), ("?recent=101", "recent"), ("?recent=x", "recent")):
        status, body = await get_json(f"{live_node.url}/v1/overview{query}")
        assert status == 400, body
        assert body["error"]["code"] == "invalid_query" and field in body["error"]["details"]
        assert body["error"]["domain"] == "request"


async def test_status_against_no_node_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = await hearth(capsys, "status", "--node", "http://127.0.0.1:9", "--json")
    assert code == cli_common.EXIT_UNREACHABLE


async def test_status_watch_redraws_until_ctrl_c(live_node: LiveNode) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "status",
        "--node",
        live_node.url,
        "--watch",
        "0.2",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Ctrl-C as in a terminal: a test run started in the background has SIGINT ignored, and a child
        # would inherit that and never see it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None and proc.stderr is not None
    frames = 0
    try:
        while frames < 2:  # not a terminal: each refresh is printed as it comes
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, (await proc.stderr.read()).decode()
            frames += line.startswith(b"Capacity")
    finally:
        proc.send_signal(signal.SIGINT)
        # both pipes drained to the end: a refresh or a warning written meanwhile cannot block the exit
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise
    assert proc.returncode == 0 and b"Traceback" not in err


def test_the_sparkline_scales_to_the_largest_value() -> None:
    assert sparkline([0, 0, 0]) == "▁▁▁"
    assert sparkline([0, 1, 8]) == "▁▂█"
    assert sparkline([5, 5]) == "██"


async def test_a_running_transcode_shows_its_live_progress(
    tmp_path: Path, requester: Signer, capsys: pytest.CaptureFixture[str], sandbox_images: dict[str, str]
) -> None:
    clip = make_test_clip(tmp_path / "clip.mp4", seconds=12, width=320, height=240)
    async with live(write_home(tmp_path / "home", RUN_CONFIG)) as ln:
        cid = await upload(ln.url, clip.read_bytes())
        env = transcode(cid, "watched-1", resolution="720p")
        env["limits"]["cpus"] = 0.5
        job = await submit(ln.url, ln.did, requester, env)
        deadline = time.monotonic() + 60
        seen: list[float] = []
        while len(seen) < 2:  # two reports of the transcode, from the journal, as they come
            doc = await overview(ln)
            running = doc["jobs"]["running"]
            assert time.monotonic() < deadline, running
            if running and running[0]["stage"] == "transcoding" and running[0]["percent"] is not None:
                assert running[0]["id"] == job
                if not seen or running[0]["percent"] > seen[-1]:
                    seen.append(running[0]["percent"])
            await asyncio.sleep(0.2)
        assert doc["jobs"]["by_state"]["running"] == 1
        assert doc["capacity"]["resources"]["used"]["cpus"] == pytest.approx(0.5)

        code, out = await hearth(capsys, "status", "--node", ln.url)
        assert code == 0 and job in out and "transcoding" in out and "━" in out  # the progress bar

        await post_jwt(f"{ln.url}/v1/jobs/{job}/cancel", ln.sign(requester, {"cancel": job}))
        assert (await wait_state(ln.url, job, {"cancelled"}, limit=30))["state"] == "cancelled"
        assert (await overview(ln))["jobs"]["running"] == []


# -- the journal's reads behind the overview ---------------------------------------------------------------

HOUR = 3600.0
T0 = 1_800_000_000.0  # a whole hour


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def record(journal: Journal, n: int) -> str:
    """An accepted job numbered ``n``."""
    job = f"hj_{n:026d}"
    journal.create_priced(
        id=job,
        iss="did:key:z6MkRequester",
        job_id=f"job-{n}",
        kind="ffmpeg_transcode",
        idem_key=f"{n:064x}",
        envelope_hash=f"{n:064x}",
        envelope={"job_id": f"job-{n}"},
        price="1",
        quote_id=f"q-{n}",
        quote_jwt="eyJ.q.x",
        quote_expires_at=T0 + 1e6,
        cpus=1,
        memory_mb=1,
        gpus=0,
        actor=ACTOR,
        reason="quoted",
    )
    journal.transition(job, "accepted", actor=ACTOR, reason="accepted")
    return job


def test_attempt_progress_belongs_to_the_current_attempt_only(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "j.sqlite3", now=Clock()) as journal:
        job = record(journal, 1)
        assert journal.attempt_progress(job) is None
        start(journal, job)
        journal.append_event(job, "progress", "p", {"stage": "transcoding", "percent": 10})
        journal.append_event(job, "note", "n", {"x": 1})  # notes are not progress
        progress = journal.attempt_progress(job)
        assert progress is not None and progress.data == {"stage": "transcoding", "percent": 10}
        journal.transition(job, "failed", actor=ACTOR, reason="r", domain="execution", retryable=True)
        journal.transition(job, "accepted", actor=ACTOR, reason="retry", retry_budget=2)
        start(journal, job)
        assert journal.attempt_progress(job) is None  # the 10% was the first attempt's
        journal.append_event(job, "progress", "p", {"stage": "fetching", "percent": 0})
        progress = journal.attempt_progress(job)
        assert progress is not None and progress.data == {"stage": "fetching", "percent": 0}


def test_settled_earnings_count_each_settled_job_in_the_period_it_settled(tmp_path: Path) -> None:
    clock = Clock()
    with Journal.open(tmp_path / "j.sqlite3", now=clock) as journal:

        def settle_at(n: int, at: float, amount: int, *, finish: bool = True) -> None:
            job = record(journal, n)
            journal.open_payment(job, escrow_job_id=f"0x{n:064x}", terms={}, wait_until=0)
            start(journal, job)
            journal.transition(job, "completed", actor=ACTOR, reason="done")
            journal.record_verdict(
                job, "validated", {"receipt": {"amount": str(amount)}}, actor="v", reason="ok"
            )
            clock.t = at
            if finish:
                journal.transition(job, "settled", actor=ACTOR, reason="released")

        settle_at(1, T0 - 1, 7)  # before the window
        settle_at(2, T0, 100)
        settle_at(3, T0 + HOUR - 0.5, 20)
        settle_at(4, T0 + 2.5 * HOUR, 3)
        settle_at(5, T0 + 2.6 * HOUR, 1000, finish=False)  # validated, not paid yet
        assert journal.settled_earnings(T0, int(HOUR)) == {T0: (120, 2), T0 + 2 * HOUR: (3, 1)}
        assert journal.settled_earnings(T0 - HOUR, 86400) == {
            float(math.floor((T0 - 1) / 86400) * 86400): (130, 4)
        }
        with pytest.raises(ValueError):
            journal.settled_earnings(T0, 0)


def test_recent_jobs_and_failure_counts(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "j.sqlite3", now=Clock()) as journal:
        jobs = [record(journal, n) for n in range(5)]
        for job, code in zip(jobs[:3], ("oom_killed", "oom_killed", None), strict=True):
            start(journal, job)
            fields: JobFields = {} if code is None else {"failure_code": code}
            journal.transition(
                job, "failed", actor=ACTOR, reason="r", domain="execution", retryable=False, fields=fields
            )
        assert [j.id for j in journal.recent_jobs(2)] == [jobs[4], jobs[3]]
        assert [j.id for j in journal.recent_jobs(10, state="failed")] == [jobs[2], jobs[1], jobs[0]]
        assert journal.failure_counts() == {("execution", "oom_killed"): 2, ("execution", ""): 1}
