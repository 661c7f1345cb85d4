"""Row: kill -9 of the daemon during running jobs. None lost, none run twice, no orphan container.

One node home serves every iteration. An iteration submits a few new transcodes (real ffmpeg in Docker,
a small generated clip) while the jobs of earlier iterations still run or queue, SIGKILLs the daemon at
a random moment (a submission may be in flight, a probe or transcode container running, an output
being imported), restarts it, and checks:

- the containers the dead daemon left are gone once the new one is ready (recovery removed them);
- no job has more than one ``completed`` transition, and every completed job carries its result;
- a submission the kill cut off (no answer) is sent again, as a requester would, with a fresh token for
  the same envelope: the node answers with the job it already had, or accepts it now.

After the last iteration the node runs until every job rests, then: every job the node accepted rests in
one state, ``completed`` (exactly once) or ``failed`` for good (not retryable, or its retries spent); no
container of the node is left on the engine; no half-written block is left in the blockstore and no
attempt folder in the work directory.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from payments.keys import Signer, new_ed25519
from requester.client import NodeClient, NodeError, NodeUnreachable, sign_request
from sandbox.ffmpeg import make_test_clip
from tests.chaos.harness import (
    NODE_START_TIMEOUT_SECONDS,
    JobFacts,
    JournalView,
    answers_ready,
    count_transitions,
    daemon_home,
    node_containers,
    node_did,
    read_journal,
    remove_containers,
    seeded,
    stale_temp_blocks,
    start,
    watch_journal,
)
from tests.chaos.scoreboard import Row, scenario
from tests.conftest import DaemonProcess, make_envelope

NAME = "kill -9 during running jobs"
JOBS_PER_ROUND = 2  # new jobs each iteration; earlier ones are still in flight
KILL_WINDOW_SECONDS = 3.0  # the kill lands uniformly this long after the round's submissions begin
RETRY_BUDGET = 4  # a job survives this many kills mid-run before it fails for good
KILL_DURING_RECOVERY_SHARE = 0.3  # iterations whose restart is itself killed, in its recovery
RECOVERY_KILL_JITTER_SECONDS = 0.002  # after recovery's first journal write: within its loop over jobs
SETTLE_TIMEOUT_SECONDS = 240.0  # after the last kill, every job rests within this
STRANDED_SECONDS = 5.0  # a live node's failure is retried at once; one left this long never will be
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5)
CONFIG: dict[str, Any] = {
    "scheduler": {"paused": False},
    "policy": {"retry_budget": RETRY_BUDGET, "per_did_concurrency": 1000},
    # accepted jobs beyond the machine queue rather than being refused
    "capacity": {"overcommit": 50.0},
}


@dataclass
class _Submission:
    """A job the scenario sent: its envelope, and the node's job id once an answer named it."""

    env: dict[str, Any]
    job: str | None = None


