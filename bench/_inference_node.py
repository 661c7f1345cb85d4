"""bench/inference.py's node side: the catalog entries (cold and warm), jobs through the node, the warm
engine driven directly over its socket, and the warm runs' summary and report."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from _common import (  # first: importing it puts the repository on sys.path for the project imports
    HTTP_TIMEOUT_SECONDS,
    JWT_HEADERS,
    RUN_TIMEOUT_SECONDS,
    Daemon,
    argv_hash_equals,
    http_session,
    interleave,
    median,
    run_job,
    unique,
)
from _inference_batch import (
    MODEL_DTYPE,
    MODEL_NAME,
    MODEL_PRICES,
    TARGET_WARM_OVERHEAD_SECONDS,
    TARGET_WARM_TOKENS_RATIO,
    WARM_MAX_IDLE_SECONDS,
    WARM_MODEL_NAME,
    WARM_START_SECONDS,
    WARMUP_REFUSAL,
    Answers,
    Model,
    NodeRun,
    jsonl,
    read_answers,
)

from core.defaults import (
    DEFAULT_NODE_STATE_DIR,
)
from payments.keys import Signer
from provider.testmodel import MAX_CONTEXT
from requester.client import sign_request
from sandbox.spec import LABEL_JOB_ID, LABEL_NODE
from sandbox.vllm import (
    BATCH_URL,
    CONTAINER_SOCKET_NAME,
    BatchPlan,
)

# -- the node --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    """What every repeat shares: the model, the batch, the job, the plan, the image and the node's home."""

    model: Model
    batch: Path
    custom_ids: tuple[str, ...]
    envelope: dict[str, Any]
    warmup: dict[str, Any]
    plan: BatchPlan
    image: str
    docker_out: Path
    daemon: Daemon
    requester: Signer
    warm: WarmEntry
    warm_envelope: dict[str, Any]
    warm_warmup: dict[str, Any]
    warm_lines: list[dict[str, Any]]
    warm_plan: BatchPlan  # the engine's: what a warm job's provenance records


@dataclass(frozen=True, slots=True)
class WarmEntry:
    """The warm catalog entry's engine settings (``warm_*``)."""

    cpus: float
    memory_mb: int
    concurrency: int


def model_config(model: Model, warm: WarmEntry) -> str:
    """``node.toml`` lines for the model in the daemon's catalog, cold and (the same weights) warm, and no
    per-job minimum price. The warm engine starts with its first batch (no ``preload``) and is not evicted.

    JSON strings, booleans and numbers of plain text are TOML too, so ``[[models]]`` is written with
    ``json.dumps``.
    """
    entry = {
        "path": str(model.path.resolve()),
        "cid": model.cid,
        "max_context": MAX_CONTEXT,
        "dtype": MODEL_DTYPE,
        **MODEL_PRICES,
    }
    warm_entry = {
        **entry,
        "warm": True,
        "warm_cpus": warm.cpus,
        "warm_memory_mb": warm.memory_mb,
        "warm_concurrency": warm.concurrency,
        "warm_start_seconds": WARM_START_SECONDS,
        "max_idle_seconds": WARM_MAX_IDLE_SECONDS,
    }
    tables = "".join(
        "[[models]]\n"
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in {"name": name, **e}.items())
        for name, e in ((MODEL_NAME, entry), (WARM_MODEL_NAME, warm_entry))
    )
    return '[pricing]\nminimum_per_job = "0"\n' + tables


async def warm_node(daemon: Daemon, requester: Signer, env: dict[str, Any]) -> float:
    """Quote the warm-up batch: the node loads the tokenizer, counts the line, refuses it, holds nothing."""
    token = sign_request(requester, daemon.did, {"job": env})
    async with http_session() as session:
        t0 = time.perf_counter()
        async with session.post(f"{daemon.url}/v1/quotes", data=token, headers=JWT_HEADERS) as r:
            body = await r.json()
        seconds = time.perf_counter() - t0
    code = (body.get("error") or {}).get("code")
    if r.status != 422 or code != WARMUP_REFUSAL:
        raise RuntimeError(f"the warm-up quote was not refused with {WARMUP_REFUSAL} ({r.status}): {body}")
    return seconds


async def node_job(daemon: Daemon, requester: Signer, env: dict[str, Any]) -> NodeRun:
    """Submit ``env`` (its input an uploaded blob), follow the job to its end and fetch its output."""
    async with http_session() as session:
        done = await run_job(session, daemon, requester, env)
        async with session.get(f"{daemon.url}/ipfs/{done.result['artifact_cid']}") as r:
            if r.status != 200:
                raise RuntimeError(f"the artifact of {done.job} is not served ({r.status})")
            output = await r.read()
    return NodeRun(run=done, answers=read_answers(output))


# -- warm ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DirectRun:
    """The batch's requests posted straight to the engine: the wall from the first send to the last answer."""

    seconds: float
    answers: Answers


