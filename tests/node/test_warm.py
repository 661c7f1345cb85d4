"""Warm engines (DESIGN §15) with the CPU build of vLLM and the tiny local model, for real.

One node serves the same weights twice: ``tiny-llama`` cold (vLLM's run_batch per job) and
``tiny-warm`` warm (one long-lived OpenAI server on a unix socket). The tests run in order on that node:
the same seeded batch answered alike cold and warm, the second warm batch without the model load; a job
cancelled beside another on the same engine; the idle engine evicted and its capacity freed; the engine
killed mid-batch (the attempt retried on a new engine, completed once); and killed while idle (stopped by
the next housekeeping round, its capacity freed).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from payments.keys import Signer
from sandbox.runner import LABEL_JOB_ID, LABEL_NODE
from tests.conftest import LiveNode, TinyModel, labelled_containers, live, sign_request, write_home
from tests.node.test_execution import events, submit, upload, wait_state
from tests.node.test_inference import PRICES, batch_envelope, jsonl
from tests.promtext import sample

COLD, WARM = "tiny-llama", "tiny-warm"
ENGINE_LABEL = f"engine-{WARM}"
FINISHED = {"completed", "failed", "cancelled"}
SPEC_OF = {"format": "openai_batch_jsonl", "max_tokens": 64, "max_requests": 64}
pytestmark = pytest.mark.asyncio(loop_scope="module")  # one node (and its engine) for the whole module


def seeded_batch(model: str, requests: int = 6, max_tokens: int = 12) -> bytes:
    return jsonl(
        *(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"hello world {i}"}],
                    "max_tokens": max_tokens,
                    "temperature": 0.8,
                    "seed": 1000 + i,
                },
            }
            for i in range(requests)
        )
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel, sandbox_images: dict[str, str]
) -> AsyncIterator[LiveNode]:
    entry = {"path": str(tiny_model.path), "cid": tiny_model.cid, "max_context": 2048, **PRICES}
    config = {
        "scheduler": {"paused": False},
        "pricing": {"minimum_per_job": "0"},
        "models": [
            {"name": COLD, **entry},
            {
                "name": WARM,
                **entry,
                "warm": True,
                "warm_cpus": 1,
                "max_idle_seconds": 3600,
                "warm_concurrency": 2,
            },
        ],
    }
    async with live(write_home(tmp_path_factory.mktemp("warm") / "home", config)) as ln:
        yield ln


async def run(node: LiveNode, requester: Signer, model: str, job_id: str, data: bytes) -> dict[str, Any]:
    cid = await upload(node.url, data)
    env = batch_envelope(cid, job_id, output_spec={**SPEC_OF, "model": model})
    env["limits"] |= {"cpus": 1, "memory_mb": 4096}
    job = await submit(node.url, node.did, requester, env)
    view = await wait_state(node.url, job, FINISHED, limit=420)
    assert view["state"] == "completed", (view, await events(node.url, job))
    async with aiohttp.ClientSession() as s, s.get(f"{node.url}/v1/jobs/{job}/result") as r:
        result: dict[str, Any] = (await r.json())["result"]
    async with aiohttp.ClientSession() as s, s.get(f"{node.url}/ipfs/{result['artifact_cid']}") as r:
        result["answers"] = {
            json.loads(line)["custom_id"]: json.loads(line)["response"]["body"]["choices"][0]["message"][
                "content"
            ]
            for line in (await r.read()).splitlines()
        }
    return result


async def test_warm_answers_as_cold_and_the_second_batch_skips_the_load(
    node: LiveNode, requester: Signer
) -> None:
    cold = await run(node, requester, COLD, "cold-1", seeded_batch(COLD))
    t0 = time.monotonic()
    first = await run(node, requester, WARM, "warm-1", seeded_batch(WARM))
    first_seconds = time.monotonic() - t0
    t0 = time.monotonic()
    second = await run(node, requester, WARM, "warm-2", seeded_batch(WARM))
    second_seconds = time.monotonic() - t0
    # the same seeded requests give the same completions, cold or warm, and are charged alike
    assert first["answers"] == cold["answers"] == second["answers"]
    assert first["usage"] == cold["usage"] == second["usage"]
    assert first["cost"] == cold["cost"]
    assert first["checks"]["passed"] and first["status_counts"] == {"200": 6}
    assert first["provenance"]["image_digest"] == cold["provenance"]["image_digest"]
    # one engine served both: the second batch paid no model load
    assert node.node.warm is not None and node.node.warm.states()[WARM]["starts"] == 1
    assert second_seconds < first_seconds / 3, (first_seconds, second_seconds)
    assert len(engine_containers(node)) == 1
    async with aiohttp.ClientSession() as s, s.get(f"{node.url}/metrics") as r:
        text = await r.text()
    assert sample(text, "hearth_warm_engine", model=WARM, state="ready") == 1.0
    assert sample(text, "hearth_warm_engine_starts_total", model=WARM) == 1.0


async def test_a_cancelled_job_leaves_the_other_on_the_same_engine(node: LiveNode, requester: Signer) -> None:
    data = seeded_batch(WARM, requests=64, max_tokens=64)
    cid = await upload(node.url, data)
    jobs = []
    for name in ("keep", "drop"):
        env = batch_envelope(cid, f"pair-{name}", output_spec={**SPEC_OF, "model": WARM})
        env["limits"] |= {"cpus": 1, "memory_mb": 4096}
        jobs.append(await submit(node.url, node.did, requester, env))
    keep, drop = jobs
    await _until_inferring(node, drop)
    token = sign_request(requester, node.did, {"cancel": drop})
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{node.url}/v1/jobs/{drop}/cancel", data=token, headers={"Content-Type": "application/jwt"}
        ) as r,
    ):
        assert r.status == 200, await r.text()
    assert (await wait_state(node.url, drop, FINISHED))["state"] == "cancelled"
    assert (await wait_state(node.url, keep, FINISHED, limit=300))["state"] == "completed"
    assert node.node.warm is not None and node.node.warm.states()[WARM]["starts"] == 1  # the engine went on


async def test_an_idle_engine_is_evicted_and_its_capacity_freed(node: LiveNode) -> None:
    warm = node.node.warm
    assert warm is not None and warm.states()[WARM]["state"] == "ready"
    held = node.node.ledger.get(f"engine:{WARM}")
    assert held is not None and held.need.memory_mb > 0
    free_before = node.node.ledger.free()
    warm._now = lambda: time.time() + 7200  # two hours on: past max_idle_seconds
    deadline = time.monotonic() + 30
    while warm.states()[WARM]["state"] != "stopped":  # the node's own housekeeping round evicts it
        assert warm.states()[WARM]["state"] == "ready" and time.monotonic() < deadline, warm.states()
        await asyncio.sleep(0.2)
    assert node.node.ledger.get(f"engine:{WARM}") is None
    assert node.node.ledger.free().memory_mb == free_before.memory_mb + held.need.memory_mb
    assert engine_containers(node) == set()
    warm._now = time.time


async def test_an_engine_killed_mid_batch_fails_the_attempt_and_it_completes_once(
    node: LiveNode, requester: Signer
) -> None:
    import docker

    cid = await upload(node.url, seeded_batch(WARM, requests=64, max_tokens=64))
    env = batch_envelope(cid, "killed-1", output_spec={**SPEC_OF, "model": WARM})
    env["limits"] |= {"cpus": 1, "memory_mb": 4096}
    job = await submit(node.url, node.did, requester, env)
    await _until_inferring(node, job)
    client = docker.from_env()
    for container_id in engine_containers(node):
        client.containers.get(container_id).kill()
    view = await wait_state(node.url, job, FINISHED, limit=420)
    assert view["state"] == "completed", view
    seen = await events(node.url, job)
    failed = [e for e in seen if e["type"] == "transition" and e["to"] == "failed"]
    assert len(failed) == 1 and failed[0]["reason"].startswith("engine_crashed") and failed[0]["retryable"]
    assert sum(1 for e in seen if e["type"] == "transition" and e["to"] == "completed") == 1
    assert (
        node.node.warm is not None and node.node.warm.states()[WARM]["starts"] == 3
    )  # a new engine took over


async def test_an_engine_dead_while_idle_is_stopped_and_its_capacity_freed(node: LiveNode) -> None:
    import docker

    warm = node.node.warm
    assert warm is not None and warm.states()[WARM]["state"] == "ready"
    assert node.node.ledger.get(f"engine:{WARM}") is not None
    for container_id in engine_containers(node):
        docker.from_env().containers.get(container_id).kill()
    deadline = time.monotonic() + 60
    while node.node.ledger.get(f"engine:{WARM}") is not None:  # the node's housekeeping round stops it
        assert time.monotonic() < deadline, warm.states()
        await asyncio.sleep(0.2)
    assert warm.states()[WARM]["state"] == "failed"  # the next batch starts a new engine
    assert engine_containers(node) == set()


def engine_containers(node: LiveNode) -> set[str]:
    """This node's engine containers (other nodes on the machine may run engines of the same name)."""
    return labelled_containers(LABEL_JOB_ID, ENGINE_LABEL) & labelled_containers(LABEL_NODE, node.did)


async def _until_inferring(node: LiveNode, job: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        seen = await events(node.url, job)
        if any(e["type"] == "progress" and (e["data"] or {}).get("requests_done", 0) >= 1 for e in seen):
            return
        assert time.monotonic() < deadline, seen[-3:]
        await asyncio.sleep(0.2)
