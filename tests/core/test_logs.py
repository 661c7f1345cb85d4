"""Structured logs: JSON lines carrying the job and its trace id, from the request to the last transition."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.logs import JsonFormatter, configure_logging, enter_job, job_context, log_transition, trace_id_for
from payments.keys import Signer
from tests.conftest import DaemonProcess, free_port, make_envelope, sign_request, write_home


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every log line of the test, formatted as ``hearth run`` formats them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_trace_ids_are_w3c_sized_and_stable() -> None:
    trace = trace_id_for("hj_abc")
    assert len(trace) == 32 and int(trace, 16) >= 0
    assert trace == trace_id_for("hj_abc") != trace_id_for("hj_abd")


def test_lines_inside_a_job_carry_it_and_lines_outside_do_not(captured: io.StringIO) -> None:
    log = logging.getLogger("hearth.test")
    log.info("before")
    with job_context("hj_one"):
        log.warning("inside %s", "the job", extra={"attempt": 2, "stage": "fetching"})
    log.info("after")
    before, inside, after = lines(captured)
    assert "job" not in before and "trace_id" not in before and "job" not in after
    assert inside["message"] == "inside the job" and inside["level"] == "warning"
    assert (inside["job"], inside["trace_id"]) == ("hj_one", trace_id_for("hj_one"))
    assert (inside["attempt"], inside["stage"], inside["logger"]) == (2, "fetching", "hearth.test")


def test_an_explicit_job_wins_and_exceptions_are_kept(captured: io.StringIO) -> None:
    log = logging.getLogger("hearth.test")
    with job_context("hj_outer"):
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", extra={"job": "hj_named"})
    [line] = lines(captured)
    assert line["job"] == "hj_named" and line["trace_id"] == trace_id_for("hj_named")
    assert "ValueError: boom" in line["exc"]


async def test_a_task_that_enters_a_job_keeps_it_to_itself(captured: io.StringIO) -> None:
    log = logging.getLogger("hearth.test")

    async def attempt(job: str) -> None:
        enter_job(job)
        await asyncio.sleep(0)
        log.info("working")

    await asyncio.gather(attempt("hj_a"), attempt("hj_b"))
    log.info("the loop itself")
    jobs = [line.get("job") for line in lines(captured)]
    assert sorted(jobs[:2]) == ["hj_a", "hj_b"] and jobs[2] is None


def test_transitions_are_logged_once_each_with_domain(captured: io.StringIO) -> None:
    class Ev:
        def __init__(self, type: str, **kw: Any) -> None:
            self.type, self.job, self.actor, self.reason = type, "hj_t", "scheduler", "why"
            self.from_state, self.to_state, self.domain, self.retryable = "running", "failed", None, None
            self.__dict__.update(kw)

    log_transition(Ev("progress"))
    log_transition(Ev("transition", domain="execution", retryable=True))
    [line] = lines(captured)
    assert line["message"] == "running -> failed (scheduler): why"
    assert (line["job"], line["from_state"], line["to_state"]) == ("hj_t", "running", "failed")
    assert (line["domain"], line["retryable"]) == ("execution", True)


def test_configure_logging_replaces_the_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("WARNING", "text")
        logging.getLogger("hearth.test").warning("plain")
        logging.getLogger("hearth.test").info("dropped")
        configure_logging("INFO", "json")
        logging.getLogger("hearth.test").info("structured")
        err = capsys.readouterr().err.splitlines()
        assert err[0].endswith("hearth.test WARNING plain") and len(err) == 2
        assert json.loads(err[1])["message"] == "structured"
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


async def test_a_daemons_log_follows_a_job_by_id_and_never_shows_its_keys(
    tmp_path: Path, requester: Signer, sandbox_images: dict[str, str]
) -> None:
    import aiohttp

    from sandbox.ffmpeg import make_test_clip
    from tests.node.test_execution import upload, wait_state

    port = free_port()
    home = write_home(tmp_path / "home", {"scheduler": {"paused": False}}, port=port)
    daemon = DaemonProcess(home, port)
    daemon.start()
    try:
        clip = make_test_clip(tmp_path / "clip.mp4", seconds=2, width=320, height=240)
        cid = await upload(daemon.url, clip.read_bytes())
        async with aiohttp.ClientSession() as s:
            caps = await (await s.get(f"{daemon.url}/v1/capacity")).json()
            env = make_envelope(
                "logged-1",
                input_uri=cid,
                output_spec={"format": "mp4", "resolution": "360p", "codec": "h264", "audio_codec": "aac"},
            )
            token = sign_request(requester, caps["node"], {"job": env})
            async with s.post(
                f"{daemon.url}/v1/jobs", data=token, headers={"Content-Type": "application/jwt"}
            ) as r:
                job = (await r.json())["job"]["id"]
        view = await wait_state(daemon.url, job, {"completed", "failed"})
        assert view["state"] == "completed", view["failure"]
    finally:
        daemon.stop()
    text = daemon.log.read_text()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    mine = [r for r in records if r.get("job") == job]
    assert {r["trace_id"] for r in mine} == {trace_id_for(job)}
    moves = [(r["from_state"], r["to_state"]) for r in mine if r["logger"] == "hearth.jobs"]
    assert moves[-2:] == [("accepted", "running"), ("running", "completed")]
    key = json.loads((home / "node.key").read_text())
    secrets = [str(v) for k, v in key.items() if k not in ("type", "did", "public_key")]
    assert secrets and not any(secret in text for secret in secrets)
