"""The vLLM workload: one OpenAI batch run with ``vllm.entrypoints.openai.run_batch`` in a sandbox.

A job flows through it in this order::

    parse_batch(data, model=..., max_requests=..., max_tokens=..., max_context=..., prompt_tokens=...)
                                -> Batch (every line checked and measured), or a RequestError
                                   (domain "validation") naming the bad line, before anything runs
    batch_plan(...)             -> BatchPlan: argv and environment for the image (sandbox/images/vllm-*)
    BatchProgress().feed(line)  -> percent done, from run_batch's progress bar
    check_batch_output(batch, output, all_answered=...)
                                -> BatchOutcome: checks, tokens used; raise_for_checks() on failure

The model directory and the batch are mounted read-only (:data:`CONTAINER_MODEL_DIR`,
:data:`CONTAINER_BATCH_PATH`); the output is the one file :data:`CONTAINER_OUTPUT_PATH`. The container has
no network, so vLLM runs offline (the images set ``HF_HUB_OFFLINE``), and every request's completion is
capped at the envelope's ``max_tokens``: lines that name no ``max_tokens`` get it as their default.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Final, Literal

from sandbox._batch import (
    BATCH_URL,
    MAX_BATCH_BYTES,
    Batch,
    BatchCheck,
    BatchChecks,
    BatchOutcome,
    BatchRequest,
    bad_batch,
    check_batch_output,
    parse_batch,
)
from sandbox._checks import raise_for_checks

__all__ = [
    "BATCH_URL",
    "CONTAINER_BATCH_PATH",
    "CONTAINER_MODEL_DIR",
    "CONTAINER_OUTPUT_NAME",
    "CONTAINER_OUTPUT_PATH",
    "CONTAINER_SOCKET_NAME",
    "CONTAINER_SOCKET_PATH",
    "MAX_BATCH_BYTES",
    "Batch",
    "BatchCheck",
    "BatchChecks",
    "BatchOutcome",
    "BatchPlan",
    "BatchProgress",
    "BatchRequest",
    "bad_batch",
    "batch_plan",
    "check_batch_output",
    "cpu_memory_needed_mb",
    "kv_cache_gib",
    "parse_batch",
    "raise_for_checks",
    "server_plan",
]

CONTAINER_MODEL_DIR: Final = "/model"
CONTAINER_BATCH_PATH: Final = "/in/batch.jsonl"
CONTAINER_OUTPUT_NAME: Final = "output.jsonl"
CONTAINER_OUTPUT_PATH: Final = f"/out/{CONTAINER_OUTPUT_NAME}"
# a warm engine's socket, in its own folder (the engine's only writable mount)
CONTAINER_SOCKET_NAME: Final = "engine.sock"
CONTAINER_SOCKET_PATH: Final = f"/out/{CONTAINER_SOCKET_NAME}"
# Sampling is seeded, so a request without its own seed samples the same way on every run of this plan.
DEFAULT_SEED: Final = 0
# What a CPU run holds besides weights and KV cache: vLLM, torch, the engine, its worker and the page cache
# of the libraries they map, which cgroup v1 charges to the container. vLLM allocates the KV cache only if
# that much is still free under the limit: at 3072 MB it once found 1.0 of 3.0 GiB free (2.0 GiB in use)
# and refused a 1 GiB cache. 2.5 GiB leaves a margin over what was measured.
CPU_RUNTIME_MB: Final = 2560
# vLLM's CPU KV cache is set in whole GiB (VLLM_CPU_KVCACHE_SPACE); a run gets at least one.
CPU_MIN_KV_CACHE_MB: Final = 1024
_MIB: Final = 1024 * 1024

_PROGRESS = re.compile(r"Running batch:\s*(\d{1,3})% Completed \| (\d+)/(\d+)")

Device = Literal["cpu", "gpu"]


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """What the container runs: the whole argv (no shell), its environment and a hash that names both."""

    argv: tuple[str, ...]
    env: dict[str, str]
    device: Device

    @property
    def argv_hash(self) -> str:
        doc = json.dumps({"argv": self.argv, "env": self.env}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()


def cpu_memory_needed_mb(model_bytes: int) -> int:
    """The least memory limit a CPU run of a model this size needs: runtime, weights, the smallest cache."""
    return CPU_RUNTIME_MB + math.ceil(model_bytes / _MIB) + CPU_MIN_KV_CACHE_MB


def kv_cache_gib(memory_mb: int, model_bytes: int) -> int:
    """Whole GiB of KV cache a CPU run can have within ``memory_mb`` (at least 1)."""
    spare = memory_mb - CPU_RUNTIME_MB - math.ceil(model_bytes / _MIB)
    return max(1, spare // 1024)


def batch_plan(
    *,
    served_name: str,
    max_context: int,
    max_tokens: int,
    dtype: str,
    cpus: float,
    memory_mb: int,
    gpus: int,
    model_bytes: int,
) -> BatchPlan:
    """The run_batch command for one job: the model served under the envelope's name, capped per request.

    On GPUs the engine spreads the model over the pinned devices (tensor parallel); on CPUs it runs eager
    (no compile step: a batch pays start-up once) with a KV cache sized to the job's memory limit.
    """
    generation = json.dumps({"max_new_tokens": max_tokens}, separators=(",", ":"))
    head = [
        "python3",
        "-m",
        "vllm.entrypoints.openai.run_batch",
        "-i",
        CONTAINER_BATCH_PATH,
        "-o",
        CONTAINER_OUTPUT_PATH,
    ]
    tail = ["--override-generation-config", generation]
    return _engine_plan(head, tail, served_name, max_context, dtype, cpus, memory_mb, gpus, model_bytes)


def server_plan(
    *,
    served_name: str,
    max_context: int,
    dtype: str,
    cpus: float,
    memory_mb: int,
    gpus: int,
    model_bytes: int,
) -> BatchPlan:
    """A warm engine (DESIGN §15): vLLM's OpenAI server on a unix socket in its output folder, the engine
    set up exactly as a cold run's (:func:`batch_plan`) but kept running between jobs. Prefix caching is
    off, so one requester's prompts cannot be timed by another's; each request carries its own cap.
    """
    head = ["python3", "-m", "vllm.entrypoints.openai.api_server", "--uds", CONTAINER_SOCKET_PATH]
    tail = ["--no-enable-prefix-caching", "--disable-uvicorn-access-log"]
    return _engine_plan(head, tail, served_name, max_context, dtype, cpus, memory_mb, gpus, model_bytes)


def _engine_plan(
    head: list[str],
    tail: list[str],
    served_name: str,
    max_context: int,
    dtype: str,
    cpus: float,
    memory_mb: int,
    gpus: int,
    model_bytes: int,
) -> BatchPlan:
    argv = [
        *head,
        "--model",
        CONTAINER_MODEL_DIR,
        "--served-model-name",
        served_name,
        "--max-model-len",
        str(max_context),
        "--dtype",
        dtype,
        "--seed",
        str(DEFAULT_SEED),
        *tail,
        "--disable-log-stats",
    ]
    threads = max(1, math.ceil(cpus))
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if gpus > 0:
        argv += ["--tensor-parallel-size", str(gpus)]
        return BatchPlan(argv=tuple(argv), env=env, device="gpu")
    argv += ["--enforce-eager"]
    env |= {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib(memory_mb, model_bytes)),
        # The CPU quota, not a cpuset, bounds the container: binding threads to cores it may not own fails.
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    return BatchPlan(argv=tuple(argv), env=env, device="cpu")


class BatchProgress:
    """Reads run_batch's progress bar ("Running batch: 50% Completed | 2/4") from its stderr."""

    def __init__(self) -> None:
        self.done = 0
        self.total = 0

    def feed(self, line: str) -> float | None:
        """The percent done after ``line``, or None if the line says nothing new."""
        found = None
        for found in _PROGRESS.finditer(line):  # noqa: B007 - the last bar drawn in the chunk counts
            pass
        if found is None:
            return None
        done, total = int(found.group(2)), int(found.group(3))
        if (done, total) == (self.done, self.total):
            return None
        self.done, self.total = done, total
        return 100.0 * done / total if total else 0.0
