"""Metrics beyond the basics, read from /metrics of real nodes: bid outcomes with reasons, failed jobs by
domain (from the journal, so they survive a restart), per-kind runtime and overhead of real transcodes,
container starts (checked against Docker's own event log) and bytes stored.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest
from aiohttp.test_utils import TestServer

from core.config import load_config
from core.defaults import DEFAULT_DOCKER_URL
from node.daemon import Node
from node.server import build_app
from payments.keys import Signer, load_key, new_ed25519
from requester.client import sign_request
from sandbox.ffmpeg import make_test_clip
from sandbox.runner import LABEL_NODE
from tests.conftest import LiveNode, live, make_envelope, write_home
from tests.promtext import sample, samples

FINISHED = {"completed", "failed", "cancelled"}


async def metrics_text(ln: LiveNode) -> str:
    async with aiohttp.ClientSession() as s, s.get(ln.url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


async def post_jwt(ln: LiveNode, path: str, token: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(ln.url + path, data=token, headers={"Content-Type": "application/jwt"}) as r,
    ):
        body: dict[str, Any] = await r.json()
        return r.status, body


async def get_json(ln: LiveNode, path: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(ln.url + path) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def wait_finished(ln: LiveNode, job: str, limit: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        view: dict[str, Any] = (await get_json(ln, f"/v1/jobs/{job}"))["job"]
        if view["state"] in FINISHED:
            return view
        assert time.monotonic() < deadline, f"job {job} stuck in {view['state']}"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------------ quotes


async def test_refusals_to_bid_are_counted_with_their_reason(tmp_path: Path, requester: Signer) -> None:
    denied = new_ed25519()
    config = {
        "policy": {"deny_dids": [denied.did]},
        "capacity": {"cpus": 1, "reserve_memory_mb": 0},
    }
    async with live(write_home(tmp_path / "h", config)) as ln:
        assert (await post_jwt(ln, "/v1/quotes", ln.sign(requester, {"job": make_envelope("ok")})))[0] == 201
        status, _ = await post_jwt(ln, "/v1/quotes", ln.sign(denied, {"job": make_envelope("denied")}))
        assert status == 403
        too_big = make_envelope("big", limits={**make_envelope()["limits"], "cpus": 2})
        status, _ = await post_jwt(ln, "/v1/quotes", ln.sign(requester, {"job": too_big}))
        assert status == 422
        cheap = make_envelope("cheap", max_price="0.000001")
        assert (await post_jwt(ln, "/v1/quotes", ln.sign(requester, {"job": cheap})))[0] == 402
        # A bid-and-accept in one step that is refused counts the same way.
        assert (await post_jwt(ln, "/v1/jobs", ln.sign(requester, {"job": cheap})))[0] == 402
        # A forged request is no bid refused: it never got as far (hearth_auth_rejections counts it).
        forged = ln.sign(requester, {"job": make_envelope("forged")})[:-4] + "AAAA"
        assert (await post_jwt(ln, "/v1/quotes", forged))[0] == 401

        text = await metrics_text(ln)
        quotes = "hearth_quotes_total"
        assert sample(text, quotes, outcome="won", reason="ok") == 1
        assert sample(text, quotes, outcome="refused", reason="did_denied") == 1
        assert sample(text, quotes, outcome="refused", reason="exceeds_capacity") == 1
        assert sample(text, quotes, outcome="refused", reason="price_above_max") == 2  # counted once each
        refused = [s.labels["reason"] for s in samples(text, quotes) if s.labels["outcome"] == "refused"]
        assert sorted(refused) == ["did_denied", "exceeds_capacity", "price_above_max"]


@asynccontextmanager
async def clocked_node(home: Path, clock: list[float]) -> AsyncIterator[LiveNode]:
    """A live node whose clock is ``clock[0]``: a test moves time on by changing it."""
    node = Node(home, load_config(home), load_key(home / "node.key"), now=lambda: clock[0])
    server = TestServer(build_app(node), host="127.0.0.1")
    await server.start_server()
    try:
        yield LiveNode(node, server)
    finally:
        await server.close()


async def test_a_quote_that_expires_unaccepted_is_a_lost_bid(tmp_path: Path, requester: Signer) -> None:
    clock = [time.time()]
    async with clocked_node(write_home(tmp_path / "h"), clock) as ln:
        assert (await post_jwt(ln, "/v1/quotes", ln.sign(requester, {"job": make_envelope("a")})))[0] == 201
        assert (await post_jwt(ln, "/v1/quotes", ln.sign(requester, {"job": make_envelope("b")})))[0] == 201
        assert sample(await metrics_text(ln), "hearth_quotes_total", outcome="lost", reason="expired") is None
        clock[0] += ln.node.cfg.api.quote_ttl_seconds + 1
        ln.node.admission.expire_quotes()
        text = await metrics_text(ln)
        assert sample(text, "hearth_quotes_total", outcome="lost", reason="expired") == 2
        assert sample(text, "hearth_quotes_total", outcome="won", reason="ok") == 2
        assert sample(text, "hearth_jobs", state="expired") == 2


# ------------------------------------------------------------------------------------------------ jobs


async def test_failed_jobs_by_domain_come_from_the_journal_and_survive_a_restart(
    tmp_path: Path, requester: Signer, sandbox_images: dict[str, str]
) -> None:
    # The input is on no gateway and not on the node: the run fails in domain "storage", not retryable.
    home = write_home(tmp_path / "h", {"scheduler": {"paused": False}})
    async with live(home) as ln:
        status, body = await post_jwt(
            ln, "/v1/jobs", ln.sign(requester, {"job": make_envelope("lost-input")})
        )
        assert status == 201, body
        view = await wait_finished(ln, body["job"]["id"])
        assert view["state"] == "failed" and view["failure"]["domain"] == "storage"
        text = await metrics_text(ln)
        assert sample(text, "hearth_jobs_failed", domain="storage") == 1
        assert sample(text, "hearth_jobs_failed", domain="execution") == 0
        assert sample(text, "hearth_job_runs_total", outcome="failed", domain="storage") == 1
    async with live(home) as again:
        text = await metrics_text(again)
        assert sample(text, "hearth_jobs_failed", domain="storage") == 1  # read from the journal
        assert sample(text, "hearth_job_runs_total", outcome="failed", domain="storage") is None


def container_starts_seen_by_docker(node_did: str, since: float) -> int:
    """How many containers labelled as ``node_did``'s the engine started since ``since`` (its event log)."""
    client = docker.APIClient(base_url=DEFAULT_DOCKER_URL)
    try:
        events = client.events(
            since=int(since),
            until=int(time.time()) + 1,
            filters={"type": "container", "event": "start", "label": f"{LABEL_NODE}={node_did}"},
            decode=True,
        )
        return sum(1 for _ in events)
    finally:
        client.close()


