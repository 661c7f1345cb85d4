"""Work estimates: media by clip, probe and limits; batches by counting the tokens of real JSONL."""

from __future__ import annotations

import json
from typing import Any

import pytest

from node.errors import HearthError, RequestError
from provider.estimate import (
    ApproxTokenCounter,
    BatchEstimator,
    InputProbe,
    MediaEstimator,
    estimator_for,
)
from tests.provider.conftest import MakeEnv

MIB = 1024 * 1024
# 1080p over 720p pixels: the decode share when the input has not been probed.
DEFAULT_DECODE_RATIO = (1920 * 1080) / (1280 * 720)


# ------------------------------------------------------------------------------------------------ media


def test_mp4_from_clip(make_env: MakeEnv) -> None:
    env = make_env(
        {"format": "mp4", "resolution": "720p", "clip": {"start_seconds": 5, "duration_seconds": 60}}
    )
    est = MediaEstimator().estimate(env, None)
    assert est.basis == "clip"
    # 60 s x (1.0 encode at 720p + 0.15 decode x 2.25 for an assumed 1080p source) = 80.25 CPU-seconds.
    assert est.cpu_seconds == pytest.approx(80.25)
    # (4500 kbps video + 128 kbps AAC) x 60 s x 1.03 container overhead.
    assert est.output_mb == pytest.approx(4628 * 1000 / 8 * 60 * 1.03 / MIB)
    assert est.gpu_seconds == 0.0
    assert (est.input_tokens, est.output_tokens) == (0, 0)


def test_mp4_from_probe(make_env: MakeEnv) -> None:
    env = make_env({"format": "mp4", "resolution": "1080p", "audio_codec": "none"})
    est = MediaEstimator().estimate(env, InputProbe(duration_seconds=30.0, width=1280, height=720))
    assert est.basis == "ffprobe"
    # 30 s x (2.25 encode at 1080p + 0.15 decode of a 720p source) = 72.0
    assert est.cpu_seconds == pytest.approx(72.0)
    assert est.output_mb == pytest.approx(7800 * 1000 / 8 * 30 * 1.03 / MIB)


def test_clip_is_cut_to_the_probed_input(make_env: MakeEnv) -> None:
    spec = {"format": "mp4", "resolution": "360p", "clip": {"start_seconds": 90, "duration_seconds": 30}}
    probe = InputProbe(duration_seconds=100.0, width=640, height=360)
    est = MediaEstimator().estimate(make_env(spec), probe)
    assert est.basis == "ffprobe"
    # Only 10 s of the clip exist: 10 x (0.25 encode + 0.15 x 0.25 decode).
    assert est.cpu_seconds == pytest.approx(10 * (0.25 + 0.0375))


def test_hls_counts_every_rendition(make_env: MakeEnv) -> None:
    spec = {
        "format": "hls",
        "renditions": ["360p", "720p"],
        "clip": {"start_seconds": 0, "duration_seconds": 20},
    }
    est = MediaEstimator().estimate(make_env(spec), None)
    # Two encodes (0.25 + 1.0) and one decode, plus 5% for segmenting.
    assert est.cpu_seconds == pytest.approx(20 * (1.25 + 0.15 * DEFAULT_DECODE_RATIO) * 1.05)
    assert est.output_mb == pytest.approx((1000 + 128 + 4500 + 128) * 1000 / 8 * 20 * 1.03 / MIB)
    single = MediaEstimator().estimate(
        make_env(
            {"format": "mp4", "resolution": "720p", "clip": {"start_seconds": 0, "duration_seconds": 20}}
        ),
        None,
    )
    assert est.cpu_seconds > single.cpu_seconds


def test_thumbnails_cost_per_timestamp(make_env: MakeEnv) -> None:
    env = make_env({"format": "thumbnails", "timestamps": [1, 2, 3, 4], "image_format": "png"})
    est = MediaEstimator().estimate(env, None)
    assert est.basis == "timestamps"
    assert est.cpu_seconds == pytest.approx(2.0)
    assert est.output_mb == pytest.approx(4 * 640 * 360 * 1.5 / MIB)


def test_audio_is_cheap(make_env: MakeEnv) -> None:
    env = make_env(
        {"format": "audio", "bitrate_kbps": 192, "clip": {"start_seconds": 0, "duration_seconds": 60}}
    )
    est = MediaEstimator().estimate(env, None)
    assert est.basis == "clip"
    assert est.cpu_seconds == pytest.approx(3.0)
    assert est.output_mb == pytest.approx(192 * 1000 / 8 * 60 * 1.03 / MIB)


