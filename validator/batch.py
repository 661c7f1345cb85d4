"""Re-checking a ``vllm_batch`` result without the model.

The input's request lines are checked as the node checks them (format, model, ``max_tokens``, count)
except for prompt length, which needs the model's tokenizer; the output, fetched as a verified CAR, must
answer each request once, with status 200 where ``validation.all_answered``, within each line's
``max_tokens``, and its usage must sum to what the result reports (and is charged for).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Mapping

from core.envelope import VllmBatchEnvelope
from requester.client import NodeClient
from sandbox.vllm import check_batch_output, parse_batch
from storage import Blockstore
from validator.fetch import (
    MIB,
    SignedJob,
    artifact_root,
    fetch_artifact,
    fetch_job_input,
    listed_files,
    refused,
    unpack_artifact,
)
from validator.judgement import Judgement, workspace


async def judge_batch(client: NodeClient, signed: SignedJob, env: VllmBatchEnvelope) -> Judgement:
    """Judge a batch's answers against its requests (see the module docstring).

    Everything fetched lives in a temporary folder, removed on return.
    """
    result = signed.result
    listed = listed_files(result)
    if len(listed) != 1:
        raise refused("result_malformed", "a batch result lists exactly one file, its output JSONL")
    root = artifact_root(result)
    cap = env.limits.max_output_mb * MIB
    name = next(iter(listed))
    async with workspace() as tmp:
        store = await asyncio.to_thread(Blockstore.open, tmp / "blocks")
        fetched = await fetch_job_input(client, env, result, tmp / "input", store)
        requests = await asyncio.to_thread(fetched.path.read_bytes)
        await fetch_artifact(client, root, store, max_bytes=cap)
        await asyncio.to_thread(unpack_artifact, store, root, tmp / "out", single_name=name, max_bytes=cap)
        answers = await asyncio.to_thread((tmp / "out" / name).read_bytes)
    spec = env.output_spec
    batch = parse_batch(
        requests,
        model=spec.model,
        max_requests=spec.max_requests,
        max_tokens=spec.max_tokens,
        max_context=sys.maxsize,  # prompt length needs the node's tokenizer; the engine enforced it
        prompt_tokens=lambda messages: 0,
    )
    reported = result.get("usage")
    outcome = check_batch_output(
        batch,
        answers,
        all_answered=env.validation.all_answered,
        reported_usage=reported if isinstance(reported, Mapping) else {},
    )
    digest = hashlib.sha256(answers).hexdigest()
    return Judgement(
        checks=outcome.checks,
        artifact_sha256=digest,
        digest_ok=digest == result.get("artifact_sha256") == listed[name],
        argv_hash_match=None,
    )
