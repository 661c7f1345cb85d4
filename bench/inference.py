"""Inference benchmark: one vLLM batch through the whole node path against the same vLLM run bare, same run.

Two runs of one ``vllm_batch`` job, on the same batch (``--requests`` chat completion lines, each capped at
``--max-tokens``, made at start in a temporary directory) against the same model (``provider.testmodel``:
a tiny random-weight Llama built locally, no download), with the same plan (``batch_plan``: the argv and
environment the node derives from the envelope and the model entry) and the same CPU and memory limits:

docker  the plain ``docker run`` CLI running that plan in the same image (``hearth/vllm-cpu``, by ID)
        under the node's sandbox controls: ``--cpus``, ``--memory`` without swap, read-only root, the model
        and the batch mounted read-only, ``--network none``, every capability dropped,
        ``no-new-privileges``, the non-root sandbox user, pids limit, tmpfs ``/tmp``, ``--ipc private`` with
        the node's ``/dev/shm`` size, ``--init``, ``--rm``; its stdout and stderr are read, as the node
        reads them. The honest baseline: what the node adds is everything it does around that container.
node    a real daemon (``python -m node.cli run``, scheduler on, the model in its ``[[models]]``). The
        batch is uploaded first (``PUT /v1/blobs``, not timed); then timed from the signed submit (a bare
        request JWT: quote and accept in one step) until the job's event stream reports ``completed``:
        admission (every line's prompt counted with the model's tokenizer), queueing, the blob fetch, the
        batch check, the container, the output checks and the blockstore import.

vLLM's start-up (imports, engine and KV cache set-up, model load: some 30-40 s on two CPU cores) is inside
both measured runs and is most of each, as it is of a real CPU job this size. A warm-up job would cost
another whole start-up, so the node is warmed cheaply instead: each node run starts the daemon afresh
(same home; it re-verifies the model's CID at start) and asks it to quote a one-line warm-up batch whose
prompt is too long for the model, which loads the tokenizer (once per process, as transcode's warm-up job
takes the once-per-process costs) and is refused before anything is held. The page cache is warmed for
both once at setup by a throwaway container that imports vLLM. The two ways are interleaved ``--repeat``
times in a rotating order, after an ``os.sync()`` each; medians count.

Prints seconds for each, the ratio node/docker, the node's overhead in ms (node - docker wall; and the
result's ``runtime_seconds - container_seconds``), the prompt and completion tokens of each run and
tokens per second, and whether both outputs answered the same ``custom_id``s (every request) and gave the
same texts (reported, not a target: sampling is seeded, but vLLM on CPUs does not promise the same numbers
from run to run, so the texts of a random-weight model sometimes differ).

Target: node/docker <= 1.10. Exits 1 when it is missed, or when an output missed a request; a failed run
raises.

    .venv/bin/python bench/inference.py [--requests 16] [--max-tokens 32] [--cpus 2] [--memory-mb 3072]
                                        [--repeat 1] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.client import sign_request  # noqa: E402
from node.config import (  # noqa: E402
    DEFAULT_PIDS_LIMIT,
    DEFAULT_SANDBOX_USER,
    DEFAULT_TMPFS_MB,
    DEFAULT_VLLM_SHM_MB,
)
from payments.keys import Signer, new_ed25519, save_key  # noqa: E402
from provider.catalog import hash_model_dir  # noqa: E402
from provider.testmodel import MAX_CONTEXT, build_test_model  # noqa: E402
from sandbox._outdir import prepare_output_dir  # noqa: E402
from sandbox.vllm import (  # noqa: E402
    BATCH_URL,
    CONTAINER_BATCH_PATH,
    CONTAINER_MODEL_DIR,
    CONTAINER_OUTPUT_NAME,
    BatchPlan,
    batch_plan,
)

TARGET_NODE_OVER_DOCKER = 1.10
IMAGE_TAG = "hearth/vllm-cpu:latest"
MODEL_NAME = "bench-llama"
MODEL_DTYPE = "auto"  # the [[models]] default, written out so both ways plan with the same value
MODEL_PRICES = {"input_1k_tokens": "0.5", "output_1k_tokens": "2"}
MAX_PRICE = "100.00"
CONTAINER_OUTPUT_DIR = "/out"  # the runner's output mount and working directory
DEFAULT_REQUESTS = 16
DEFAULT_MAX_TOKENS = 32
DEFAULT_CPUS = float(min(2, os.cpu_count() or 1))
DEFAULT_MEMORY_MB = 3072
MAX_OUTPUT_MB = 10
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Summarise this paragraph in one sentence, please.",
    "Hearth runs batch inference jobs in hardened containers.",
    "hello world",
    "Name three primes and say why they are prime.",
    "Write a short line about a lazy dog in the sun.",
)
WARMUP_PROMPT = "word " * 2100  # over the model's context: the quote counts it, then refuses it
WARMUP_REFUSAL = "context_length_exceeded"
SETUP_TIMEOUT_SECONDS = 1800  # scripts/docker.sh on a fresh machine builds the images
RUN_TIMEOUT_SECONDS = 600  # one batch, either way
DAEMON_READY_TIMEOUT_SECONDS = 60.0  # the daemon hashes the model before it answers
DAEMON_STOP_TIMEOUT_SECONDS = 30.0
HTTP_TIMEOUT_SECONDS = 60.0
LOG_TAIL_CHARS = 4000
FINISHED = frozenset({"completed", "failed", "cancelled", "rejected", "expired"})


@dataclass(frozen=True, slots=True)
class Model:
    """The weights both ways serve: where they are, their CID and size."""

    path: Path
    cid: str
    size: int


@dataclass(frozen=True, slots=True)
class Answers:
    """What one output JSONL says: who was answered, with what status, tokens and text."""

    custom_ids: tuple[str, ...]
    statuses: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    texts: dict[str, str]


@dataclass(frozen=True, slots=True)
class NodeRun:
    """One job through the daemon: submit-to-completed wall time, the result, its output, stage starts."""

    seconds: float
    submit_seconds: float
    result: dict[str, Any]
    answers: Answers
    stages: dict[str, float]


@dataclass(frozen=True, slots=True)
class DockerRun:
    seconds: float
    answers: Answers


# -- setup ---------------------------------------------------------------------------------------------


def ensure_images() -> str:
    """Make sure the engine runs and the images exist (``scripts/docker.sh``); the vLLM CPU image's ID."""
    proc = subprocess.run(
        [str(REPO / "scripts" / "docker.sh")],
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT_SECONDS,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/docker.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    inspect = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", IMAGE_TAG],
        capture_output=True,
        text=True,
        check=True,
    )
    return inspect.stdout.strip()