def engine_socket(daemon: Daemon, model: str) -> Path:
    """Where the node's engine for ``model`` listens: ``<state_dir>/engines/<model>/engine.sock``."""
    return daemon.home / DEFAULT_NODE_STATE_DIR / "engines" / model / CONTAINER_SOCKET_NAME


def engine_containers(daemon: Daemon, model: str) -> set[str]:
    """IDs of this daemon's engine containers for ``model`` (by the runner's labels), running or not."""
    proc = subprocess.run(
        [
            *("docker", "ps", "--all", "--quiet", "--no-trunc"),
            *("--filter", f"label={LABEL_NODE}={daemon.did}"),
            *("--filter", f"label={LABEL_JOB_ID}=engine-{model}"),
        ],
        capture_output=True,
        text=True,
        timeout=HTTP_TIMEOUT_SECONDS,
        check=True,
    )
    return set(proc.stdout.split())


async def drive_engine(socket: Path, lines: list[dict[str, Any]], concurrency: int) -> DirectRun:
    """Post each line's body to the engine at ``socket``, ``concurrency`` in flight, in input order, as the
    node's warm batch sends them; the answers as batch output lines (so :func:`read_answers` reads them)."""
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=RUN_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(socket)), timeout=timeout
    ) as session:

        async def answer(line: dict[str, Any]) -> dict[str, Any]:
            async with limit, session.post(f"http://engine{BATCH_URL}", json=line["body"]) as r:
                body = await r.json(content_type=None)
                return {"custom_id": line["custom_id"], "response": {"status_code": r.status, "body": body}}

        t0 = time.perf_counter()
        out = await asyncio.gather(*(answer(line) for line in lines))
        seconds = time.perf_counter() - t0
    return DirectRun(seconds=seconds, answers=read_answers(jsonl(out)))


@dataclass(slots=True)
class WarmRuns:
    """What the warm phase measured: the first batch (engine start + answers), then the repeats."""

    first: list[NodeRun] = field(default_factory=list)
    node: list[NodeRun] = field(default_factory=list)
    direct: list[DirectRun] = field(default_factory=list)
    warmups: list[float] = field(default_factory=list)
    containers: set[str] = field(default_factory=set)  # every engine container seen while the daemon ran
    left: set[str] = field(default_factory=set)  # engine containers still there once it stopped (removed)

    def run(self, s: Setup, repeat: int) -> None:
        """One daemon: the warm-up quote, the first batch (it starts the engine), then ``repeat`` rounds of
        a job through the node and the same requests sent to the engine directly, interleaved."""
        try:
            with s.daemon.running():
                self.warmups.append(asyncio.run(warm_node(s.daemon, s.requester, unique(s.warm_warmup))))
                os.sync()
                self.first.append(asyncio.run(node_job(s.daemon, s.requester, unique(s.warm_envelope))))
                self.containers |= engine_containers(s.daemon, WARM_MODEL_NAME)
                socket = engine_socket(s.daemon, WARM_MODEL_NAME)
                ways: list[Callable[[], None]] = [
                    partial(self.run_node, s),
                    partial(self.run_direct, socket, s.warm_lines, s.warm.concurrency),
                ]
                interleave(ways, repeat)
                self.containers |= engine_containers(s.daemon, WARM_MODEL_NAME)
        finally:
            # The daemon stops its engines as it drains; whatever is left is reported and removed.
            self.left = engine_containers(s.daemon, WARM_MODEL_NAME)
            if self.left:
                subprocess.run(
                    ["docker", "rm", "--force", *sorted(self.left)],
                    capture_output=True,
                    timeout=HTTP_TIMEOUT_SECONDS,
                    check=False,
                )

    def run_node(self, s: Setup) -> None:
        self.node.append(asyncio.run(node_job(s.daemon, s.requester, unique(s.warm_envelope))))
        self.containers |= engine_containers(s.daemon, WARM_MODEL_NAME)

    def run_direct(self, socket: Path, lines: list[dict[str, Any]], concurrency: int) -> None:
        self.direct.append(asyncio.run(drive_engine(socket, lines, concurrency)))


