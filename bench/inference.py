"""Inference benchmark: one vLLM batch through the whole node path against the same vLLM run bare, cold
and warm.

Cold: two runs of one ``vllm_batch`` job, on the same batch (``--requests`` chat completion lines, each
capped at ``--max-tokens``, made at start in a temporary directory) against the same model
(``provider.testmodel``: a tiny random-weight Llama built locally, no download), with the same plan
(``batch_plan``: the argv and environment the node derives from the envelope and the model entry) and the
same CPU and memory limits:

docker  the plain ``docker run`` CLI running that plan in the same image (``hearth/vllm-cpu``, by ID)
        under the node's sandbox controls: ``--cpus``, ``--memory`` without swap, read-only root, the model
        and the batch mounted read-only, ``--network none``, every capability dropped,
        ``no-new-privileges``, the non-root sandbox user, pids limit, tmpfs ``/tmp``, ``--ipc private`` with
        the node's ``/dev/shm`` size, ``--init``, ``--rm``; its stdout and stderr are read, as the node
        reads them. The honest baseline: what the node adds is everything it does around that container.
node    a real daemon (``python -m cli.main run``, scheduler on, the model in its ``[[models]]``). The
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

Warm (DESIGN §15): the same weights are a second catalog entry, ``warm = true`` (the engine holds the
job's memory limit and its CPUs, less the 0.1 CPU a warm job holds itself where the machine has no more;
``warm_concurrency`` ``--warm-concurrency``). After the cold runs the daemon starts once more: a first
batch on the warm model starts its engine (vLLM's OpenAI server in its container, on a unix socket) and
is answered there; that job's wall is start + answers. Then, ``--warm-repeat`` times in a rotating order:

warm    the same 16-request batch (its lines naming the warm model) as a job through the node, timed as
        the cold node run: signed submit -> ``completed``, the engine already running;
direct  the same requests posted straight to that engine's socket (``<state_dir>/engines/<model>/
        engine.sock``, the node idle meanwhile), ``warm_concurrency`` in flight at once as the node sends
        them: the generation time, the engine's own.

The warm node overhead is warm wall - direct wall (medians; target <= 1.5 s), and tokens/s through the
node (the job's billed completion tokens / its wall) is set against the engine driven directly
(completion tokens / wall; medians; target ratio >= 0.95). A warm run of the tiny model takes a fraction
of a second, so other work on the machine can stretch any one run several times over; the fastest run of
each way is printed too (overhead and ratio from those), as what is left when neither was slowed. The
engine's container must be the one container throughout (no restart), the jobs' recorded argv the
engine's (``server_plan``), and nothing of it left once the daemon has stopped (anything left is removed
and reported).

Prints seconds for each, the ratio node/docker, the node's overhead in ms (node - docker wall; and the
result's ``runtime_seconds - container_seconds``), the prompt and completion tokens of each run and
tokens per second, and whether both outputs answered the same ``custom_id``s (every request) and gave the
same texts (reported, not a target: sampling is seeded, but vLLM on CPUs does not promise the same numbers
from run to run, so the texts of a random-weight model sometimes differ); then the warm figures.

Targets: node/docker <= 1.10, warm overhead <= 1.5 s, warm/direct tokens/s >= 0.95; each is printed met
or not met, and a missed one does not fail the run (the figures are the point). Exits 1 when an output
missed a request; a failed run raises. Every daemon, engine and container is stopped at the end.

    .venv/bin/python bench/inference.py [--requests 16] [--max-tokens 32] [--cpus 2] [--memory-mb 4096]
                                        [--repeat 1] [--warm-repeat 10] [--warm-concurrency 8]
                                        [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from _common import (  # first: importing it puts the repository on sys.path for the project imports
    DOCKER_BASELINE,
    HTTP_TIMEOUT_SECONDS,
    JWT_HEADERS,
    LOG_TAIL_CHARS,
    RUN_TIMEOUT_SECONDS,
    Daemon,
    JobRun,
    add_run_options,
    argv_hash_equals,
    bind,
    docker_run_argv,
    ensure_images,
    finish,
    http_session,
    interleave,
    job_envelope,
    median,
    node_summary,
    overhead_ms,
    parse_args,
    print_argv_hash,
    print_overhead,
    print_stages,
    print_walls,
    run_job,
    sandbox_output_dir,
    unique,
    upload,
)

from core.defaults import (
    DEFAULT_MODEL_WARM_CONCURRENCY,
    DEFAULT_NODE_STATE_DIR,
    DEFAULT_SANDBOX_USER,
    DEFAULT_VLLM_SHM_MB,
)
from node.warm import WARM_JOB_NEED
from payments.keys import Signer, new_ed25519
from provider.catalog import hash_model_dir
from provider.testmodel import MAX_CONTEXT, build_test_model
from requester.client import sign_request
from sandbox.spec import LABEL_JOB_ID, LABEL_NODE
from sandbox.vllm import (
    BATCH_URL,
    CONTAINER_BATCH_PATH,
    CONTAINER_MODEL_DIR,
    CONTAINER_OUTPUT_NAME,
    CONTAINER_SOCKET_NAME,
    BatchPlan,
    batch_plan,
    server_plan,
)

TARGET_NODE_OVER_DOCKER = 1.10
TARGET_WARM_OVERHEAD_SECONDS = 1.5  # warm job wall - the same requests sent to the engine directly
TARGET_WARM_TOKENS_RATIO = 0.95  # completion tokens/s through the node over the engine driven directly
IMAGE_TAG = "hearth/vllm-cpu:latest"
MODEL_NAME = "bench-llama"
WARM_MODEL_NAME = "bench-llama-warm"  # the same weights, a second catalog entry with warm = true
WARM_START_SECONDS = 300.0  # the engine's warm_start_seconds: its start is bounded
WARM_MAX_IDLE_SECONDS = 3600.0  # never evicted during the bench
DEFAULT_WARM_REPEAT = 10
MODEL_DTYPE = "auto"  # the [[models]] default, written out so both ways plan with the same value
MODEL_PRICES = {"input_1k_tokens": "0.5", "output_1k_tokens": "2"}
MAX_PRICE = "100.00"
CONTAINER_OUTPUT_DIR = "/out"  # the runner's output mount and working directory
DEFAULT_REQUESTS = 16
DEFAULT_MAX_TOKENS = 32
DEFAULT_MEMORY_MB = 4096
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
DAEMON_READY_TIMEOUT_SECONDS = 60.0  # the daemon hashes the model before it answers


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
    """One job through the daemon (submit-to-completed wall time, the result, stage starts) and its output."""

    run: JobRun
    answers: Answers


@dataclass(frozen=True, slots=True)
class DockerRun:
    seconds: float
    answers: Answers


# -- setup ---------------------------------------------------------------------------------------------


def chat_line(custom_id: str, text: str, *, max_tokens: int, model: str = MODEL_NAME) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": BATCH_URL,
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
        },
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def batch_lines(requests: int, max_tokens: int, model: str = MODEL_NAME) -> list[dict[str, Any]]:
    """``requests`` chat completion lines on ``model``, prompts cycling through :data:`PROMPTS`, numbered."""
    return [
        chat_line(f"r{n:04d}", f"{PROMPTS[n % len(PROMPTS)]} ({n})", max_tokens=max_tokens, model=model)
        for n in range(requests)
    ]


def make_batch(requests: int, max_tokens: int, model: str = MODEL_NAME) -> bytes:
    """:func:`batch_lines` as JSONL."""
    return jsonl(batch_lines(requests, max_tokens, model))


def envelope(
    job_id: str,
    cid: str,
    *,
    requests: int,
    max_tokens: int,
    cpus: float,
    memory_mb: int,
    model: str = MODEL_NAME,
) -> dict[str, Any]:
    """The measured job as a requester sends it: the batch on the model, every line to be answered."""
    return job_envelope(
        job_id,
        "vllm_batch",
        cid,
        output_spec={
            "format": "openai_batch_jsonl",
            "model": model,
            "max_tokens": max_tokens,
            "max_requests": requests,
        },
        validation={"all_answered": True},
        cpus=cpus,
        memory_mb=memory_mb,
        max_output_mb=MAX_OUTPUT_MB,
        max_price=MAX_PRICE,
    )


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
    return docker_run_argv(
        plan.argv,
        image,
        cpus=cpus,
        memory_mb=memory_mb,
        ipc=("--ipc", "private", "--shm-size", f"{DEFAULT_VLLM_SHM_MB}m"),
        mounts=(
            bind(out, CONTAINER_OUTPUT_DIR),
            bind(model.path, CONTAINER_MODEL_DIR, readonly=True),
            bind(batch, CONTAINER_BATCH_PATH, readonly=True),
        ),
        workdir=CONTAINER_OUTPUT_DIR,
        env=plan.env,
    )


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


# -- the bench -------------------------------------------------------------------------------------------


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
        with s.daemon.running():
            self.warmups.append(asyncio.run(warm_node(s.daemon, s.requester, unique(s.warmup))))
            os.sync()
            self.node.append(asyncio.run(node_job(s.daemon, s.requester, unique(s.envelope))))


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
    warm_lines = batch_lines(args.requests, args.max_tokens, WARM_MODEL_NAME)
    warm_warmup_data = jsonl(
        [chat_line("warmup", WARMUP_PROMPT, max_tokens=args.max_tokens, model=WARM_MODEL_NAME)]
    )
    warm = WarmEntry(
        # the job's CPUs, less the share a warm job holds beside its engine where the machine has no more
        cpus=round(min(args.cpus, (os.cpu_count() or 1) - WARM_JOB_NEED.cpus), 2),
        memory_mb=args.memory_mb,
        concurrency=args.warm_concurrency,
    )
    daemon = Daemon(
        tmpdir / "node",
        ready_timeout_seconds=DAEMON_READY_TIMEOUT_SECONDS,
        config=model_config(model, warm),
    )
    with daemon.running():
        t0 = time.perf_counter()
        batch_cid, warm_cid = upload(daemon, data, warmup_data)
        uploaded = time.perf_counter() - t0
        warm_batch_cid, warm_warmup_cid = upload(daemon, jsonl(warm_lines), warm_warmup_data)
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
        warm=warm,
        warm_envelope=envelope("bench-warm", warm_batch_cid, **sizes, **limits, model=WARM_MODEL_NAME),
        warm_warmup=envelope("warmup-warm", warm_warmup_cid, **sizes, **limits, model=WARM_MODEL_NAME),
        warm_lines=warm_lines,
        warm_plan=server_plan(
            served_name=WARM_MODEL_NAME,
            max_context=MAX_CONTEXT,
            dtype=MODEL_DTYPE,
            cpus=warm.cpus,
            memory_mb=warm.memory_mb,
            gpus=0,
            model_bytes=size,
        ),
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
    image = ensure_images(IMAGE_TAG)
    runs, warm = Runs(), WarmRuns()
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
        interleave(ways, args.repeat)
        warm.run(setup, args.warm_repeat)  # after the cold runs: the engine then holds no CPU they use
    return summarize(args, setup, facts, runs, warm)


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


def summarize(
    args: argparse.Namespace, setup: Setup, facts: dict[str, Any], runs: Runs, warm_runs: WarmRuns
) -> dict[str, Any]:
    """The result document: medians, ratio, overheads, tokens, output agreement and targets."""
    job_runs = [r.run for r in runs.node]
    node = node_summary(job_runs, facts["upload_seconds"])
    docker_s = [r.seconds for r in runs.docker]
    node_answers = [r.answers for r in runs.node]
    docker_answers = [r.answers for r in runs.docker]
    everyone = [*node_answers, *docker_answers]
    warm_answers = [r.answers for r in [*warm_runs.first, *warm_runs.node]] + [
        d.answers for d in warm_runs.direct
    ]
    all_answered = all(a.custom_ids == setup.custom_ids for a in [*everyone, *warm_answers])
    all_ok = all(set(a.statuses.values()) == {200} for a in [*everyone, *warm_answers])
    d, n = median(docker_s), node["seconds"]
    ratio = n / d
    node_usage = [r.result["usage"] for r in job_runs]
    warm = summarize_warm(setup, n, warm_runs)
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
        "docker_baseline": DOCKER_BASELINE,
        "docker": {
            "seconds": d,
            "runs": docker_s,
            "tokens": tokens(docker_answers, docker_s),
        },
        "node": {
            **node,
            "warmup_quote_seconds": [round(w, 3) for w in runs.warmups],
            "tokens": tokens(node_answers, node["runs"]),
            "usage": node_usage,
            "cost": [str(r.result["cost"]) for r in job_runs],
        },
        "ratio": {"node/docker": ratio},
        "overhead_ms": overhead_ms(node, d),
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
        "argv_hash_equals_node": argv_hash_equals(job_runs, setup.plan.argv_hash),
        "warm": warm,
        "targets": {
            f"node/docker<={TARGET_NODE_OVER_DOCKER:.2f}": ratio <= TARGET_NODE_OVER_DOCKER,
            f"warm_overhead<={TARGET_WARM_OVERHEAD_SECONDS}s": warm["overhead_seconds"]
            <= TARGET_WARM_OVERHEAD_SECONDS,
            f"warm/direct_tokens>={TARGET_WARM_TOKENS_RATIO:.2f}": warm["tokens_ratio"]
            >= TARGET_WARM_TOKENS_RATIO,
            "all_answered": all_answered,
        },
    }


def report(r: dict[str, Any]) -> None:
    batch, out = r["batch"], r["outputs"]
    dock, node = r["docker"], r["node"]
    print(
        f"batch          : {batch['requests']} requests, max_tokens {batch['max_tokens']}, "
        f"{batch['bytes']} bytes; model {r['model']['name']} ({r['model']['bytes'] / 1e6:.1f} MB); "
        f"cpus {r['cpus']:g}, memory {r['memory_mb']} MB"
    )
    print_walls(r)
    warm = ", ".join(f"{w:.2f}" for w in node["warmup_quote_seconds"])
    print(
        f"                 (median of {r['repeat']}; vLLM start-up inside both; warm-up quotes {warm} s, "
        "not counted)"
    )
    targets = r["targets"]
    print(
        f"node/docker    : {r['ratio']['node/docker']:.3f}   (target <= {TARGET_NODE_OVER_DOCKER:.2f}: "
        f"{met(targets[f'node/docker<={TARGET_NODE_OVER_DOCKER:.2f}'])})"
    )
    print_overhead(r["overhead_ms"])
    for name, way in (("docker tokens  ", dock), ("node tokens    ", node)):
        t = way["tokens"]
        prompt = ", ".join(str(x) for x in t["prompt"])
        completion = ", ".join(str(x) for x in t["completion"])
        print(
            f"{name}: prompt {prompt}, completion {completion}; {t['completion_per_second']:.2f} "
            f"completion tok/s, {t['total_per_second']:.2f} tok/s"
        )
    print_stages(node)
    print(
        f"outputs        : all answered {str(out['all_answered']).lower()}, "
        f"same custom_ids {str(out['same_custom_ids']).lower()}, "
        f"all 200 {str(out['all_status_200']).lower()}, "
        f"same texts {str(out['same_texts']).lower()} (not a target)"
    )
    print(f"usage == output: {str(out['node_usage_matches_output']).lower()}  (the node's billed tokens)")
    print_argv_hash(r)
    report_warm(r["warm"], targets)


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="lines in the batch")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="completion cap per request")
    ap.add_argument(
        "--warm-repeat",
        type=int,
        default=DEFAULT_WARM_REPEAT,
        help="warm jobs and direct runs; medians count",
    )
    ap.add_argument(
        "--warm-concurrency",
        type=int,
        default=DEFAULT_MODEL_WARM_CONCURRENCY,
        help="the warm entry's warm_concurrency: requests in flight to the engine, node and direct alike",
    )
    add_run_options(
        ap, ways="both ways", memory_mb=DEFAULT_MEMORY_MB, dir_holds="the model, batch and outputs"
    )
    args = parse_args(ap)
    if args.requests < 1:
        ap.error("--requests must be at least 1")
    if not 1 <= args.max_tokens < MAX_CONTEXT // 2:
        ap.error(f"--max-tokens must be from 1 to {MAX_CONTEXT // 2 - 1}")
    if args.warm_repeat < 1 or args.warm_concurrency < 1:
        ap.error("--warm-repeat and --warm-concurrency must be at least 1")
    r = run(args)
    finish(r, as_json=args.json, report=report)  # its exit code counts every target; only answers do here
    return 0 if r["targets"]["all_answered"] else 1


if __name__ == "__main__":
    sys.exit(main())