def chat_line(custom_id: str, text: str, *, max_tokens: int) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": BATCH_URL,
        "body": {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
        },
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def make_batch(requests: int, max_tokens: int) -> bytes:
    """``requests`` chat completion lines, prompts cycling through :data:`PROMPTS`, each numbered."""
    return jsonl(
        [
            chat_line(f"r{n:04d}", f"{PROMPTS[n % len(PROMPTS)]} ({n})", max_tokens=max_tokens)
            for n in range(requests)
        ]
    )


def envelope(
    job_id: str, cid: str, *, requests: int, max_tokens: int, cpus: float, memory_mb: int
) -> dict[str, Any]:
    """The measured job as a requester sends it: the batch on the model, every line to be answered."""
    return {
        "job_id": job_id,
        "kind": "vllm_batch",
        "input_uri": cid,
        "output_spec": {
            "format": "openai_batch_jsonl",
            "model": MODEL_NAME,
            "max_tokens": max_tokens,
            "max_requests": requests,
        },
        "limits": {
            "timeout_seconds": RUN_TIMEOUT_SECONDS,
            "max_output_mb": MAX_OUTPUT_MB,
            "cpus": cpus,
            "memory_mb": memory_mb,
            "gpus": 0,
        },
        "validation": {"all_answered": True},
        "payment": {
            "max_price": MAX_PRICE,
            "currency": "usdc",
            "chain_id": 31337,
            "escrow": "0x" + "e" * 40,
            "payer": "0x" + "a" * 40,
            "validator": "did:pkh:eip155:31337:0x" + "b" * 40,
        },
    }


