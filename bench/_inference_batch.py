"""bench/inference.py's batches: the model, the batch and its envelope, the cold run's plan and its bare
`docker run`, the answers read back and their token counts."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (  # first: importing it puts the repository on sys.path for the project imports
    LOG_TAIL_CHARS,
    RUN_TIMEOUT_SECONDS,
    JobRun,
    bind,
    docker_run_argv,
    job_envelope,
    median,
)

from core.defaults import (
    DEFAULT_SANDBOX_USER,
    DEFAULT_VLLM_SHM_MB,
)
from provider.testmodel import MAX_CONTEXT
from sandbox.vllm import (
    BATCH_URL,
    CONTAINER_BATCH_PATH,
    CONTAINER_MODEL_DIR,
    CONTAINER_OUTPUT_NAME,
    BatchPlan,
    batch_plan,
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