def summarize_warm(setup: Setup, cold_seconds: float, w: WarmRuns) -> dict[str, Any]:
    """The warm part of the result document: walls, the node's overhead over generation, tokens/s."""
    first, job_runs = w.first[0].run, [r.run for r in w.node]
    walls, direct_walls = [r.seconds for r in job_runs], [d.seconds for d in w.direct]
    warm_s, generation_s = median(walls), median(direct_walls)
    node_rates = [r.result["usage"]["completion_tokens"] / r.seconds for r in job_runs]
    direct_rates = [d.answers.completion_tokens / d.seconds for d in w.direct]
    node_tps, direct_tps = median(node_rates), median(direct_rates)
    usage = [r.result["usage"] for r in [first, *job_runs]]
    answers = [r.answers for r in [*w.first, *w.node]]
    return {
        "model": WARM_MODEL_NAME,
        "engine": {"cpus": setup.warm.cpus, "memory_mb": setup.warm.memory_mb},
        "concurrency": setup.warm.concurrency,
        "repeat": len(job_runs),
        "warmup_quote_seconds": [round(x, 3) for x in w.warmups],
        "first_job_seconds": first.seconds,  # the engine's start + the answers
        "first_job_stages": first.stages,
        "cold_job_seconds": cold_seconds,
        "job": {
            "seconds": warm_s,
            "runs": walls,
            "runtime_seconds": [float(r.result["runtime_seconds"]) for r in job_runs],
            "stages": [r.stages for r in job_runs],
            "completion_tokens": [u["completion_tokens"] for u in usage[1:]],
            "completion_per_second": node_tps,
        },
        "direct": {
            "seconds": generation_s,
            "runs": direct_walls,
            "completion_tokens": [d.answers.completion_tokens for d in w.direct],
            "completion_per_second": direct_tps,
        },
        "cold/warm": cold_seconds / warm_s,
        "overhead_seconds": warm_s - generation_s,
        "tokens_ratio": node_tps / direct_tps,
        # the best run of each way: what is left when other work on the machine did not slow either run
        "best": {
            "job_seconds": min(walls),
            "direct_seconds": min(direct_walls),
            "overhead_seconds": min(walls) - min(direct_walls),
            "tokens_ratio": max(node_rates) / max(direct_rates),
        },
        "engine_containers": len(w.containers),  # 1: one engine served every warm batch
        "engine_left_after_stop": len(w.left),  # 0: the daemon stopped it as it drained
        "argv_hash_equals_engine": argv_hash_equals([first, *job_runs], setup.warm_plan.argv_hash),
        "usage_matches_output": all(
            (u["prompt_tokens"], u["completion_tokens"]) == (a.prompt_tokens, a.completion_tokens)
            for u, a in zip(usage, answers, strict=True)
        ),
    }


def met(ok: bool) -> str:
    return "met" if ok else "not met"


def report_warm(w: dict[str, Any], targets: dict[str, bool]) -> None:
    job, direct = w["job"], w["direct"]
    engine = w["engine"]
    quotes = ", ".join(f"{x:.2f}" for x in w["warmup_quote_seconds"])
    print(
        f"warm engine    : {w['model']} (same weights, warm = true): cpus {engine['cpus']:g}, memory "
        f"{engine['memory_mb']} MB, {w['concurrency']} requests in flight; warm-up quote {quotes} s"
    )
    print(
        f"cold job       : {w['cold_job_seconds']:8.3f} s  (the node's cold run above: vLLM start-up inside)"
    )
    print(f"warm, 1st job  : {w['first_job_seconds']:8.3f} s  (the engine's start + the answers)")
    print(
        f"warm job       : {job['seconds']:8.3f} s  (median of {w['repeat']}, signed submit -> completed, "
        f"engine running; cold/warm {w['cold/warm']:.1f}x)"
    )
    print(
        f"direct         : {direct['seconds']:8.3f} s  (median of {w['repeat']}: the same requests straight "
        "to the engine's socket, the generation time)"
    )
    overhead_key = f"warm_overhead<={TARGET_WARM_OVERHEAD_SECONDS}s"
    print(
        f"warm overhead  : {w['overhead_seconds']:8.3f} s  warm job - direct "
        f"(target <= {TARGET_WARM_OVERHEAD_SECONDS} s: {met(targets[overhead_key])})"
    )
    tokens_key = f"warm/direct_tokens>={TARGET_WARM_TOKENS_RATIO:.2f}"
    print(
        f"warm tokens/s  : node {job['completion_per_second']:.1f}, "
        f"direct {direct['completion_per_second']:.1f} "
        f"completion tok/s; ratio {w['tokens_ratio']:.3f} "
        f"(target >= {TARGET_WARM_TOKENS_RATIO:.2f}: {met(targets[tokens_key])})"
    )
    best = w["best"]
    print(
        f"warm, best run : job {best['job_seconds']:.3f} s, direct {best['direct_seconds']:.3f} s: overhead "
        f"{best['overhead_seconds']:.3f} s, tokens/s ratio {best['tokens_ratio']:.3f}  "
        "(each way's fastest run; not the targets' basis)"
    )
    stages = ", ".join(f"{k} {v:.2f}" for k, v in job["stages"][0].items())
    print(f"warm stages    : {stages}  (s after the submit, first repeat)")
    print(
        f"warm engine    : {w['engine_containers']} container(s) served every warm batch; "
        f"argv == engine's {str(w['argv_hash_equals_engine']).lower()}; "
        f"usage == output {str(w['usage_matches_output']).lower()}; "
        f"left after the daemon stopped: {w['engine_left_after_stop']}"
    )