def plan_for(model: Model, *, max_tokens: int, cpus: float, memory_mb: int) -> BatchPlan:
    """The plan the node's inference executor compiles for this job and model entry (CPU, no GPU)."""
    return batch_plan(
        served_name=MODEL_NAME,
        max_context=MAX_CONTEXT,
        max_tokens=max_tokens,
        dtype=MODEL_DTYPE,
        cpus=cpus,
        memory_mb=memory_mb,
        gpus=0,
        model_bytes=model.size,
    )


def unique(env: dict[str, Any]) -> dict[str, Any]:
    """``env`` under a new job id: a fresh job, not a resubmission of an earlier one."""
    return {**env, "job_id": f"{env['job_id']}-{secrets.token_hex(6)}"}


def read_answers(data: bytes) -> Answers:
    """The answers in an OpenAI batch output JSONL (as vLLM's run_batch writes it)."""
    statuses: dict[str, int] = {}
    texts: dict[str, str] = {}
    prompt = completion = 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        custom_id = str(line["custom_id"])
        response = line.get("response") or {}
        body = response.get("body") or {}
        usage = body.get("usage") or {}
        statuses[custom_id] = int(response.get("status_code") or 0)
        prompt += int(usage.get("prompt_tokens") or 0)
        completion += int(usage.get("completion_tokens") or 0)
        choices = body.get("choices") or [{}]
        texts[custom_id] = str((choices[0].get("message") or {}).get("content") or "")
    return Answers(
        custom_ids=tuple(sorted(statuses)),
        statuses=statuses,
        prompt_tokens=prompt,
        completion_tokens=completion,
        texts=texts,
    )


# -- docker ----------------------------------------------------------------------------------------------


def docker_argv(
    plan: BatchPlan, image: str, model: Model, batch: Path, out: Path, *, cpus: float, memory_mb: int
) -> list[str]:
    """``docker run`` of the plan under the same controls the node's runner applies to a vLLM job."""
    env = [flag for key, value in plan.env.items() for flag in ("--env", f"{key}={value}")]
    return [
        "docker",
        "run",
        "--rm",
        "--init",
        "--read-only",
        "--network",
        "none",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges:true",
        "--user",
        DEFAULT_SANDBOX_USER,
        *group_add(),
        "--ipc",
        "private",
        "--shm-size",
        f"{DEFAULT_VLLM_SHM_MB}m",
        "--pids-limit",
        str(DEFAULT_PIDS_LIMIT),
        "--memory",
        f"{memory_mb}m",
        "--memory-swap",
        f"{memory_mb}m",
        "--cpus",
        f"{cpus:g}",
        "--ulimit",
        "core=0",
        "--log-driver",
        "none",
        "--tmpfs",
        f"/tmp:rw,noexec,nosuid,nodev,size={DEFAULT_TMPFS_MB}m",
        "--mount",
        f"type=bind,source={out.resolve()},target={CONTAINER_OUTPUT_DIR}",
        "--mount",
        f"type=bind,source={model.path.resolve()},target={CONTAINER_MODEL_DIR},readonly",
        "--mount",
        f"type=bind,source={batch.resolve()},target={CONTAINER_BATCH_PATH},readonly",
        "--workdir",
        CONTAINER_OUTPUT_DIR,
        *env,
        "--entrypoint",
        plan.argv[0],
        image,
        *plan.argv[1:],
    ]


def group_add() -> list[str]:
    """``--group-add`` flags matching ``prepare_output_dir``: the caller's group unless it is root."""
    return [] if os.geteuid() == 0 else ["--group-add", str(os.getegid())]


def sandbox_output_dir(path: Path) -> None:
    """A fresh output directory the sandbox user can write, made as the node's runner makes it."""
    shutil.rmtree(path, ignore_errors=True)
    prepare_output_dir(path, DEFAULT_SANDBOX_USER)