def test_without_duration_the_limits_bound_it(make_env: MakeEnv) -> None:
    env = make_env(limits={"timeout_seconds": 900, "cpus": 2, "max_output_mb": 700, "gpus": 1})
    est = MediaEstimator().estimate(env, InputProbe(width=1920, height=1080))
    assert est.basis == "limits"
    assert est.cpu_seconds == 1800.0
    assert est.gpu_seconds == 900.0
    assert est.output_mb == 700.0


def test_estimates_never_exceed_the_limits(make_env: MakeEnv) -> None:
    env = make_env(
        {"format": "mp4", "resolution": "1080p"},
        limits={"timeout_seconds": 60, "cpus": 1, "max_output_mb": 5, "gpus": 1},
    )
    est = MediaEstimator().estimate(env, InputProbe(duration_seconds=36_000.0))
    assert est.basis == "ffprobe"
    assert est.cpu_seconds == 60.0 and est.gpu_seconds == 60.0 and est.output_mb == 5.0


def test_a_held_gpu_is_billed_for_the_wall_time(make_env: MakeEnv) -> None:
    env = make_env(
        {"format": "mp4", "resolution": "720p", "clip": {"start_seconds": 0, "duration_seconds": 60}},
        limits={"cpus": 4, "gpus": 2},
    )
    est = MediaEstimator().estimate(env, None)
    assert est.gpu_seconds == pytest.approx(est.cpu_seconds / 4 * 2)


def test_media_estimator_refuses_a_batch(make_env: MakeEnv) -> None:
    with pytest.raises(HearthError) as info:
        MediaEstimator().estimate(make_env(kind="vllm_batch"), None)
    assert info.value.code == "estimator_mismatch"


# ------------------------------------------------------------------------------------------------ batch


def test_approx_token_counter() -> None:
    counter = ApproxTokenCounter()
    assert counter.count("") == 0
    assert counter.count("abcd") == 1
    assert counter.count("abcde") == 2
    assert counter.count("héllo") == 2  # 6 UTF-8 bytes
    assert counter.count("日本語") == 3  # 9 UTF-8 bytes


def batch_line(custom_id: str, messages: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "llama-3.1-8b-instruct", "messages": messages, **body},
    }


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"


BATCH = jsonl(
    batch_line(
        "r1",
        [
            {"role": "system", "content": "You are terse."},  # 14 bytes -> 4 tokens
            {"role": "user", "content": "Name three primes."},  # 18 bytes -> 5 tokens
        ],
        max_tokens=50,
    ),
    batch_line("r2", [{"role": "user", "content": [{"type": "text", "text": "Translate 'bonjour'."}]}]),  # 5
    "",
    batch_line(
        "r3", [{"role": "user", "content": "Write a haiku about rain."}], max_completion_tokens=1000
    ),  # 7
)
# 3 requests x 3 reply-priming tokens + 4 messages x 5 template tokens + (4 + 5 + 5 + 7) content tokens.
BATCH_INPUT_TOKENS = 9 + 20 + 21
# 50 + spec default 256 + min(1000, 256).
BATCH_OUTPUT_TOKENS = 562


def test_batch_counts_tokens_of_real_jsonl(make_env: MakeEnv) -> None:
    env = make_env(kind="vllm_batch", limits={"cpus": 2})
    est = BatchEstimator().estimate(env, InputProbe(data=BATCH))
    assert est.basis == "token_count"
    assert est.input_tokens == BATCH_INPUT_TOKENS
    assert est.output_tokens == BATCH_OUTPUT_TOKENS
    # CPU backend: 50 tokens at 200/s prefill + 562 at 20/s decode, on 2 CPUs.
    assert est.cpu_seconds == pytest.approx((50 / 200 + 562 / 20) * 2)
    assert est.gpu_seconds == 0.0
    assert est.output_mb == pytest.approx((562 * 4 + 3 * 600) / MIB)


def test_batch_on_gpu(make_env: MakeEnv) -> None:
    env = make_env(kind="vllm_batch", limits={"cpus": 1, "gpus": 1})
    est = BatchEstimator().estimate(env, InputProbe(data=BATCH))
    wall = 50 / 5000 + 562 / 1000
    assert est.gpu_seconds == pytest.approx(wall)
    assert est.cpu_seconds == pytest.approx(wall)


