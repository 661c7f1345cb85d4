"""Accepted transcodes really run: Docker sandbox, ffmpeg, blockstore, gateway, through the node's API.

Each test drives a node over HTTP the way a requester would: upload the input (PUT /v1/blobs), submit a
signed job, follow it to its end, fetch the result and the artifact. Needs the Docker engine and the
images from scripts/docker.sh (the ``sandbox_images`` fixture makes sure of both).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from payments.keys import Signer
from sandbox.ffmpeg import make_test_clip
from sandbox.runner import LABEL_JOB_ID
from storage import import_bytes, import_path, read_car
from tests.conftest import (
    REPO,
    DaemonProcess,
    LiveNode,
    free_port,
    labelled_containers,
    live,
    make_envelope,
    sign_request,
    write_home,
)

RUN_CONFIG = {"scheduler": {"paused": False}}
FINISHED = {"completed", "failed", "cancelled"}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_clip(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=3, width=320, height=240)


@pytest.fixture
async def runner_node(tmp_path: Path, sandbox_images: dict[str, str]) -> Any:
    async with live(write_home(tmp_path / "home", RUN_CONFIG)) as ln:
        yield ln


async def upload(url: str, data: bytes) -> str:
    async with aiohttp.ClientSession() as s, s.put(f"{url}/v1/blobs", data=io.BytesIO(data)) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["cid"])


async def submit(url: str, node_did: str, signer: Signer, env: dict[str, Any]) -> str:
    token = sign_request(signer, node_did, {"job": env})
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/jobs", data=token, headers={"Content-Type": "application/jwt"}) as r,
    ):
        body = await r.json()
        assert r.status == 201, body
        return str(body["job"]["id"])


async def wait_state(url: str, job: str, states: set[str], limit: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as s:
        while True:
            async with s.get(f"{url}/v1/jobs/{job}") as r:
                view: dict[str, Any] = (await r.json())["job"]
            if view["state"] in states:
                return view
            assert time.monotonic() < deadline, f"job {job} stuck in {view['state']}"
            await asyncio.sleep(0.1)


async def events(url: str, job: str, *, follow: bool = False) -> list[dict[str, Any]]:
    query = "true" if follow else "false"
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/jobs/{job}/events?follow={query}") as r:
        text = await r.text()
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def transcode(cid: str, job_id: str, **spec: Any) -> dict[str, Any]:
    output_spec = {"format": "mp4", "resolution": "360p", "codec": "h264", "audio_codec": "aac", **spec}
    return make_envelope(
        job_id,
        input_uri=cid,
        output_spec=output_spec,
        validation={"min_duration_seconds": 2, "required_streams": ["video", "audio"]},
    )


def containers_of(job: str) -> set[str]:
    """IDs of the containers labelled with ``job``, running or not."""
    return labelled_containers(LABEL_JOB_ID, job)


async def test_a_transcode_runs_and_its_artifact_verifies_with_an_independent_ipfs_client(
    runner_node: LiveNode, requester: Signer, clip: Path, tmp_path: Path, sandbox_images: dict[str, str]
) -> None:
    url = runner_node.url
    cid = await upload(url, clip.read_bytes())
    job = await submit(url, runner_node.did, requester, transcode(cid, "mp4-1"))
    # a live event stream follows the job and ends by itself once the result is ready
    streamed = await asyncio.wait_for(events(url, job, follow=True), 180)
    assert streamed[-1]["to"] == "completed"
    view = await wait_state(url, job, FINISHED)
    assert view["state"] == "completed", view

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/v1/jobs/{job}/result") as r:
            assert r.status == 200
            signed = await r.json()
        result = signed["result"]
        assert result["status"] == "completed" and result["checks"]["passed"] is True
        assert {c["name"] for c in result["checks"]["checks"]} >= {"stream_layout", "duration", "resolution"}
        assert result["provenance"]["image_digest"] == sandbox_images["hearth/ffmpeg:latest"]
        assert result["provenance"]["input_cid"] == cid and len(result["provenance"]["argv_hash"]) == 64
        assert 0 < float(result["cost"]) <= float(view["price"])
        artifact = result["artifact_cid"]
        assert result["artifact_uri"] == f"ipfs://{artifact}"
        async with s.get(f"{url}/ipfs/{artifact}", headers={"Accept": "application/vnd.ipld.car"}) as r:
            assert r.status == 200
            car = await r.read()

    # our reader verifies every block; then npm ipfs-car, an independent implementation, unpacks it
    roots, blocks = read_car(io.BytesIO(car))
    assert [str(r) for r in roots] == [artifact] and len(list(blocks)) >= 1
    (tmp_path / "a.car").write_bytes(car)
    out = tmp_path / "unpacked.mp4"
    unpack = await asyncio.create_subprocess_exec(
        str(REPO / "node_modules/.bin/ipfs-car"), "unpack", str(tmp_path / "a.car"), "--output", str(out)
    )
    assert await asyncio.wait_for(unpack.wait(), 60) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == result["artifact_sha256"]

    seen = await events(url, job)
    stages = {e["data"]["stage"] for e in seen if e["type"] == "progress"}
    assert {"fetching", "probing", "transcoding"} <= stages
    percents = [
        e["data"]["percent"] for e in seen if e["type"] == "progress" and e["data"]["stage"] == "transcoding"
    ]
    assert percents and percents == sorted(percents)
    assert [e["to"] for e in seen if e["type"] == "transition"][-2:] == ["running", "completed"]
    assert containers_of(job) == set()  # every container removed after its run

    # `hearth job replay` runs the job again from its records: the same CID (bit-exact presets)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "job",
        "replay",
        job,
        "--home",
        str(runner_node.node.home),
        "--json",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 120)
    replay = json.loads(stdout)
    assert proc.returncode == 0, replay
    assert replay["match"] is True and replay["replay_cid"] == artifact and replay["argv_hash_match"]


async def test_hls_output_is_published_as_a_directory(
    runner_node: LiveNode, requester: Signer, clip: Path
) -> None:
    url = runner_node.url
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        "blob",
        "put",
        str(clip),
        "--node",
        url,
        "--json",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    cid = json.loads(stdout)["cid"]
    assert cid == str(import_path(clip).cid)  # `hearth blob put` uploads; the CID is the file's own
    env = transcode(cid, "hls-1", format="hls", renditions=["360p"], segment_seconds=2)
    del env["output_spec"]["resolution"]
    job = await submit(url, runner_node.did, requester, env)
    assert (await wait_state(url, job, FINISHED))["state"] == "completed"
    result = runner_node.node.journal.require(job).result
    assert result is not None
    names = {f["name"] for f in result["files"]}
    assert "master.m3u8" in names and any(n.endswith(".ts") for n in names)
    # a file inside the published directory, by path
    async with aiohttp.ClientSession() as s, s.get(f"{url}/ipfs/{result['artifact_cid']}/master.m3u8") as r:
        assert r.status == 200 and (await r.text()).startswith("#EXTM3U")


async def test_a_hostile_input_fails_once_in_validation_and_leaves_nothing(
    tmp_path: Path, requester: Signer, sandbox_images: dict[str, str]
) -> None:
    # The job is accepted before its input is uploaded, so no quote-time probe stands in the way: the
    # run itself meets the hostile file.
    playlist = b"#EXTM3U\n#EXTINF:10,\nfile:///etc/passwd\n"
    cid = str(import_bytes(playlist).cid)
    home = write_home(tmp_path / "home", {"scheduler": {"paused": True}})
    async with live(home) as ln:
        job = await submit(ln.url, ln.did, requester, transcode(cid, "hostile-1"))
        assert await upload(ln.url, playlist) == cid
    async with live(write_home(home, RUN_CONFIG)) as ln:
        view = await wait_state(ln.url, job, FINISHED)
        assert view["state"] == "failed" and view["failure"]["domain"] == "validation"
        assert view["failure"]["retryable"] is False and view["attempts"] == 0
        assert "root:" not in json.dumps(await events(ln.url, job))  # nothing of the host file comes back
    assert containers_of(job) == set()


async def test_an_input_sha256_mismatch_fails_in_storage_before_any_container(
    runner_node: LiveNode, requester: Signer, clip: Path
) -> None:
    url = runner_node.url
    cid = await upload(url, clip.read_bytes())
    env = transcode(cid, "mismatch-1")
    env["input_sha256"] = "0" * 64
    job = await submit(url, runner_node.did, requester, env)
    view = await wait_state(url, job, FINISHED)
    assert view["state"] == "failed" and view["failure"]["domain"] == "storage"
    assert view["failure"]["code"] == "sha256_mismatch" and view["attempts"] == 0
    stages = [e["data"]["stage"] for e in await events(url, job) if e["type"] == "progress"]
    assert stages == ["fetching"]  # never probed, never transcoded


async def test_cancel_stops_the_running_container(
    runner_node: LiveNode, requester: Signer, tmp_path: Path
) -> None:
    url = runner_node.url
    long_clip = make_test_clip(tmp_path / "long.mp4", seconds=40, width=640, height=360)
    cid = await upload(url, long_clip.read_bytes())
    env = transcode(cid, "cancel-1", resolution="720p")
    env["limits"]["cpus"] = 0.2
    job = await submit(url, runner_node.did, requester, env)
    deadline = time.monotonic() + 60
    while not any(
        e["type"] == "progress" and e["data"]["stage"] == "transcoding" for e in await events(url, job)
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert containers_of(job), "the transcode container should be running"
    token = sign_request(requester, runner_node.did, {"cancel": job})
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/jobs/{job}/cancel", data=token, headers={"Content-Type": "application/jwt"}) as r,
    ):
        assert r.status == 200 and (await r.json())["outcome"] == "cancelled"
    deadline = time.monotonic() + 30
    while containers_of(job):
        assert time.monotonic() < deadline, "the container outlived its cancelled job"
        await asyncio.sleep(0.2)
    assert runner_node.node.journal.require(job).state == "cancelled"
    assert job not in runner_node.node.ledger


def test_kill_9_mid_run_then_restart_retries_cleanly(
    tmp_path: Path, requester: Signer, sandbox_images: dict[str, str]
) -> None:
    port = free_port()
    daemon = DaemonProcess(write_home(tmp_path / "home", RUN_CONFIG, port=port), port)
    long_clip = make_test_clip(tmp_path / "long.mp4", seconds=20, width=640, height=360)
    try:
        daemon.start()

        async def begin() -> tuple[str, str]:
            async with aiohttp.ClientSession() as s, s.get(f"{daemon.url}/v1/capacity") as r:
                node_did = (await r.json())["node"]
            cid = await upload(daemon.url, long_clip.read_bytes())
            env = transcode(cid, "crash-1", resolution="480p")
            env["limits"]["cpus"] = 0.5
            job = await submit(daemon.url, node_did, requester, env)
            deadline = time.monotonic() + 60
            while not any(
                e["type"] == "progress" and e["data"]["stage"] == "transcoding"
                for e in await events(daemon.url, job)
            ):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            return job, cid

        job, _ = asyncio.run(begin())
        daemon.kill()
        orphans = containers_of(job)
        assert orphans, "the transcode outlives the daemon until recovery"
        daemon.start()
        assert not orphans & containers_of(job)  # recovery removed what the dead daemon left running

        view = asyncio.run(wait_state(daemon.url, job, FINISHED))
        assert view["state"] == "completed", view
        assert view["attempts"] == 1
        seen = asyncio.run(events(daemon.url, job))
        moves = [(e["from"], e["to"]) for e in seen if e["type"] == "transition"]
        assert ("running", "failed") in moves and moves[-1] == ("running", "completed")
        failed = next(e for e in seen if e["to"] == "failed")
        assert failed["reason"].startswith("node_restarted")
        assert sum(1 for m in moves if m[1] == "completed") == 1  # published once
        assert not orphans & containers_of(job)
        # nothing half-written is left in the blockstore, and no attempt folder remains
        assert not [p for p in (daemon.home / "blocks").rglob(".tmp-*")]
        assert not list((daemon.home / "state" / "work").glob(f"{job}/*"))
    finally:
        daemon.stop()


async def test_the_quote_probes_the_input_and_refuses_what_is_not_media(
    runner_node: LiveNode, requester: Signer, clip: Path
) -> None:
    url = runner_node.url
    cid = await upload(url, clip.read_bytes())
    async with aiohttp.ClientSession() as s:
        token = sign_request(requester, runner_node.did, {"job": transcode(cid, "probe-1")})
        async with s.post(f"{url}/v1/quotes", data=token, headers={"Content-Type": "application/jwt"}) as r:
            body = await r.json()
            assert r.status == 201, body
        estimate = body["quote"]["estimate"]
        assert estimate["basis"] == "ffprobe"  # priced on the input's real 3 s, not the envelope's limits
        assert 0 < estimate["cpu_seconds"] < 3 * 0.5 * 2

        junk = await upload(url, b"this is not a video at all\n" * 100)
        token = sign_request(requester, runner_node.did, {"job": transcode(junk, "probe-2")})
        async with s.post(f"{url}/v1/quotes", data=token, headers={"Content-Type": "application/jwt"}) as r:
            err = (await r.json())["error"]
            assert r.status == 422 and err["domain"] == "validation"
            assert err["code"] in ("input_not_media", "input_format_not_allowed")
    assert runner_node.node.journal.find(requester.did, "probe-2") is None  # refused: nothing recorded