def warm_image(image: str) -> float:
    """A throwaway container that imports vLLM: the page cache then holds the image for both ways."""
    t0 = time.perf_counter()
    subprocess.run(
        [
            *("docker", "run", "--rm", "--network", "none", "--user", DEFAULT_SANDBOX_USER),
            *("--entrypoint", "python3", image, "-c", "import vllm"),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=True,
    )
    return time.perf_counter() - t0


def time_docker(argv: list[str], out: Path) -> DockerRun:
    # stdout and stderr (vLLM's log and progress bar) are read, as the node reads them; nobody parses them.
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT_SECONDS, check=False
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace")[-LOG_TAIL_CHARS:]
        raise RuntimeError(f"docker run failed ({proc.returncode}):\n{tail}")
    return DockerRun(seconds=seconds, answers=read_answers((out / CONTAINER_OUTPUT_NAME).read_bytes()))


# -- the node --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``python -m node.cli run`` on a home of its own, the model in its catalog, log to a file.

    JSON strings and integers of plain text are TOML too, so ``[[models]]`` is written with ``json.dumps``.
    """

    def __init__(self, home: Path, model: Model) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "daemon.log"
        home.mkdir(parents=True)
        node_key = new_ed25519()
        save_key(node_key, home / "node.key")
        self.did = node_key.did
        entry = {
            "name": MODEL_NAME,
            "path": str(model.path.resolve()),
            "cid": model.cid,
            "max_context": MAX_CONTEXT,
            "dtype": MODEL_DTYPE,
            **MODEL_PRICES,
        }
        (home / "node.toml").write_text(
            f'[api]\nhost = "127.0.0.1"\nport = {self.port}\n[scheduler]\npaused = false\n'
            '[pricing]\nminimum_per_job = "0"\n[[models]]\n'
            + "".join(f"{key} = {json.dumps(value)}\n" for key, value in entry.items())
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:  # a file, not a pipe: a full pipe would stall the daemon
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "node.cli", "run", "--home", str(self.home), "--port", str(self.port)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HEARTH_LOGGING__LEVEL": "WARNING"},
            )
        deadline = time.monotonic() + DAEMON_READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the daemon exited:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"the daemon was not ready in {DAEMON_READY_TIMEOUT_SECONDS:.0f} s")

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(DAEMON_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-LOG_TAIL_CHARS:]


async def upload(session: aiohttp.ClientSession, url: str, data: bytes) -> str:
    async with session.put(f"{url}/v1/blobs", data=io.BytesIO(data)) as r:
        if r.status != 201:
            raise RuntimeError(f"upload failed ({r.status}): {await r.text()}")
        return str((await r.json())["cid"])


async def upload_all(daemon: Daemon, blobs: list[bytes]) -> list[str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)) as session:
        return [await upload(session, daemon.url, data) for data in blobs]


async def follow(session: aiohttp.ClientSession, url: str, job: str) -> list[dict[str, Any]]:
    """The job's events, from the SSE stream, up to its first terminal transition."""
    seen: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=RUN_TIMEOUT_SECONDS)
    async with session.get(f"{url}/v1/jobs/{job}/events", timeout=timeout) as r:
        async for raw in r.content:
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: ") :])
            seen.append(event)
            if event["type"] == "transition" and event["to"] in FINISHED:
                return seen
    raise RuntimeError(f"the event stream of {job} ended before the job did")


def stage_offsets(events: list[dict[str, Any]], origin: float) -> dict[str, float]:
    """When each state and executor stage began, in seconds after ``origin`` (the node's clock is ours)."""
    offsets: dict[str, float] = {}
    for event in events:
        name = event["to"] if event["type"] == "transition" else (event.get("data") or {}).get("stage")
        if name and name not in offsets:
            offsets[name] = round(event["at"] - origin, 3)
    return offsets


async def warm_node(daemon: Daemon, requester: Signer, env: dict[str, Any]) -> float:
    """Quote the warm-up batch: the node loads the tokenizer, counts the line, refuses it, holds nothing."""
    token = sign_request(requester, daemon.did, {"job": env})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)) as session:
        t0 = time.perf_counter()
        async with session.post(
            f"{daemon.url}/v1/quotes", data=token, headers={"Content-Type": "application/jwt"}
        ) as r:
            body = await r.json()
        seconds = time.perf_counter() - t0
    code = (body.get("error") or {}).get("code")
    if r.status != 422 or code != WARMUP_REFUSAL:
        raise RuntimeError(f"the warm-up quote was not refused with {WARMUP_REFUSAL} ({r.status}): {body}")
    return seconds