def test_batch_without_data_is_bounded_by_its_spec(make_env: MakeEnv) -> None:
    env = make_env(
        {"model": "llama-3.1-8b-instruct", "max_tokens": 100, "max_requests": 10},
        kind="vllm_batch",
        limits={"timeout_seconds": 3600, "cpus": 1, "gpus": 1},
    )
    est = estimator_for("vllm_batch").estimate(env, None)
    assert est.basis == "spec"
    assert est.output_tokens == 1000
    assert est.input_tokens == 10 * 512
    assert est.gpu_seconds == pytest.approx(5120 / 5000 + 1000 / 1000)


def test_batch_time_is_capped_by_the_timeout(make_env: MakeEnv) -> None:
    env = make_env(kind="vllm_batch", limits={"timeout_seconds": 60, "cpus": 2})
    est = BatchEstimator().estimate(env, None)  # 1000 requests x 256 tokens on CPU: far past 60 s
    assert est.cpu_seconds == 120.0
    assert est.output_tokens == 256_000


def test_custom_token_counter(make_env: MakeEnv) -> None:
    class WordCounter:
        def count(self, text: str) -> int:
            return len(text.split())

    est = BatchEstimator(WordCounter()).estimate(make_env(kind="vllm_batch"), InputProbe(data=BATCH))
    # Words: 3 + 3 + 2 + 5 = 13, plus the same 29 template and priming tokens.
    assert est.input_tokens == 13 + 29


@pytest.mark.parametrize(
    ("data", "line", "reason"),
    [
        (jsonl(batch_line("a", [{"role": "user", "content": "hi"}]), "{not json"), 2, "not valid JSON"),
        (jsonl(batch_line("a", [{"role": "user", "content": "hi"}]), "", "[1, 2]"), 3, "JSON object"),
        (b"\xff\xfe\n", 1, "not valid JSON"),
        (jsonl({**batch_line("a", []), "url": "/v1/embeddings"}), 1, "url must be"),
        (jsonl({**batch_line("a", []), "method": "GET"}), 1, "method must be"),
        (jsonl(batch_line("", [{"role": "user", "content": "x"}])), 1, "custom_id"),
        (
            jsonl(batch_line("a", [{"role": "user", "content": "x"}]), batch_line("a", [{"role": "user"}])),
            2,
            "repeated",
        ),
        (jsonl(batch_line("a", [])), 1, "messages"),
        (jsonl(batch_line("a", [{"content": "no role"}])), 1, "role"),
        (jsonl(batch_line("a", [{"role": "user", "content": "x"}], max_tokens=0)), 1, "max_tokens"),
        (jsonl(batch_line("a", [{"role": "user", "content": "x"}], max_tokens=True)), 1, "max_tokens"),
        (
            jsonl(batch_line("a", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])),
            1,
            "text content",
        ),
        (jsonl(batch_line("a", [{"role": "user", "content": 42}])), 1, "content"),
        (b"\n\n", 1, "no requests"),
    ],
)
def test_malformed_batch_line(make_env: MakeEnv, data: bytes, line: int, reason: str) -> None:
    with pytest.raises(RequestError) as info:
        BatchEstimator().estimate(make_env(kind="vllm_batch"), InputProbe(data=data))
    err = info.value
    assert err.code == "invalid_batch" and err.http_status == 422
    assert err.details["line"] == line
    assert reason in err.details["reason"]


def test_batch_model_must_match_the_envelope(make_env: MakeEnv) -> None:
    line = batch_line("a", [{"role": "user", "content": "x"}])
    line["body"]["model"] = "gpt-4o"
    with pytest.raises(RequestError) as info:
        BatchEstimator().estimate(make_env(kind="vllm_batch"), InputProbe(data=jsonl(line)))
    assert info.value.details == {
        "line": 1,
        "reason": "body.model must be the envelope's model 'llama-3.1-8b-instruct'",
    }


def test_batch_longer_than_max_requests(make_env: MakeEnv) -> None:
    env = make_env({"model": "llama-3.1-8b-instruct", "max_requests": 2}, kind="vllm_batch")
    data = jsonl(*(batch_line(f"r{i}", [{"role": "user", "content": "x"}]) for i in range(3)))
    with pytest.raises(RequestError) as info:
        BatchEstimator().estimate(env, InputProbe(data=data))
    assert info.value.details["line"] == 3
    assert "max_requests" in info.value.details["reason"]


# --------------------------------------------------------------------------------------------- dispatch


def test_estimator_for_dispatches_by_kind() -> None:
    assert isinstance(estimator_for("ffmpeg_transcode"), MediaEstimator)
    assert isinstance(estimator_for("vllm_batch"), BatchEstimator)
    with pytest.raises(RequestError) as info:
        estimator_for("blender_render")
    assert info.value.code == "unknown_kind" and info.value.http_status == 422