async def test_a_transcode_reports_runtime_overhead_container_starts_and_bytes_stored(
    tmp_path: Path, requester: Signer, sandbox_images: dict[str, str]
) -> None:
    clip = make_test_clip(tmp_path / "clip.mp4", seconds=2, width=160, height=120).read_bytes()
    since = time.time() - 1
    async with live(write_home(tmp_path / "h", {"scheduler": {"paused": False}})) as ln:
        text = await metrics_text(ln)
        assert sample(text, "hearth_blockstore", unit="bytes") == 0
        assert sample(text, "hearth_container_starts_total") == 0

        async with aiohttp.ClientSession() as s, s.put(ln.url + "/v1/blobs", data=io.BytesIO(clip)) as r:
            assert r.status == 201
            cid = (await r.json())["cid"]
        stored_input = sample(await metrics_text(ln), "hearth_blockstore", unit="bytes")
        assert stored_input is not None and stored_input >= len(clip)

        envelope = make_envelope(
            "metrics-1",
            input_uri=cid,
            output_spec={"format": "mp4", "resolution": "360p", "codec": "h264", "audio_codec": "aac"},
            validation={"min_duration_seconds": 1, "required_streams": ["video", "audio"]},
        )
        status, body = await post_jwt(ln, "/v1/jobs", sign_request(requester, ln.did, {"job": envelope}))
        assert status == 201, body
        job = body["job"]["id"]
        assert (await wait_finished(ln, job))["state"] == "completed"
        result = (await get_json(ln, f"/v1/jobs/{job}/result"))["result"]

        text = await metrics_text(ln)
        kind = {"kind": "ffmpeg_transcode"}
        assert sample(text, "hearth_job_runtime_seconds_count", **kind) == 1
        assert sample(text, "hearth_job_runtime_seconds_sum", **kind) == pytest.approx(
            result["runtime_seconds"]
        )
        overhead = result["runtime_seconds"] - result["container_seconds"]
        assert overhead > 0  # fetch, checks and import happen outside the container
        assert sample(text, "hearth_job_overhead_seconds_count", **kind) == 1
        assert sample(text, "hearth_job_overhead_seconds_sum", **kind) == pytest.approx(overhead)
        assert sample(text, "hearth_job_runtime_seconds_count", kind="vllm_batch") is None

        starts = sample(text, "hearth_container_starts_total")
        assert starts is not None and starts >= 2  # at least the input probe and the transcode
        assert starts == container_starts_seen_by_docker(ln.did, since)

        stored = sample(text, "hearth_blockstore", unit="bytes")
        assert stored is not None and stored >= stored_input + result["artifact_size"]