async def node_job(daemon: Daemon, requester: Signer, env: dict[str, Any]) -> NodeRun:
    """Submit ``env`` (its input an uploaded blob) and follow the job to its end; timed from the submit."""
    token = sign_request(requester, daemon.did, {"job": env})
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        origin, t0 = time.time(), time.perf_counter()
        async with session.post(
            f"{daemon.url}/v1/jobs", data=token, headers={"Content-Type": "application/jwt"}
        ) as r:
            body = await r.json()
        submitted = time.perf_counter() - t0
        if r.status != 201:
            raise RuntimeError(f"submit refused ({r.status}): {body}")
        job = str(body["job"]["id"])
        events = await follow(session, daemon.url, job)
        seconds = time.perf_counter() - t0
        if events[-1]["to"] != "completed":
            raise RuntimeError(f"job {job} ended {events[-1]['to']}: {events[-1]}\n{daemon.tail()}")
        async with session.get(f"{daemon.url}/v1/jobs/{job}/result") as r:
            result: dict[str, Any] = (await r.json())["result"]
        async with session.get(f"{daemon.url}/ipfs/{result['artifact_cid']}") as r:
            if r.status != 200:
                raise RuntimeError(f"the artifact of {job} is not served ({r.status})")
            output = await r.read()
    return NodeRun(
        seconds=seconds,
        submit_seconds=submitted,
        result=result,
        answers=read_answers(output),
        stages=stage_offsets(events, origin),
    )


# -- the bench -------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return float(statistics.median(values))


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


@dataclass(slots=True)
class Runs:
    """What the repeats measured, way by way."""

    docker: list[DockerRun] = field(default_factory=list)
    node: list[NodeRun] = field(default_factory=list)
    warmups: list[float] = field(default_factory=list)

    def run_docker(self, s: Setup, argv: list[str]) -> None:
        sandbox_output_dir(s.docker_out)
        os.sync()
        self.docker.append(time_docker(argv, s.docker_out))

    def run_node(self, s: Setup) -> None:
        # A fresh daemon each time, warmed by a refused quote (the tokenizer is loaded once per process).
        # Job ids are new each time, or the node would answer with the earlier job.
        s.daemon.start()
        try:
            self.warmups.append(asyncio.run(warm_node(s.daemon, s.requester, unique(s.warmup))))
            os.sync()
            self.node.append(asyncio.run(node_job(s.daemon, s.requester, unique(s.envelope))))
        finally:
            s.daemon.stop()


def prepare(tmpdir: Path, args: argparse.Namespace, image: str) -> tuple[Setup, dict[str, Any]]:
    """Build the model, write the batch, upload it to a fresh node home and plan the job; and setup facts."""
    limits = {"cpus": args.cpus, "memory_mb": args.memory_mb}
    t0 = time.perf_counter()
    path = build_test_model(tmpdir / "model")
    cid, size = hash_model_dir(path)
    built = time.perf_counter() - t0
    model = Model(path=path, cid=cid, size=size)
    data = make_batch(args.requests, args.max_tokens)
    batch = tmpdir / "batch.jsonl"
    batch.write_bytes(data)
    batch.chmod(0o644)  # the sandbox user reads it through a read-only mount
    warmup_data = jsonl([chat_line("warmup", WARMUP_PROMPT, max_tokens=args.max_tokens)])
    daemon = Daemon(tmpdir / "node", model)
    daemon.start()
    try:
        t0 = time.perf_counter()
        batch_cid, warm_cid = asyncio.run(upload_all(daemon, [data, warmup_data]))
        uploaded = time.perf_counter() - t0
    finally:
        daemon.stop()
    sizes = {"requests": args.requests, "max_tokens": args.max_tokens}
    setup = Setup(
        model=model,
        batch=batch,
        custom_ids=read_answers(data).custom_ids,
        envelope=envelope("bench", batch_cid, **sizes, **limits),
        warmup=envelope("warmup", warm_cid, **sizes, **limits),
        plan=plan_for(model, max_tokens=args.max_tokens, **limits),
        image=image,
        docker_out=tmpdir / "docker-out",
        daemon=daemon,
        requester=new_ed25519(),
    )
    facts = {
        "model_bytes": size,
        "model_built_in_seconds": round(built, 3),
        "batch_bytes": len(data),
        "upload_seconds": uploaded,
        "image_warmup_seconds": warm_image(image),
    }
    return setup, facts


