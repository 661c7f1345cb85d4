"""Envelopes for the provider tests, built through the real parser so they are valid by construction."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from core.envelope import FfmpegTranscodeEnvelope, VllmBatchEnvelope, parse_envelope

MakeEnv = Callable[..., FfmpegTranscodeEnvelope | VllmBatchEnvelope]

PAYMENT = {
    "max_price": "5.00",
    "currency": "usdc",
    "chain_id": 31337,
    "escrow": "0x" + "e" * 40,
    "payer": "0x" + "a" * 40,
    "validator": "did:pkh:eip155:31337:0x" + "b" * 40,
}


def build_env(
    output_spec: dict[str, Any] | None = None,
    *,
    kind: str = "ffmpeg_transcode",
    limits: dict[str, Any] | None = None,
) -> FfmpegTranscodeEnvelope | VllmBatchEnvelope:
    """A parsed envelope; ``output_spec`` defaults to a 720p MP4 (or an 8B-model batch for vllm_batch)."""
    if output_spec is None:
        output_spec = (
            {"format": "mp4", "resolution": "720p"}
            if kind == "ffmpeg_transcode"
            else {"model": "llama-3.1-8b-instruct"}
        )
    return parse_envelope(
        {
            "job_id": "job-1",
            "kind": kind,
            "input_uri": "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
            "output_spec": output_spec,
            "limits": {"timeout_seconds": 600, "max_output_mb": 500, "cpus": 2, "memory_mb": 1024}
            | (limits or {}),
            "payment": PAYMENT,
        }
    )


@pytest.fixture
def make_env() -> MakeEnv:
    return build_env
