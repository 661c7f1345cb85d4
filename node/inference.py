"""The inference pipeline: one attempt of one ``vllm_batch`` job, from batch to published answers.

fetch the batch (verified: CID or sha256) -> check every line against the envelope and the model (exact
prompt tokens with the model's tokenizer; a bad line fails the job here, before any container starts)
-> run vLLM's run_batch in a sandbox with the model and the batch mounted read-only, following its
progress -> check the output (every request answered once, statuses, token usage) -> publish it to the
blockstore -> the result document, charged on the tokens actually used, never above the quote.

GPU jobs run the GPU image with their devices pinned; jobs without a GPU run the CPU build of vLLM.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from core.config import NodeConfig
from core.envelope import VllmBatchEnvelope, parse_envelope
from core.errors import CapacityError, ExecutionError, OutputValidationError
from core.journal import JobRecord
from node.executor import WorkloadExecutor, Workspace
from node.scheduler import ProgressReport
from node.warm import WarmEngines
from provider.catalog import CatalogModel, ModelCatalog
from provider.estimate import MIB, InputProbe, WorkEstimate
from provider.pricing import Pricer
from sandbox.runner import Mount, RunResult, RunSpec
from sandbox.vllm import (
    CONTAINER_BATCH_PATH,
    CONTAINER_MODEL_DIR,
    CONTAINER_OUTPUT_NAME,
    MAX_BATCH_BYTES,
    Batch,
    BatchPlan,
    BatchProgress,
    bad_batch,
    batch_plan,
    check_batch_output,
    parse_batch,
    raise_for_checks,
)
from storage import FetchedInput, import_bytes

log = logging.getLogger("hearth.inference")

# A batch is read into memory to be checked at quote time; above this size the quote prices on the
# envelope instead (the run still checks it, up to MAX_BATCH_BYTES).
QUOTE_BATCH_MAX_BYTES = 64 * MIB


class InferenceExecutor(WorkloadExecutor):
    """Runs ``vllm_batch`` attempts for the scheduler (see :class:`node.scheduler.Executor`)."""

    def __init__(
        self,
        cfg: NodeConfig,
        pricer: Pricer,
        space: Workspace,
        *,
        catalog: ModelCatalog,
        warm: WarmEngines | None = None,
    ) -> None:
        """``warm``: the node's warm engines; a batch for a warm model runs on its engine."""
        super().__init__(cfg, pricer, space)
        self._catalog = catalog
        self._warm = warm
        self._images: dict[str, str] = {}

    async def execute(
        self, job: JobRecord, report: ProgressReport, *, gpu_ids: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        env = _batch_envelope(job)
        model = self._catalog.check(env)
        attempt = self._attempt_dir(job)
        try:
            started = time.monotonic()
            report({"stage": "fetching", "percent": 0.0})
            fetched = await self._fetch_for(env, attempt / "in" / "batch.jsonl")
            report({"stage": "validating", "percent": 0.0})
            batch = await asyncio.to_thread(self._parse, env, model, fetched)
            out = attempt / "out"
            warm = await self._on_warm_engine(env, model, batch, fetched, out, report)
            if warm is not None:
                ran, plan = warm
                report({"stage": "checking", "percent": 100.0})
                data = await asyncio.to_thread(_read_output, out)
                return await self._result(
                    job, env, model, batch, plan, ran.image_id, fetched, data, started, ran
                )
            plan = batch_plan(
                served_name=model.name,
                max_context=model.entry.max_context,
                max_tokens=env.output_spec.max_tokens,
                dtype=model.entry.dtype,
                cpus=env.limits.cpus,
                memory_mb=env.limits.memory_mb,
                gpus=len(gpu_ids),
                model_bytes=model.size_bytes,
            )
            image = await self._image_id(plan)
            ran = await self._infer(job, env, model, plan, image, fetched, out, report, gpu_ids)
            report({"stage": "checking", "percent": 100.0})
            data = await asyncio.to_thread(_read_output, out)
            return await self._result(job, env, model, batch, plan, image, fetched, data, started, ran)
        finally:
            await asyncio.to_thread(shutil.rmtree, attempt, True)

    async def _on_warm_engine(
        self,
        env: VllmBatchEnvelope,
        model: CatalogModel,
        batch: Batch,
        fetched: FetchedInput,
        out: Path,
        report: ProgressReport,
    ) -> tuple[RunResult, BatchPlan] | None:
        """The batch answered by the model's warm engine; None when the model is not warm.

        A batch for a warm model holds only the node's share of the work (the engine holds the rest), so
        it never runs cold: an engine that cannot start now (the capacity it needs is taken) fails the
        attempt ``engine_unavailable``, retryable.
        """
        if self._warm is None or not self._warm.is_warm(model.name):
            return None
        lines = await asyncio.to_thread(_request_lines, fetched.path, batch)
        try:
            return await self._warm.run_batch(
                model, lines, batch, out, report, limit_seconds=env.limits.timeout_seconds
            )
        except CapacityError as exc:
            raise ExecutionError(
                "engine_unavailable",
                f"the warm engine for {model.name} cannot start now: {exc.message}",
                details={"model": model.name},
                retryable=True,
            ) from None

    async def quote_probe(self, env: VllmBatchEnvelope) -> InputProbe | None:
        """The batch's bytes for its quote (every line is then counted), or None to price on the envelope.

        Fetched when the node can get it within the quote-time budget (an uploaded blob, an ipfs:// input
        already here or on a gateway, an https:// input) and no bigger than :data:`QUOTE_BATCH_MAX_BYTES`.
        """
        async with self._quote_input(env, "batch.jsonl") as fetched:
            if fetched is None or fetched.size > QUOTE_BATCH_MAX_BYTES:
                return None
            return InputProbe(data=await asyncio.to_thread(fetched.path.read_bytes))

    # -- steps ----------------------------------------------------------------------------------------

    def _parse(self, env: VllmBatchEnvelope, model: CatalogModel, fetched: FetchedInput) -> Batch:
        """Check and measure every line (blocking: reads the batch and runs the tokenizer)."""
        if fetched.size > MAX_BATCH_BYTES:
            raise bad_batch(
                "batch_too_large",
                f"the batch is {fetched.size} bytes; this node reads batches of up to {MAX_BATCH_BYTES}",
                size=fetched.size,
                max_bytes=MAX_BATCH_BYTES,
            )
        spec = env.output_spec
        return parse_batch(
            fetched.path.read_bytes(),
            model=model.name,
            max_requests=spec.max_requests,
            max_tokens=spec.max_tokens,
            max_context=model.entry.max_context,
            prompt_tokens=functools.partial(self._catalog.prompt_tokens, model.name),
        )

    async def _infer(
        self,
        job: JobRecord,
        env: VllmBatchEnvelope,
        model: CatalogModel,
        plan: BatchPlan,
        image: str,
        fetched: FetchedInput,
        out: Path,
        report: ProgressReport,
        gpu_ids: tuple[str, ...],
    ) -> RunResult:
        progress = BatchProgress()

        def on_stderr(line: str) -> None:
            percent = progress.feed(line)
            if percent is not None:
                report(
                    {
                        "stage": "inferring",
                        "percent": round(percent, 1),
                        "requests_done": progress.done,
                        "requests": progress.total,
                        "done": progress.done == progress.total,  # the last report is never dropped
                    }
                )

        report({"stage": "loading_model", "percent": 0.0, "model": model.name, "device": plan.device})
        sandbox = self._cfg.sandbox
        result = await self._runner.run(
            RunSpec(
                image=image,
                argv=plan.argv,
                job_id=job.id,
                attempt=job.attempts,
                output_dir=out,
                inputs=(
                    Mount(host=model.path, target=CONTAINER_MODEL_DIR, cid=model.entry.cid, model=True),
                    Mount(host=fetched.path, target=CONTAINER_BATCH_PATH, cid=str(fetched.cid)),
                ),
                cpus=env.limits.cpus,
                memory_mb=env.limits.memory_mb,
                timeout_seconds=env.limits.timeout_seconds,
                max_output_bytes=env.limits.max_output_mb * MIB,
                pids_limit=sandbox.pids_limit,
                tmpfs_mb=sandbox.tmpfs_mb,
                shm_mb=sandbox.vllm_shm_mb,
                env=plan.env,
                user=sandbox.user,
                gpu_ids=gpu_ids,
            ),
            on_stderr=on_stderr,
        )
        return result

    async def _result(
        self,
        job: JobRecord,
        env: VllmBatchEnvelope,
        model: CatalogModel,
        batch: Batch,
        plan: BatchPlan,
        image: str,
        fetched: FetchedInput,
        data: bytes,
        started: float,
        ran: RunResult,
    ) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        outcome = await asyncio.to_thread(
            check_batch_output, batch, data, all_answered=env.validation.all_answered
        )
        raise_for_checks(outcome.checks)
        imported = await asyncio.to_thread(import_bytes, data, self._store)
        used = WorkEstimate(
            cpu_seconds=0.0,
            gpu_seconds=0.0,
            output_mb=imported.size / MIB,
            input_tokens=outcome.prompt_tokens,
            output_tokens=outcome.completion_tokens,
            basis="token_count",
        )
        return {
            "job_id": env.job_id,
            "job": job.id,
            "status": "completed",
            "artifact_uri": f"ipfs://{imported.cid}",
            "artifact_cid": str(imported.cid),
            "artifact_sha256": digest,
            "artifact_size": imported.size,
            "files": [{"name": CONTAINER_OUTPUT_NAME, "size": imported.size, "sha256": digest}],
            "runtime_seconds": round(time.monotonic() - started, 3),
            "container_seconds": round(ran.wall_seconds, 3),
            "requests": len(batch.requests),
            "usage": outcome.usage(),
            "status_counts": outcome.status_counts,
            "cost": self._charge(job, env, used),
            "currency": "usdc",
            "checks": dict(outcome.checks),
            "provenance": {
                "node_did": self._did,
                "image_digest": image,
                "tool_versions": {"vllm": _vllm_version(data)},
                "argv_hash": plan.argv_hash,
                "device": plan.device,
                "model": model.name,
                "model_cid": model.entry.cid,
                "input_cid": str(fetched.cid),
                "input_sha256": fetched.sha256,
                "input_size": fetched.size,
                "attempt": job.attempts + 1,
            }
            | ({"worker": ran.worker} if ran.worker else {}),
        }

    async def _image_id(self, plan: BatchPlan) -> str:
        sandbox = self._cfg.sandbox
        tag = sandbox.vllm_gpu_image if plan.device == "gpu" else sandbox.vllm_cpu_image
        if tag not in self._images:
            self._images[tag] = await self._runner.image_digest(tag)
        return self._images[tag]


def _batch_envelope(job: JobRecord) -> VllmBatchEnvelope:
    env = parse_envelope(job.envelope)
    if not isinstance(env, VllmBatchEnvelope):
        raise ExecutionError(
            "kind_not_runnable",
            f"the inference executor does not run {env.kind} jobs",
            details={"kind": env.kind},
            retryable=False,
        )
    return env


def _read_output(out: Path) -> bytes:
    """The one file a run must leave (a plain file, nothing beside it), read whole."""
    found = sorted(p.name for p in out.iterdir())
    path = out / CONTAINER_OUTPUT_NAME
    if found != [CONTAINER_OUTPUT_NAME] or path.is_symlink() or not path.is_file():
        raise OutputValidationError(
            "output_missing" if CONTAINER_OUTPUT_NAME not in found else "unexpected_output",
            f"the run must leave exactly one plain file, {CONTAINER_OUTPUT_NAME}, in its output folder",
            details={"found": found[:20]},
        )
    return path.read_bytes()


def _request_lines(path: Path, batch: Batch) -> list[dict[str, Any]]:
    """Each request's line of the batch file, in the batch's order (the lines were checked already)."""
    raw = path.read_bytes().split(b"\n")
    return [json.loads(raw[request.line - 1]) for request in batch.requests]


def _vllm_version(output: bytes) -> str:
    """vLLM's version as its answers state it (``system_fingerprint: "vllm-0.32.0-..."``), or "unknown"."""
    marker = b'"system_fingerprint":"vllm-'
    at = output.find(marker)
    if at < 0:
        return "unknown"
    rest = output[at + len(marker) : at + len(marker) + 64]
    return rest.split(b"-", 1)[0].split(b'"', 1)[0].decode("ascii", "replace") or "unknown"