def run(args: argparse.Namespace) -> dict[str, Any]:
    image = ensure_images()
    runs = Runs()
    with tempfile.TemporaryDirectory(prefix="hearth-bench-inference-", dir=args.dir) as tmp:
        setup, facts = prepare(Path(tmp), args, image)
        argv = docker_argv(
            setup.plan,
            image,
            setup.model,
            setup.batch,
            setup.docker_out,
            cpus=args.cpus,
            memory_mb=args.memory_mb,
        )
        ways: list[Callable[[], None]] = [
            partial(runs.run_docker, setup, argv),
            partial(runs.run_node, setup),
        ]
        for i in range(args.repeat):
            for way in ways[i % 2 :] + ways[: i % 2]:
                # Nothing left to write back: another run's dirty output would otherwise be flushed on
                # this run's time (the node fsyncs its journal and its blocks).
                os.sync()
                way()
    return summarize(args, setup, facts, runs)


def tokens(answers: list[Answers], seconds: list[float]) -> dict[str, Any]:
    """Token counts of each run and the median rates (completion tokens, and all tokens, per wall second)."""
    return {
        "prompt": [a.prompt_tokens for a in answers],
        "completion": [a.completion_tokens for a in answers],
        "completion_per_second": median(
            [a.completion_tokens / s for a, s in zip(answers, seconds, strict=True)]
        ),
        "total_per_second": median(
            [(a.prompt_tokens + a.completion_tokens) / s for a, s in zip(answers, seconds, strict=True)]
        ),
    }


def summarize(args: argparse.Namespace, setup: Setup, facts: dict[str, Any], runs: Runs) -> dict[str, Any]:
    """The result document: medians, ratio, overheads, tokens, output agreement and targets."""
    node_s = [r.seconds for r in runs.node]
    docker_s = [r.seconds for r in runs.docker]
    runtime = [float(r.result["runtime_seconds"]) for r in runs.node]
    container = [float(r.result["container_seconds"]) for r in runs.node]
    argv_hashes = {str(r.result["provenance"]["argv_hash"]) for r in runs.node}
    node_answers = [r.answers for r in runs.node]
    docker_answers = [r.answers for r in runs.docker]
    everyone = [*node_answers, *docker_answers]
    all_answered = all(a.custom_ids == setup.custom_ids for a in everyone)
    all_ok = all(set(a.statuses.values()) == {200} for a in everyone)
    d, n = median(docker_s), median(node_s)
    ratio = n / d
    node_usage = [r.result["usage"] for r in runs.node]
    return {
        "model": {
            "name": MODEL_NAME,
            "cid": setup.model.cid,
            "bytes": facts["model_bytes"],
            "built_in_seconds": facts["model_built_in_seconds"],
        },
        "batch": {"requests": args.requests, "max_tokens": args.max_tokens, "bytes": facts["batch_bytes"]},
        "cpus": args.cpus,
        "memory_mb": args.memory_mb,
        "repeat": args.repeat,
        "image": setup.image,
        "image_warmup_seconds": round(facts["image_warmup_seconds"], 3),
        "docker_baseline": "docker CLI (docker run --rm) with the node's sandbox controls",
        "docker": {
            "seconds": d,
            "runs": docker_s,
            "tokens": tokens(docker_answers, docker_s),
        },
        "node": {
            "seconds": n,
            "runs": node_s,
            "submit_seconds": [round(r.submit_seconds, 4) for r in runs.node],
            "runtime_seconds": runtime,
            "container_seconds": container,
            "stages": [r.stages for r in runs.node],
            "upload_seconds": round(facts["upload_seconds"], 3),
            "warmup_quote_seconds": [round(w, 3) for w in runs.warmups],
            "tokens": tokens(node_answers, node_s),
            "usage": node_usage,
            "cost": [str(r.result["cost"]) for r in runs.node],
        },
        "ratio": {"node/docker": ratio},
        "overhead_ms": {
            "node_minus_docker": (n - d) * 1000,
            "runtime_minus_container": median([r - c for r, c in zip(runtime, container, strict=True)])
            * 1000,
            "node_minus_runtime": median([w - r for w, r in zip(node_s, runtime, strict=True)]) * 1000,
        },
        "outputs": {
            "all_answered": all_answered,
            "all_status_200": all_ok,
            "same_custom_ids": len({a.custom_ids for a in everyone}) == 1,
            "same_texts": all(a.texts == everyone[0].texts for a in everyone),
            "node_usage_matches_output": all(
                (u["prompt_tokens"], u["completion_tokens"]) == (a.prompt_tokens, a.completion_tokens)
                for u, a in zip(node_usage, node_answers, strict=True)
            ),
        },
        "argv_hash_equals_node": argv_hashes == {setup.plan.argv_hash},
        "targets": {
            f"node/docker<={TARGET_NODE_OVER_DOCKER:.2f}": ratio <= TARGET_NODE_OVER_DOCKER,
            "all_answered": all_answered,
        },
    }


