"""Row: SIGTERM under request load. The node drains, answers 503 ``draining``, loses nothing it answered.

One node home serves every iteration. A real transcode (the "holder") runs whenever the SIGTERM lands, so
the drain lasts its grace (``[scheduler] drain_grace_seconds``) as it does on a busy node. An iteration:
start the daemon, make sure the holder runs, put it under concurrent signed quote/submit load (a bounded
number of client tasks, each its own requester, over loopback), send SIGTERM at a random moment, keep
the load going until the daemon stops answering, wait for it to exit, and check:

- every answer is a success or the structured JSON error shape; once the drain began, new quotes and
  submissions get 503 ``draining`` (at least one is seen per iteration: the drain was observed), and no
  ``draining`` answer comes before the signal;
- the daemon exits, with status 0, within its drain grace (plus a bounded allowance for closing);
- after the restart, every request the node answered with success is in its journal: a quote's job
  went through ``priced``, an acceptance's through ``accepted``, and the token's nonce is recorded (so a
  replay is refused). The holder was stopped, not lost: recovery queues it again.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from payments.keys import Signer, new_ed25519
from requester.client import NodeClient, NodeError, NodeUnreachable, sign_request
from sandbox.ffmpeg import make_test_clip
from tests.chaos.harness import (
    daemon_home,
    node_containers,
    node_did,
    read_journal,
    remove_containers,
    seeded,
    start,
    token_nonce,
)
from tests.chaos.scoreboard import Row, scenario
from tests.conftest import DaemonProcess, make_envelope

NAME = "SIGTERM under request load"
CLIENTS = 6  # concurrent client tasks, each a requester of its own
LOAD_WINDOW_SECONDS = (0.2, 1.0)  # the SIGTERM lands uniformly this long after the load begins
DRAIN_GRACE_SECONDS = 1.0  # [scheduler] drain_grace_seconds of the node under test
# Past the grace the node stops the holder's container and closes the API (aiohttp's shutdown, the
# journal, the Docker client); the exit must follow within this.
EXIT_ALLOWANCE_SECONDS = 6.0
HOLDER_RUNNING_TIMEOUT_SECONDS = 60.0  # a fresh holder is quoted (probed) and dispatched within this
RETRY_BUDGET = 10  # each drain stops the holder once; recovery retries it this many times
RETRY_PAUSE_SECONDS = 0.02  # a client's pause after a retryable refusal
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20, connect=5)
CONFIG: dict[str, Any] = {
    "scheduler": {"paused": False, "drain_grace_seconds": DRAIN_GRACE_SECONDS},
    "policy": {"retry_budget": RETRY_BUDGET, "per_did_concurrency": 100_000},
    # quotes and acceptances of the load must not run out of capacity: the row is about the drain
    "capacity": {"overcommit": 1000.0},
}
SMALL = {"timeout_seconds": 60, "max_output_mb": 10, "cpus": 0.01, "memory_mb": 64, "gpus": 0}


@dataclass
class _Answers:
    """What the load saw in one iteration."""

    quoted: dict[str, str] = field(default_factory=dict)  # job -> the request token the node answered
    accepted: dict[str, str] = field(default_factory=dict)
    drain_503: int = 0


class _Run:
    def __init__(self, row: Row, workdir: Path) -> None:
        self.row = row
        self.rng = seeded(row)
        self.daemon: DaemonProcess = daemon_home(workdir, CONFIG)
        self.did = node_did(self.daemon.home)
        self.owner: Signer = new_ed25519()  # submits the holder
        self.clients = [new_ed25519() for _ in range(CLIENTS)]
        self.clip = make_test_clip(workdir / "long.mp4", seconds=30, width=320, height=240)
        self.clip_cid = ""
        self.holder: str | None = None
        self.serial = 0

    def tally(self, name: str, n: int = 1) -> None:
        self.row.good[name] = self.row.good.get(name, 0) + n

    # -- the holder -----------------------------------------------------------------------------------

    async def ensure_holder(self, client: NodeClient) -> None:
        """Make sure a long transcode is running, so the drain waits for it."""
        if not self.clip_cid:
            self.clip_cid = str((await client.put_blob(self.clip))["cid"])
        state = None if self.holder is None else (await client.status(self.holder))["job"]["state"]
        if state not in ("accepted", "running"):
            self.serial += 1
            env = make_envelope(
                f"holder-{self.serial}",
                input_uri=self.clip_cid,
                output_spec={"format": "mp4", "resolution": "720p", "codec": "h264", "audio_codec": "aac"},
                limits={
                    "timeout_seconds": 600,
                    "max_output_mb": 200,
                    "cpus": 0.25,
                    "memory_mb": 512,
                    "gpus": 0,
                },
            )
            body = await client.submit(sign_request(self.owner, self.did, {"job": env}))
            self.holder = str(body["job"]["id"])
            self.tally("holders")
        assert self.holder is not None
        holder, deadline = self.holder, time.monotonic() + HOLDER_RUNNING_TIMEOUT_SECONDS
        while (await client.status(holder))["job"]["state"] != "running":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the holder {holder} did not start running")
            await asyncio.sleep(0.05)

    # -- the load -------------------------------------------------------------------------------------

    async def load(self, client: NodeClient, signer: Signer, seen: _Answers, signalled: list[float]) -> None:
        """Quote then accept small jobs until the node stops answering after the signal."""
        while True:
            self.serial += 1
            env = make_envelope(f"load-{self.serial}", limits=SMALL)
            quote_token = sign_request(signer, self.did, {"job": env})
            quote = await self.request(client.quote(quote_token), signalled, seen)
            if quote is None:
                if signalled:
                    return
                continue
            if quote is not False:
                seen.quoted[str(quote["job"]["id"])] = quote_token
                submit_token = sign_request(signer, self.did, {"job": env})
                done = await self.request(client.submit(submit_token, quote["jwt"]), signalled, seen)
                if done is None and signalled:
                    return
                if isinstance(done, dict):
                    seen.accepted[str(done["job"]["id"])] = submit_token

    async def request(
        self, call: Awaitable[dict[str, Any]], signalled: list[float], seen: _Answers
    ) -> dict[str, Any] | Literal[False] | None:
        """The answer's body on success; False on a structured refusal; None when the node did not answer."""
        try:
            body: dict[str, Any] = await call
            return body
        except NodeUnreachable as exc:
            if not signalled:
                self.row.fail("unreachable_before_signal", exc.message)
            return None
        except NodeError as exc:
            self.judge_refusal(exc, signalled, seen)
            if exc.retryable:  # as a polite client does; it keeps the drain's 503s countable
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
            return False

    def judge_refusal(self, exc: NodeError, signalled: list[float], seen: _Answers) -> None:
        err = exc.body.get("error") if isinstance(exc.body, dict) else None
        if not isinstance(err, dict) or not {"code", "domain", "message", "retryable"} <= err.keys():
            self.row.fail("not_json_error", f"{exc.status}: {str(exc.body)[:200]}")
        elif exc.code == "draining":
            if exc.status != 503 or not err["retryable"]:
                self.row.fail("draining_shape", f"{exc.status} retryable={err['retryable']}")
            if not signalled:
                self.row.fail("draining_before_signal", "a 503 draining before any SIGTERM")
            seen.drain_503 += 1
        elif exc.status >= 500 and exc.status != 503:
            self.row.fail("server_error", f"{exc.status} {exc.code}: {exc.message}")
        else:
            self.tally(f"refused_{exc.code}")

    async def iteration(self) -> _Answers:
        seen = _Answers()
        signalled: list[float] = []  # the moment the SIGTERM went, once it went
        proc = self.daemon.proc
        assert proc is not None
        async with NodeClient(self.daemon.url, timeout=CLIENT_TIMEOUT) as client:
            await self.ensure_holder(client)
            tasks = [asyncio.create_task(self.load(client, s, seen, signalled)) for s in self.clients]
            await asyncio.sleep(self.rng.uniform(*LOAD_WINDOW_SECONDS))
            signalled.append(time.monotonic())
            proc.terminate()  # SIGTERM: the drain begins
            limit = DRAIN_GRACE_SECONDS + EXIT_ALLOWANCE_SECONDS
            try:
                code = await asyncio.to_thread(proc.wait, limit + 30)
            except subprocess.TimeoutExpired:
                self.row.fail("no_exit", f"still running {limit + 30:.0f} s after SIGTERM")
                proc.kill()
                code = await asyncio.to_thread(proc.wait)
            took = time.monotonic() - signalled[0]
            await asyncio.gather(*tasks)
        if code != 0:
            self.row.fail("exit_status", f"the daemon exited with {code} after SIGTERM")
        if took > limit:
            self.row.fail("slow_exit", f"exited {took:.1f} s after SIGTERM (grace {DRAIN_GRACE_SECONDS} s)")
        self.row.good["slowest_exit_ms"] = max(self.row.good.get("slowest_exit_ms", 0), round(took * 1000))
        if not seen.drain_503:
            self.row.fail("drain_not_observed", "no 503 draining between SIGTERM and exit")
        self.tally("drain_503", seen.drain_503)
        return seen

    def check_answered(self, seen: _Answers) -> None:
        view = read_journal(self.daemon.home)
        for answered, state in ((seen.quoted, "priced"), (seen.accepted, "accepted")):
            for job, token in answered.items():
                facts = view.jobs.get(job)
                if facts is None or facts.count(state) == 0:
                    self.row.fail("answered_lost", f"{job}: answered {state}, not in the journal")
                elif token_nonce(token) not in view.nonces:
                    self.row.fail("answered_lost", f"{job}: answered {state}, its nonce not recorded")
            self.tally(f"answered_{state}", len(answered))
        if self.holder is not None and view.jobs[self.holder].state not in ("accepted", "running", "failed"):
            self.row.fail("holder_lost", f"{self.holder} is {view.jobs[self.holder].state} after the restart")


@scenario(NAME, stated=50, short=3)
def run(count: int, workdir: Path) -> Row:
    row = Row(NAME, count)
    r = _Run(row, workdir)
    try:
        start(r.daemon)
        for n in range(count):
            seen = asyncio.run(r.iteration())
            start(r.daemon)
            r.check_answered(seen)
            row.runs = n + 1
    finally:
        r.daemon.stop()
        remove_containers(node_containers(r.did))
    return row
