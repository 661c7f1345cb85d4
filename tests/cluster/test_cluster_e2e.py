"""One node in front of a real Ray cluster: a head (no CPUs of its own) and two workers on this machine.

``w1`` has one CPU; ``w2`` has one CPU and holds the test model. The node under test is a real ``hearth
run`` process (the cluster's driver), so it can be killed. Every container still runs on this machine's
Docker engine, labelled with the worker that started it, so the tests can tell the workers' runs apart.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cluster.devcluster import DevCluster
from payments.keys import Signer
from sandbox.ffmpeg import make_test_clip
from sandbox.runner import LABEL_NODE, LABEL_WORKER
from tests.conftest import DaemonProcess, TinyModel, free_port, labelled_containers, live, write_home
from tests.node.test_execution import containers_of, events, submit, transcode, upload, wait_state
from tests.node.test_inference import BATCH, batch_envelope, models_config
from tests.promtext import sample

FINISHED = {"completed", "failed", "cancelled"}
WORKER_MEMORY_MB = {"w1": 3000, "w2": 6000}


@pytest.fixture(scope="module")
def ray_cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel, sandbox_images: dict[str, str]
) -> Iterator[DevCluster]:
    with DevCluster(tmp_path_factory.mktemp("ray")) as cluster:
        cluster.add_worker("w1", cpus=1, memory_mb=WORKER_MEMORY_MB["w1"])
        cluster.add_worker(
            "w2", cpus=1, memory_mb=WORKER_MEMORY_MB["w2"], models={tiny_model.cid: tiny_model.path}
        )
        yield cluster


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {
        "short": make_test_clip(folder / "short.mp4", seconds=3, width=320, height=240),
        "long": make_test_clip(folder / "long.mp4", seconds=12, width=640, height=360),
    }


def head_home(path: Path, cluster: DevCluster, model: TinyModel, port: int) -> Path:
    return write_home(
        path,
        {
            "scheduler": {"paused": False},
            "pricing": {"minimum_per_job": "0"},
            "cluster": {
                "address": cluster.address,
                "head_url": f"http://127.0.0.1:{port}",
                "connect_timeout_seconds": 30,
                "refresh_seconds": 1,
            },
            "models": models_config(model),
        },
        port=port,
    )


@pytest.fixture
def head(tmp_path: Path, ray_cluster: DevCluster, tiny_model: TinyModel) -> Iterator[DaemonProcess]:
    port = free_port()
    daemon = DaemonProcess(head_home(tmp_path / "head", ray_cluster, tiny_model, port), port)
    daemon.start(timeout=60, env=ray_cluster.env())
    try:
        yield daemon
    finally:
        daemon.stop()


async def node_did(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/capacity") as r:
        return str((await r.json())["node"])


async def result(url: str, job: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/jobs/{job}/result") as r:
        assert r.status == 200, await r.text()
        return dict((await r.json())["result"])


def placements(seen: list[dict[str, Any]], program: str | None) -> list[tuple[int, str]]:
    """(attempt, worker) of every container (of ``program``, or any) the journal says was placed."""
    return [
        (e["data"]["attempt"], e["data"]["worker"])
        for e in seen
        if e["type"] == "note"
        and "worker" in (e.get("data") or {})
        and program in (None, e["data"].get("program"))
    ]


async def wait_for(url: str, job: str, check: Any, limit: float = 120) -> list[dict[str, Any]]:
    deadline = time.monotonic() + limit
    while True:
        seen = await events(url, job)
        if check(seen):
            return seen
        assert time.monotonic() < deadline, f"job {job}: the awaited event never came: {seen[-5:]}"
        await asyncio.sleep(0.1)


def transcoding(seen: list[dict[str, Any]]) -> bool:
    return any(e["type"] == "progress" and e["data"].get("stage") == "transcoding" for e in seen)


def one_cpu(env: dict[str, Any]) -> dict[str, Any]:
    env["limits"]["cpus"] = 1
    return env


async def single_machine_cid(tmp_path: Path, requester: Signer, clip: Path, env: dict[str, Any]) -> str:
    """The artifact CID the same envelope gives on a node without a cluster."""
    async with live(write_home(tmp_path / "single", {"scheduler": {"paused": False}})) as ln:
        cid = await upload(ln.url, clip.read_bytes())
        job = await submit(ln.url, ln.did, requester, {**env, "input_uri": cid})
        view = await wait_state(ln.url, job, FINISHED)
        assert view["state"] == "completed", view
        return str((await result(ln.url, job))["artifact_cid"])


async def test_the_offer_is_the_sum_of_the_workers(head: DaemonProcess, tiny_model: TinyModel) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{head.url}/v1/capacity") as r:
        offer = await r.json()
    machine = offer["machine"] if "machine" in offer else offer["capacity"]["machine"]
    assert machine["offered"] == {"cpus": 2.0, "memory_mb": sum(WORKER_MEMORY_MB.values()), "gpus": 0}
    workers = {w["name"]: w for w in machine["workers"]}
    assert set(workers) == {"w1", "w2"}
    assert workers["w1"]["cpus"] == 1.0 and workers["w1"]["memory_mb"] == WORKER_MEMORY_MB["w1"]
    assert workers["w2"]["models"] == [tiny_model.cid] and workers["w1"]["models"] == []


async def test_transcodes_spread_over_both_workers_and_give_the_single_machine_cid(
    head: DaemonProcess, requester: Signer, clips: dict[str, Path], tmp_path: Path
) -> None:
    did = await node_did(head.url)
    cid = await upload(head.url, clips["short"].read_bytes())
    envs = [one_cpu(transcode(cid, f"spread-{i}")) for i in range(2)]
    jobs = [await submit(head.url, did, requester, env) for env in envs]
    views = [await wait_state(head.url, job, FINISHED) for job in jobs]
    assert [v["state"] for v in views] == ["completed", "completed"], views
    ran_on = {worker for job in jobs for _, worker in placements(await events(head.url, job), "ffmpeg")}
    assert ran_on == {"w1", "w2"}  # one CPU each: the two jobs could only run side by side on both
    results = [await result(head.url, job) for job in jobs]
    assert {r["provenance"]["worker"] for r in results} == {"w1", "w2"}
    assert results[0]["artifact_cid"] == results[1]["artifact_cid"]
    assert results[0]["artifact_cid"] == await single_machine_cid(
        tmp_path, requester, clips["short"], envs[0]
    )
    # the artifact is the head's: its gateway serves it whole
    async with aiohttp.ClientSession() as s, s.get(f"{head.url}/ipfs/{results[0]['artifact_cid']}") as r:
        assert r.status == 200 and len(await r.read()) == results[0]["artifact_size"]


async def test_a_batch_runs_only_where_its_model_is_and_a_cancel_reaches_its_container(
    head: DaemonProcess, requester: Signer
) -> None:
    did = await node_did(head.url)
    cid = await upload(head.url, BATCH)
    for i in range(3):
        env = batch_envelope(cid, f"batch-{i}")
        env["limits"] |= {"cpus": 1, "memory_mb": 4096}
        job = await submit(head.url, did, requester, env)
        seen = await wait_for(head.url, job, lambda s: placements(s, None))
        assert placements(seen, None) == [(1, "w2")]  # w1 has a free CPU but not the weights
        if i == 0:  # the first runs to its end: vLLM on the worker, the model found there by its CID
            view = await wait_state(head.url, job, FINISHED, limit=300)
            assert view["state"] == "completed", view
            done = await result(head.url, job)
            assert done["provenance"]["worker"] == "w2" and done["usage"]["completion_tokens"] > 0
            continue
        deadline = time.monotonic() + 30
        while not containers_of(job):  # the container starts on w2
            assert time.monotonic() < deadline, "the batch's container never started"
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as s:
            token = _cancel_token(requester, did, job)
            async with s.post(f"{head.url}/v1/jobs/{job}/cancel", data=token, headers=_JWT) as r:
                assert r.status == 200, await r.text()
        assert (await wait_state(head.url, job, FINISHED))["state"] == "cancelled"
        deadline = time.monotonic() + 30
        while containers_of(job):  # the cancel reached the worker: its container is gone
            assert time.monotonic() < deadline, "the cancelled batch's container is still there"
            await asyncio.sleep(0.2)


async def test_a_worker_lost_mid_transcode_reruns_on_the_other_once(
    head: DaemonProcess, ray_cluster: DevCluster, requester: Signer, clips: dict[str, Path], tmp_path: Path
) -> None:
    did = await node_did(head.url)
    cid = await upload(head.url, clips["long"].read_bytes())
    env = one_cpu(transcode(cid, "lost-1", resolution="480p"))
    job = await submit(head.url, did, requester, env)
    seen = await wait_for(head.url, job, lambda s: transcoding(s) and placements(s, "ffmpeg"))
    [(_, lost)] = placements(seen, "ffmpeg")
    other = ({"w1", "w2"} - {lost}).pop()
    models = _models_of(ray_cluster, lost)
    try:
        ray_cluster.kill_raylet(lost)
        view = await wait_state(head.url, job, FINISHED, limit=180)
        assert view["state"] == "completed", view
        seen = await events(head.url, job)
        failure = next(e for e in seen if e["type"] == "transition" and e["to"] == "failed")
        assert failure["reason"].startswith("worker_lost") and failure["domain"] == "execution"
        assert failure["data"]["details"]["worker"] == lost
        assert placements(seen, "ffmpeg") == [(1, lost), (2, other)]
        moves = [(e["from"], e["to"]) for e in seen if e["type"] == "transition"]
        assert sum(1 for _, to in moves if to == "completed") == 1  # published once
        done = await result(head.url, job)
        assert done["provenance"]["worker"] == other and done["provenance"]["attempt"] == 2
        # operators see it: the lost run counted, the worker shown dead in the overview
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{head.url}/metrics") as r:
                assert sample(await r.text(), "hearth_cluster_workers_lost_total") == 1.0
            deadline = time.monotonic() + 30
            while True:
                async with s.get(f"{head.url}/v1/overview") as r:
                    view = (await r.json())["cluster"]
                dead = [w for w in view["workers"] if w["name"] == lost and not w["alive"]]
                if dead:
                    break
                assert time.monotonic() < deadline, view
                await asyncio.sleep(0.5)
            assert dead[0]["lost"] == 1 and view["lost_runs"] == 1 and view["alive"] == 1
        assert done["artifact_cid"] == await single_machine_cid(tmp_path, requester, clips["long"], env)
        # the lost worker's container did not outlive its task
        deadline = time.monotonic() + 30
        while labelled_containers(LABEL_WORKER, lost) & containers_of(job):
            assert time.monotonic() < deadline, "the lost worker's container is still running"
            await asyncio.sleep(0.2)
    finally:
        ray_cluster.stop_worker(lost)
        ray_cluster.add_worker(lost, cpus=1, memory_mb=WORKER_MEMORY_MB[lost], models=models)


def test_the_head_killed_mid_attempts_retries_them_and_leaves_no_container(
    tmp_path: Path, ray_cluster: DevCluster, tiny_model: TinyModel, requester: Signer, clips: dict[str, Path]
) -> None:
    port = free_port()
    head = DaemonProcess(head_home(tmp_path / "head", ray_cluster, tiny_model, port), port)
    head.start(timeout=60, env=ray_cluster.env())
    try:

        async def begin() -> tuple[str, list[str]]:
            did = await node_did(head.url)
            cid = await upload(head.url, clips["long"].read_bytes())
            jobs = [
                await submit(
                    head.url, did, requester, one_cpu(transcode(cid, f"headkill-{i}", resolution="480p"))
                )
                for i in range(2)
            ]
            for job in jobs:
                await wait_for(head.url, job, transcoding)
            return did, jobs

        did, jobs = asyncio.run(begin())
        assert all(containers_of(job) for job in jobs)  # both run, on the workers
        head.kill()
        head.start(timeout=60, env=ray_cluster.env())

        async def finish() -> None:
            for job in jobs:
                view = await wait_state(head.url, job, FINISHED, limit=180)
                assert view["state"] == "completed", view
                seen = await events(head.url, job)
                failed = next(e for e in seen if e["type"] == "transition" and e["to"] == "failed")
                assert failed["reason"].startswith("node_restarted")
                assert [a for a, _ in placements(seen, "ffmpeg")] == [1, 2]

        asyncio.run(finish())
        assert labelled_containers(LABEL_NODE, did) == set()  # nothing of the node's left on any worker
    finally:
        head.stop()


_JWT = {"Content-Type": "application/jwt"}


def _cancel_token(requester: Signer, did: str, job: str) -> str:
    from tests.conftest import sign_request

    return sign_request(requester, did, {"cancel": job})


def _models_of(cluster: DevCluster, name: str) -> dict[str, Path]:
    return dict(cluster.workers[name].home.models)


def test_sigterm_drains_the_head_while_its_job_runs_on_a_worker(
    tmp_path: Path, ray_cluster: DevCluster, tiny_model: TinyModel, requester: Signer, clips: dict[str, Path]
) -> None:
    """Ray's crash handler stays out of the node's way: SIGTERM drains, the running job ends completed."""
    port = free_port()
    head = DaemonProcess(head_home(tmp_path / "head", ray_cluster, tiny_model, port), port)
    head.start(timeout=60, env=ray_cluster.env())
    try:

        async def begin() -> str:
            did = await node_did(head.url)
            cid = await upload(head.url, clips["short"].read_bytes())
            job = await submit(head.url, did, requester, one_cpu(transcode(cid, "drain-1")))
            await wait_for(head.url, job, lambda s: placements(s, "ffmpeg"))
            return job

        job = asyncio.run(begin())
        assert head.proc is not None
        head.proc.terminate()
        assert head.proc.wait(60) == 0
        log = head.log.read_text()
        assert "SIGTERM received" not in log  # Ray's handler did not take the signal
        head.start(timeout=60, env=ray_cluster.env())
        view = asyncio.run(wait_state(head.url, job, FINISHED))
        assert view["state"] == "completed" and view["attempts"] == 0, view  # finished in the drain, once
    finally:
        head.stop()


def test_a_local_cluster_runs_on_this_machine(
    tmp_path: Path, requester: Signer, clips: dict[str, Path], sandbox_images: dict[str, str]
) -> None:
    """``address = "local"``: the node starts a one-machine Ray instance and runs its containers there."""
    port = free_port()
    home = write_home(
        tmp_path / "local",
        {
            "scheduler": {"paused": False},
            "cluster": {
                "address": "local",
                "head_url": f"http://127.0.0.1:{port}",
                "connect_timeout_seconds": 60,
            },
        },
        port=port,
    )
    head = DaemonProcess(home, port)
    token = tmp_path / "auth_token"  # Ray's token of the local instance: here, not in ~/.ray
    token.write_text("0" * 64)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    head.start(timeout=90, env={"HEARTH_WORKER_HOME": str(tmp_path / "worker"), **auth})
    try:

        async def run() -> None:
            async with aiohttp.ClientSession() as s, s.get(f"{head.url}/v1/capacity") as r:
                offer = await r.json()
            [worker] = offer["machine"]["workers"]
            assert worker["cpus"] > 0
            cid = await upload(head.url, clips["short"].read_bytes())
            job = await submit(head.url, offer["node"], requester, transcode(cid, "local-1"))
            view = await wait_state(head.url, job, FINISHED)
            assert view["state"] == "completed", view
            assert (await result(head.url, job))["provenance"]["worker"] == worker["name"]

        asyncio.run(run())
    finally:
        head.stop()