def report(r: dict[str, Any]) -> None:
    batch, ov, out = r["batch"], r["overhead_ms"], r["outputs"]
    dock, node = r["docker"], r["node"]
    print(
        f"batch          : {batch['requests']} requests, max_tokens {batch['max_tokens']}, "
        f"{batch['bytes']} bytes; model {r['model']['name']} ({r['model']['bytes'] / 1e6:.1f} MB); "
        f"cpus {r['cpus']:g}, memory {r['memory_mb']} MB"
    )
    print(f"docker run     : {dock['seconds']:8.3f} s  ({r['docker_baseline']})")
    print(f"hearth node    : {node['seconds']:8.3f} s  (signed submit -> completed)")
    warm = ", ".join(f"{w:.2f}" for w in node["warmup_quote_seconds"])
    print(
        f"                 (median of {r['repeat']}; vLLM start-up inside both; warm-up quotes {warm} s, "
        "not counted)"
    )
    print(f"node/docker    : {r['ratio']['node/docker']:.3f}   (target <= {TARGET_NODE_OVER_DOCKER:.2f})")
    print(f"node overhead  : {ov['node_minus_docker']:8.0f} ms  node wall - docker wall")
    print(f"                 {ov['runtime_minus_container']:8.0f} ms  runtime_seconds - container_seconds")
    print(f"                 {ov['node_minus_runtime']:8.0f} ms  node wall - runtime_seconds")
    for name, way in (("docker tokens  ", dock), ("node tokens    ", node)):
        t = way["tokens"]
        prompt = ", ".join(str(x) for x in t["prompt"])
        completion = ", ".join(str(x) for x in t["completion"])
        print(
            f"{name}: prompt {prompt}, completion {completion}; {t['completion_per_second']:.2f} "
            f"completion tok/s, {t['total_per_second']:.2f} tok/s"
        )
    stages = ", ".join(f"{k} {v:.2f}" for k, v in node["stages"][0].items())
    print(f"node stages    : {stages}  (s after the submit, first run)")
    print(
        f"outputs        : all answered {str(out['all_answered']).lower()}, "
        f"same custom_ids {str(out['same_custom_ids']).lower()}, "
        f"all 200 {str(out['all_status_200']).lower()}, "
        f"same texts {str(out['same_texts']).lower()} (not a target)"
    )
    print(f"usage == output: {str(out['node_usage_matches_output']).lower()}  (the node's billed tokens)")
    print(f"argv == node's : {str(r['argv_hash_equals_node']).lower()}  (argv hash the node recorded)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="lines in the batch")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="completion cap per request")
    ap.add_argument("--cpus", type=float, default=DEFAULT_CPUS, help="the job's CPU limit, both ways")
    ap.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB, help="the job's memory limit")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each way; the median counts")
    ap.add_argument("--dir", default=None, help="where the model, batch and outputs go (default: $TMPDIR)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.requests < 1:
        ap.error("--requests must be at least 1")
    if not 1 <= args.max_tokens < MAX_CONTEXT // 2:
        ap.error(f"--max-tokens must be from 1 to {MAX_CONTEXT // 2 - 1}")
    r = run(args)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        report(r)
    return 0 if all(r["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
