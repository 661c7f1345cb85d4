"""A real daemon process under attack, and the probes that judge how it holds: answers, timings, health.

Shared by the focused tests in this folder and the fault scoreboard (tests/chaos/scenario_sandbox.py).
Everything goes over loopback HTTP to ``hearth run`` in a child process, as a requester would; nothing
reaches into the node's memory.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from payments.keys import Signer
from requester.client import sign_request
from sandbox.runner import LABEL_JOB_ID
from tests.conftest import DaemonProcess, free_port, labelled_containers, make_envelope, write_home

FINISHED = frozenset({"completed", "failed", "cancelled"})
ERROR_FIELDS = frozenset({"code", "domain", "message", "retryable", "details"})
# Jobs run at once and are never retried: each case ends in exactly one attempt, so its code is its own.
# Capacity is oversold (and one requester may hold much of it): the small jobs and live quotes of many
# rounds must never queue or be refused for capacity on a small machine; that is another row's fault.
RUN_CONFIG: dict[str, Any] = {
    "scheduler": {"paused": False},
    "policy": {"retry_budget": 0, "per_did_concurrency": 1000},
    "capacity": {"overcommit": 64.0},
}
HEALTH_POLL_SECONDS = 0.25
HEALTH_TIMEOUT_SECONDS = 5.0
# "Answers promptly": a liveness probe slower than this while jobs are killed around it is a failure.
HEALTH_PROMPT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer: status, parsed JSON body (None when not JSON) and how long it took."""

    status: int
    body: Any
    seconds: float

    @property
    def error(self) -> dict[str, Any] | None:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return err if isinstance(err, dict) else None

    def well_formed_refusal(self) -> bool:
        """A 4xx whose body is the structured error shape, all fields present."""
        return 400 <= self.status < 500 and self.error is not None and set(self.error) >= ERROR_FIELDS


@dataclass
class HealthWatch:
    """/healthz polled in the background: how many answers, the slowest one, and every failure."""

    url: str
    samples: int = 0
    slowest: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> bool:
        return self.samples > 0 and not self.failures and self.slowest <= HEALTH_PROMPT_SECONDS

    def summary(self) -> str:
        return f"{self.samples} answers, slowest {self.slowest:.2f}s, failures {self.failures[:3]}"

    async def poll(self, session: aiohttp.ClientSession) -> None:
        while True:
            t0 = time.monotonic()
            try:
                timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_SECONDS)
                async with session.get(f"{self.url}/healthz", timeout=timeout) as r:
                    body = await r.json()
                    if r.status != 200 or body != {"status": "ok"}:
                        self.failures.append(f"status {r.status}")
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.failures.append(type(exc).__name__)
            self.samples += 1
            self.slowest = max(self.slowest, time.monotonic() - t0)
            await asyncio.sleep(HEALTH_POLL_SECONDS)


class AttackedNode:
    """A ``hearth run`` child process with a requester key, driven over loopback HTTP.

    Use :meth:`session` for a client session that also watches /healthz for as long as it is open.
    """

    def __init__(self, home: Path, signer: Signer, config: dict[str, Any] | None = None) -> None:
        self.port = free_port()
        self.home = write_home(home, config if config is not None else RUN_CONFIG, port=self.port)
        self.process = DaemonProcess(self.home, self.port)
        self.signer = signer
        self.did = ""
        self._log_read = 0

    @property
    def url(self) -> str:
        return self.process.url

    def start(self) -> None:
        self.process.start(timeout=60)
        self.did = _node_did(self.url)

    def restart(self, config: dict[str, Any]) -> None:
        """Stop (SIGTERM), rewrite node.toml with ``config``, start again on the same home and port."""
        self.process.stop()
        write_home(self.home, config, port=self.port)
        self.start()

    def stop(self) -> None:
        self.process.stop()

    def log_tail(self, chars: int = 3000) -> str:
        return self.process.log.read_text(errors="replace")[-chars:] if self.process.log.exists() else ""

    def new_log_lines(self) -> list[str]:
        """The daemon's log lines written since the last call (all of them on the first)."""
        if not self.process.log.exists():
            return []
        with self.process.log.open("rb") as log:
            log.seek(self._log_read)
            data = log.read()
        self._log_read += len(data)
        return data.decode(errors="replace").splitlines()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[tuple[aiohttp.ClientSession, HealthWatch]]:
        watch = HealthWatch(self.url)
        async with aiohttp.ClientSession() as session:
            poller = asyncio.create_task(watch.poll(session))
            try:
                yield session, watch
            finally:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)

    async def upload(self, session: aiohttp.ClientSession, data: bytes) -> str:
        async with session.put(f"{self.url}/v1/blobs", data=io.BytesIO(data)) as r:
            body = await r.json()
            if r.status != 201:
                raise AssertionError(f"upload refused: {r.status} {body}")
            return str(body["cid"])

    async def post_signed(
        self, session: aiohttp.ClientSession, route: str, env: dict[str, Any], *, limit: float
    ) -> Answer:
        """POST a fresh signed request for ``env`` to ``route`` (/v1/quotes or /v1/jobs), timed."""
        token = sign_request(self.signer, self.did, {"job": env})
        t0 = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=limit)
        headers = {"Content-Type": "application/jwt"}
        async with session.post(f"{self.url}{route}", data=token, headers=headers, timeout=timeout) as r:
            text = await r.text()
            status = r.status
        return Answer(status, _json_or_none(text), time.monotonic() - t0)

    async def view(self, session: aiohttp.ClientSession, job: str) -> dict[str, Any]:
        async with session.get(f"{self.url}/v1/jobs/{job}") as r:
            body = await r.json()
            if r.status != 200:
                raise AssertionError(f"status of {job}: {r.status} {body}")
            view: dict[str, Any] = body["job"]
            return view

    async def wait_finished(self, session: aiohttp.ClientSession, job: str, limit: float) -> dict[str, Any]:
        """The job's view once it is in a terminal state; AssertionError when ``limit`` passes first."""
        deadline = time.monotonic() + limit
        while True:
            view = await self.view(session, job)
            if view["state"] in FINISHED:
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} still {view['state']} after {limit:.0f}s")
            await asyncio.sleep(0.1)

    async def events(self, session: aiohttp.ClientSession, job: str) -> list[dict[str, Any]]:
        async with session.get(f"{self.url}/v1/jobs/{job}/events?follow=false") as r:
            text = await r.text()
        return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def transcode_envelope(
    job_id: str, cid: str, *, resolution: str = "360p", limits: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A silent MP4 transcode of blob ``cid`` with the given limits over sane defaults."""
    base = {"timeout_seconds": 120, "max_output_mb": 200, "cpus": 1.0, "memory_mb": 1024, "gpus": 0}
    return make_envelope(
        job_id,
        input_uri=cid,
        output_spec={"format": "mp4", "resolution": resolution, "codec": "h264", "audio_codec": "none"},
        limits={**base, **(limits or {})},
        validation={"min_duration_seconds": 0, "required_streams": ["video"]},
    )


def containers_of(job: str) -> set[str]:
    """IDs of the containers labelled with ``job``, running or not."""
    return labelled_containers(LABEL_JOB_ID, job)


def _node_did(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/capacity", timeout=10) as resp:
        return str(json.loads(resp.read())["node"])


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
