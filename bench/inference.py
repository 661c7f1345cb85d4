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

Prints seconds for each, the ratio node/docker, the node's overhead in ms (node - docker wall; and the
result's ``runtime_seconds - container_seconds``), the prompt and completion tokens of each run and
tokens per second, and whether both outputs answered the same ``custom_id``s (every request) and gave the
same texts (reported, not a target: sampling is seeded, but vLLM on CPUs does not promise the same numbers
from run to run, so the texts of a random-weight model sometimes differ).

Target: node/docker <= 1.10. Exits 1 when it is missed, or when an output missed a request; a failed run
raises.

    .venv/bin/python bench/inference.py [--requests 16] [--max-tokens 32] [--cpus 2] [--memory-mb 4096]
                                        [--repeat 1] [--dir DIR] [--json]
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

from _common import (  # first: importing it puts the repository on sys.path for the project imports
    DOCKER_BASELINE,
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

from core.defaults import DEFAULT_SANDBOX_USER, DEFAULT_VLLM_SHM_MB
from payments.keys import Signer, new_ed25519
from provider.catalog import hash_model_dir
from provider.testmodel import MAX_CONTEXT, build_test_model
from requester.client import sign_request
from sandbox.vllm import (
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
    return job_envelope(
        job_id,
        "vllm_batch",
        cid,
        output_spec={
            "format": "openai_batch_jsonl",
            "model": MODEL_NAME,
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


def model_config(model: Model) -> str:
    """``node.toml`` lines for the model in the daemon's catalog, and no per-job minimum price.

    JSON strings and integers of plain text are TOML too, so ``[[models]]`` is written with ``json.dumps``.
    """
    entry = {
        "name": MODEL_NAME,
        "path": str(model.path.resolve()),
        "cid": model.cid,
        "max_context": MAX_CONTEXT,
        "dtype": MODEL_DTYPE,
        **MODEL_PRICES,
    }
    return '[pricing]\nminimum_per_job = "0"\n[[models]]\n' + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in entry.items()
    )


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
    daemon = Daemon(
        tmpdir / "node", ready_timeout_seconds=DAEMON_READY_TIMEOUT_SECONDS, config=model_config(model)
    )
    with daemon.running():
        t0 = time.perf_counter()
        batch_cid, warm_cid = upload(daemon, data, warmup_data)
        uploaded = time.perf_counter() - t0
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
    image = ensure_images(IMAGE_TAG)
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
        interleave(ways, args.repeat)
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
    job_runs = [r.run for r in runs.node]
    node = node_summary(job_runs, facts["upload_seconds"])
    docker_s = [r.seconds for r in runs.docker]
    node_answers = [r.answers for r in runs.node]
    docker_answers = [r.answers for r in runs.docker]
    everyone = [*node_answers, *docker_answers]
    all_answered = all(a.custom_ids == setup.custom_ids for a in everyone)
    all_ok = all(set(a.statuses.values()) == {200} for a in everyone)
    d, n = median(docker_s), node["seconds"]
    ratio = n / d
    node_usage = [r.result["usage"] for r in job_runs]
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
        "targets": {
            f"node/docker<={TARGET_NODE_OVER_DOCKER:.2f}": ratio <= TARGET_NODE_OVER_DOCKER,
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
    print(f"node/docker    : {r['ratio']['node/docker']:.3f}   (target <= {TARGET_NODE_OVER_DOCKER:.2f})")
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="lines in the batch")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="completion cap per request")
    add_run_options(
        ap, ways="both ways", memory_mb=DEFAULT_MEMORY_MB, dir_holds="the model, batch and outputs"
    )
    args = parse_args(ap)
    if args.requests < 1:
        ap.error("--requests must be at least 1")
    if not 1 <= args.max_tokens < MAX_CONTEXT // 2:
        ap.error(f"--max-tokens must be from 1 to {MAX_CONTEXT // 2 - 1}")
    return finish(run(args), as_json=args.json, report=report)


if __name__ == "__main__":
    sys.exit(main())
