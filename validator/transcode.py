"""Re-checking an ``ffmpeg_transcode`` result on the validator's own host.

The input comes from the node's gateway (verified) and is probed with the host's ffprobe to rebuild the
run's plan (the same argv the node ran, at the node's recorded thread count); the artifact comes as a
verified CAR, is unpacked under ``limits.max_output_mb`` and judged by the node's own judgement
(:func:`~sandbox.ffmpeg.collect_outputs` and :func:`~sandbox.ffmpeg.check_output`) with our own ffprobe;
``artifact_sha256`` is recomputed as the executor computes it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from core.envelope import FfmpegTranscodeEnvelope, canonical_json
from requester.client import NodeClient
from sandbox.ffmpeg import (
    MAX_FFMPEG_THREADS,
    OutputFile,
    Plan,
    check_output,
    collect_outputs,
    ffmpeg_threads,
    probe_file,
    transcode_argv,
)
from storage import Blockstore, FetchedInput
from validator.fetch import (
    MIB,
    SignedJob,
    artifact_root,
    fetch_artifact,
    fetch_job_input,
    listed_files,
    unpack_artifact,
)
from validator.judgement import Judgement, workspace


def artifact_sha256(files: Sequence[OutputFile]) -> str:
    """The result's ``artifact_sha256``, as the executor computes it: one file's own sha256, or
    ``sha256(JCS({name: sha256}))`` over several.
    """
    if len(files) == 1:
        return files[0].sha256
    return hashlib.sha256(canonical_json({f.name: f.sha256 for f in files})).hexdigest()


def rebuild_plan(env: FfmpegTranscodeEnvelope, fetched: FetchedInput, result: Mapping[str, Any]) -> Plan:
    """The run's plan, rebuilt from the envelope and our own probe of the input (host ffprobe, with the
    same protocol and demuxer allow-lists as the node's), at the thread count the node recorded.
    """
    info = probe_file(str(fetched.path.absolute()))
    recorded = (result.get("provenance") or {}).get("threads")
    threads = ffmpeg_threads(env.limits.cpus)
    if isinstance(recorded, int) and not isinstance(recorded, bool) and 1 <= recorded <= MAX_FFMPEG_THREADS:
        threads = recorded  # x264's output depends on it: the node's count reproduces the node's argv
    return transcode_argv(env.output_spec, info=info, threads=threads)


async def judge_transcode(client: NodeClient, signed: SignedJob, env: FfmpegTranscodeEnvelope) -> Judgement:
    """Fetch, verify and check a transcode's artifact against a plan rebuilt from its input.

    Everything fetched lives in a temporary folder, removed on return.
    """
    result = signed.result
    listed = listed_files(result)
    root = artifact_root(result)
    cap = env.limits.max_output_mb * MIB
    async with workspace() as tmp:
        store = await asyncio.to_thread(Blockstore.open, tmp / "blocks")
        fetched = await fetch_job_input(client, env, result, tmp / "input", store)
        plan = await asyncio.to_thread(rebuild_plan, env, fetched, result)
        await fetch_artifact(client, root, store, max_bytes=cap)
        single = next(iter(listed)) if len(listed) == 1 else plan.outputs[0]
        await asyncio.to_thread(unpack_artifact, store, root, tmp / "out", single_name=single, max_bytes=cap)
        files = await asyncio.to_thread(collect_outputs, plan, tmp / "out")
    checks = check_output(
        files, plan=plan, validation=env.validation, limits=env.limits, expected_sha256=listed
    )
    digest = artifact_sha256(files)
    provenance = result.get("provenance") or {}
    return Judgement(
        checks=checks,
        artifact_sha256=digest,
        digest_ok=digest == result.get("artifact_sha256"),
        argv_hash_match=plan.argv_hash == provenance.get("argv_hash"),
    )
