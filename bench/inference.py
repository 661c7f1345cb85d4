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
import os
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
    Daemon,
    add_run_options,
    argv_hash_equals,
    ensure_images,
    finish,
    interleave,
    median,
    node_summary,
    overhead_ms,
    parse_args,
    print_argv_hash,
    print_overhead,
    print_stages,
    print_walls,
    sandbox_output_dir,
    unique,
    upload,
)
from _inference_batch import (
    DAEMON_READY_TIMEOUT_SECONDS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MEMORY_MB,
    DEFAULT_REQUESTS,
    DEFAULT_WARM_REPEAT,
    IMAGE_TAG,
    MODEL_DTYPE,
    MODEL_NAME,
    TARGET_NODE_OVER_DOCKER,
    TARGET_WARM_OVERHEAD_SECONDS,
    TARGET_WARM_TOKENS_RATIO,
    WARM_MODEL_NAME,
    WARMUP_PROMPT,
    DockerRun,
    Model,
    NodeRun,
    batch_lines,
    chat_line,
    docker_argv,
    envelope,
    jsonl,
    make_batch,
    plan_for,
    read_answers,
    time_docker,
    tokens,
    warm_image,
)
from _inference_node import (
    Setup,
    WarmEntry,
    WarmRuns,
    met,
    model_config,
    node_job,
    report_warm,
    summarize_warm,
    warm_node,
)

from core.defaults import (
    DEFAULT_MODEL_WARM_CONCURRENCY,
)
from node.warm import WARM_JOB_NEED
from payments.keys import new_ed25519
from provider.catalog import hash_model_dir
from provider.testmodel import MAX_CONTEXT, build_test_model
from sandbox.vllm import (
    server_plan,
)

# -- the bench -------------------------------------------------------------------------------------------


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