class _Run:
    def __init__(self, row: Row, workdir: Path) -> None:
        self.row = row
        self.rng = seeded(row)
        self.daemon: DaemonProcess = daemon_home(workdir, CONFIG)
        self.did = node_did(self.daemon.home)
        self.requester: Signer = new_ed25519()
        self.sent: dict[str, _Submission] = {}  # by job_id
        self.reported: set[tuple[str, str]] = set()  # (outcome, job) already counted
        self.clip = make_test_clip(workdir / "clip.mp4", seconds=2, width=160, height=120)
        self.clip_cid = ""

    def fail_once(self, outcome: str, job: str, note: str) -> None:
        if (outcome, job) not in self.reported:
            self.reported.add((outcome, job))
            self.row.fail(outcome, f"{job}: {note}")

    def tally(self, name: str, n: int = 1) -> None:
        self.row.good[name] = self.row.good.get(name, 0) + n

    # -- requests -------------------------------------------------------------------------------------

    def envelope(self, job_id: str) -> dict[str, Any]:
        return make_envelope(
            job_id,
            input_uri=self.clip_cid,
            output_spec={"format": "mp4", "resolution": "360p", "codec": "h264", "audio_codec": "aac"},
            limits={"timeout_seconds": 120, "max_output_mb": 50, "cpus": 0.5, "memory_mb": 256, "gpus": 0},
            validation={"min_duration_seconds": 1, "required_streams": ["video", "audio"]},
        )

    async def submit(self, client: NodeClient, sub: _Submission) -> None:
        """Submit (bid and accept in one step); an answer names the job. A cut-off request raises."""
        token = sign_request(self.requester, self.did, {"job": sub.env})
        body = await client.submit(token)
        sub.job = str(body["job"]["id"])

    async def round(self, n: int) -> None:
        async with NodeClient(self.daemon.url, timeout=CLIENT_TIMEOUT) as client:
            if not self.clip_cid:
                self.clip_cid = str((await client.put_blob(self.clip))["cid"])

            subs = [_Submission(self.envelope(f"k9-{n}-{k}")) for k in range(JOBS_PER_ROUND)]
            self.sent.update((sub.env["job_id"], sub) for sub in subs)

            async def submissions() -> None:
                for sub in subs:
                    await self.submit(client, sub)
                    self.tally("jobs_accepted")

            task = asyncio.create_task(submissions())
            await asyncio.sleep(self.rng.uniform(0.0, KILL_WINDOW_SECONDS))
            self.daemon.kill()  # SIGKILL: no shutdown code runs
            try:
                await task
            except (NodeUnreachable, aiohttp.ClientError):
                self.tally("submissions_cut_by_kill")
            except NodeError as exc:  # a refusal of a valid job the node has room to queue
                self.fail_once("submit_refused", f"round {n}", f"{exc.status} {exc.code}: {exc.message}")

    async def resubmit_cut_off(self) -> None:
        """Send again, with a fresh token, every submission the kill cut off or kept from being sent (as a
        requester retries)."""
        async with NodeClient(self.daemon.url, timeout=CLIENT_TIMEOUT) as client:
            for job_id, sub in self.sent.items():
                if sub.job is not None:
                    continue
                try:
                    await self.submit(client, sub)
                    self.tally("jobs_accepted")
                except NodeError as exc:
                    self.fail_once("resubmit_refused", job_id, f"{exc.status} {exc.code}: {exc.message}")

    # -- checks ---------------------------------------------------------------------------------------

    def kill_during_recovery(self) -> None:
        """Start the daemon and SIGKILL it again while its recovery fails and retries the jobs the last
        kill stopped (a random moment within the first few milliseconds of those journal writes).

        Without jobs to recover, the kill lands as the node turns ready.
        """
        with watch_journal(self.daemon.home) as journal:
            before = count_transitions(journal, "running", "failed")
            self.daemon.spawn()
            deadline = time.monotonic() + NODE_START_TIMEOUT_SECONDS
            polls = 0
            while count_transitions(journal, "running", "failed") == before:
                polls += 1
                if (polls % 200 == 0 and answers_ready(self.daemon.url)) or time.monotonic() > deadline:
                    self.tally("kills_after_start")
                    break
                time.sleep(0.0002)
            else:
                time.sleep(self.rng.uniform(0.0, RECOVERY_KILL_JITTER_SECONDS))
                self.tally("kills_during_recovery")
            self.daemon.kill()

    def stranded(self) -> dict[str, int]:
        """Jobs the dead daemon left failed, retryable, retries unspent: the next start must retry them.

        Read while no daemon runs, so a failure whose retry is a moment away cannot be mistaken for one.
        Maps each to its transition count, to tell whether anything moved it since.
        """
        view = read_journal(self.daemon.home)
        found = {
            job.id: len(job.moves)
            for job in view.jobs.values()
            if job.state == "failed" and job.failure_retryable and job.attempts < RETRY_BUDGET
        }
        self.tally("retries_cut_by_kill", len(found))
        return found

    def after_restart(self, left_by_kill: set[str], stranded: dict[str, int]) -> None:
        # Recovery runs before the node answers ready: by then nothing of the dead daemon may be left.
        for container in left_by_kill & node_containers(self.did):
            self.fail_once(
                "orphan_container", container[:12], "left by the killed daemon, kept after restart"
            )
        view = read_journal(self.daemon.home)
        self.check_records(view)
        for job, moves in stranded.items():
            if len(view.jobs[job].moves) == moves:
                self.fail_once("job_lost", job, "failed with retries unspent; the restart did not retry it")

    def check_records(self, view: JournalView) -> None:
        for job in view.jobs.values():
            if job.count("completed") > 1:
                self.fail_once("run_twice", job.id, f"{job.count('completed')} completed transitions")
            if job.state == "completed" and not job.has_result:
                self.fail_once("result_missing", job.id, "completed without a recorded result")

    def settle(self) -> JournalView:
        """Wait until every job the node accepted rests, or only stranded ones are left (failed with retries
        unspent: the live node will not move them); returns the journal as it then stands."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
        stranded_since: float | None = None
        while True:
            view = read_journal(self.daemon.home)
            mine = view.by_job_id()
            waiting = [
                mine[(self.requester.did, job_id)]
                for job_id, sub in self.sent.items()
                if sub.job is not None
                and (self.requester.did, job_id) in mine
                and not mine[(self.requester.did, job_id)].resting(RETRY_BUDGET)
            ]
            now = time.monotonic()
            if waiting and all(job.state == "failed" for job in waiting):
                stranded_since = stranded_since or now
            else:
                stranded_since = None
            if not waiting or now > deadline or (stranded_since and now - stranded_since > STRANDED_SECONDS):
                return view
            time.sleep(0.5)

    def final(self, view: JournalView) -> None:
        self.check_records(view)
        mine = view.by_job_id()
        for job_id, sub in self.sent.items():
            facts: JobFacts | None = mine.get((self.requester.did, job_id))
            if sub.job is None:
                continue  # never answered, even when sent again: counted as resubmit_refused
            if facts is None:
                self.fail_once("job_lost", sub.job, "accepted by the node, absent from its journal")
            elif not facts.resting(RETRY_BUDGET):
                self.fail_once("job_lost", sub.job, f"still {facts.state} (attempts {facts.attempts})")
            elif facts.state == "completed":
                self.tally("completed")
            else:
                self.tally(f"ended_{facts.state}_{facts.failure_code or ''}".rstrip("_"))
            if facts is not None:
                self.tally("retries", max(0, facts.count("accepted") - 1))
        left = node_containers(self.did)
        for container in left:
            self.fail_once("orphan_container", container[:12], "on the engine after every job rested")
        remove_containers(left)
        for path in stale_temp_blocks(self.daemon.home):
            self.fail_once("partial_block_left", path.name, "a half-written block file after the jobs rested")
        work = self.daemon.home / "state" / "work"
        for attempt in sorted(work.glob("*/attempt-*")) if work.exists() else []:
            self.fail_once(
                "attempt_dir_left", attempt.parent.name, f"{attempt.name} kept after the job rested"
            )


@scenario(NAME, stated=50, short=3)
def run(count: int, workdir: Path) -> Row:
    row = Row(NAME, count)
    r = _Run(row, workdir)
    try:
        start(r.daemon)
        for n in range(count):
            asyncio.run(r.round(n))
            r.tally("kills")
            r.tally("containers_left_by_kill", len(node_containers(r.did)))
            if r.rng.random() < KILL_DURING_RECOVERY_SHARE:
                r.kill_during_recovery()
            left = node_containers(r.did)  # what the dead daemon(s) left on the engine
            stranded = r.stranded()
            start(r.daemon)  # recovery runs before the node answers ready
            r.after_restart(left, stranded)
            asyncio.run(r.resubmit_cut_off())
            row.runs = n + 1
        t0 = time.monotonic()
        view = r.settle()
        row.good["settle_seconds"] = round(time.monotonic() - t0)
        r.final(view)
    finally:
        r.daemon.stop()
        remove_containers(node_containers(r.did))
    return row
