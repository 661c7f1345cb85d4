"""Work estimates: media by clip, probe and limits; batches by counting the tokens of real JSONL."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from core.errors import HearthError, RequestError
from node.http_errors import status_of
from provider.estimate import (
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


class WordModels:
    """A catalog stand-in: one model of 4096 tokens, whose prompt is its words plus 3 per message."""

    def __init__(self, context: int = 4096) -> None:
        self.context = context
        self.counted: list[int] = []

    def context_of(self, model: str) -> int:
        if model != MODEL:
            raise RequestError("unknown_model", f"no model {model!r}")
        return self.context

    def prompt_tokens(self, model: str, messages: Sequence[Mapping[str, str]]) -> int:
        tokens = sum(3 + len(m["content"].split()) for m in messages)
        self.counted.append(tokens)
        return tokens


MODEL = "llama-3.1-8b-instruct"


def batch_line(custom_id: str, messages: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": messages, **body},
    }


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"


BATCH = jsonl(
    batch_line(
        "r1",
        [
            {"role": "system", "content": "You are terse."},  # 3 + 3 words
            {"role": "user", "content": "Name three primes."},  # 3 + 3 words
        ],
        max_tokens=50,
    ),
    batch_line(
        "r2", [{"role": "user", "content": [{"type": "text", "text": "Translate 'bonjour'."}]}]
    ),  # 3 + 2
    "",
    batch_line("r3", [{"role": "user", "content": "Write a haiku about rain."}], max_completion_tokens=100),
)
# (6 + 6) + 5 + (3 + 5) prompt tokens.
BATCH_INPUT_TOKENS = 25
# 50 + the spec's default 256 + 100.
BATCH_OUTPUT_TOKENS = 406


def test_batch_counts_tokens_of_real_jsonl(make_env: MakeEnv) -> None:
    env = make_env(kind="vllm_batch", limits={"cpus": 2})
    models = WordModels()
    est = BatchEstimator(models).estimate(env, InputProbe(data=BATCH))
    assert est.basis == "token_count"
    assert models.counted == [12, 5, 8]  # every line through the model's counter, text parts included
    assert est.input_tokens == BATCH_INPUT_TOKENS
    assert est.output_tokens == BATCH_OUTPUT_TOKENS
    # Inference is priced per token: no compute time is estimated.
    assert (est.cpu_seconds, est.gpu_seconds) == (0.0, 0.0)
    assert est.output_mb == pytest.approx((406 * 4 + 3 * 600) / MIB)


def test_batch_without_data_is_bounded_by_its_spec(make_env: MakeEnv) -> None:
    env = make_env({"model": MODEL, "max_tokens": 100, "max_requests": 10}, kind="vllm_batch")
    est = estimator_for("vllm_batch", WordModels()).estimate(env, None)
    assert est.basis == "spec"
    assert est.output_tokens == 1000
    assert est.input_tokens == 10 * 512


def test_batch_spec_prompt_fits_the_context(make_env: MakeEnv) -> None:
    env = make_env({"model": MODEL, "max_tokens": 100, "max_requests": 10}, kind="vllm_batch")
    est = BatchEstimator(WordModels(context=300)).estimate(env, None)
    assert est.input_tokens == 10 * 200  # a prompt can be at most context - max_tokens


def test_batch_output_size_is_capped_by_the_limit(make_env: MakeEnv) -> None:
    env = make_env(
        {"model": MODEL, "max_tokens": 32_000, "max_requests": 100_000},
        kind="vllm_batch",
        limits={"max_output_mb": 5},
    )
    est = BatchEstimator(WordModels(context=64_000)).estimate(env, None)
    assert est.output_mb == 5.0


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
        (jsonl(batch_line("a", [{"role": "root", "content": "x"}])), 1, "role"),
        (jsonl(batch_line("a", [{"role": "user", "content": "x"}], max_tokens=0)), 1, "max_tokens"),
        (jsonl(batch_line("a", [{"role": "user", "content": "x"}], max_tokens=True)), 1, "max_tokens"),
        (jsonl(batch_line("a", [{"role": "user", "content": "x"}], n=3)), 1, "n must be 1"),
        (jsonl(batch_line("a", [{"role": "user", "content": "x"}], tools=[])), 1, "tools"),
        (
            jsonl(batch_line("a", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])),
            1,
            "text parts",
        ),
        (jsonl(batch_line("a", [{"role": "user", "content": 42}])), 1, "content"),
        (b"\n\n", 1, "no requests"),
    ],
)
def test_malformed_batch_line(make_env: MakeEnv, data: bytes, line: int, reason: str) -> None:
    with pytest.raises(RequestError) as info:
        BatchEstimator(WordModels()).estimate(make_env(kind="vllm_batch"), InputProbe(data=data))
    err = info.value
    assert err.code == "invalid_batch" and status_of(err) == 422
    assert (err.domain, err.retryable) == ("validation", False)
    assert err.details["line"] == line
    assert reason in str(err.details.get("reason", err.message))


def test_batch_model_must_match_the_envelope(make_env: MakeEnv) -> None:
    line = batch_line("a", [{"role": "user", "content": "x"}])
    line["body"]["model"] = "gpt-4o"
    with pytest.raises(RequestError) as info:
        BatchEstimator(WordModels()).estimate(make_env(kind="vllm_batch"), InputProbe(data=jsonl(line)))
    assert info.value.code == "unknown_model"
    assert info.value.details == {"line": 1, "model": "gpt-4o", "expected": MODEL}


def test_batch_longer_than_max_requests(make_env: MakeEnv) -> None:
    env = make_env({"model": MODEL, "max_requests": 2}, kind="vllm_batch")
    data = jsonl(*(batch_line(f"r{i}", [{"role": "user", "content": "x"}]) for i in range(3)))
    with pytest.raises(RequestError) as info:
        BatchEstimator(WordModels()).estimate(env, InputProbe(data=data))
    assert info.value.code == "batch_too_large"
    assert info.value.details == {"line": 3, "max_requests": 2}


def test_line_asking_more_than_the_envelope_max_tokens(make_env: MakeEnv) -> None:
    env = make_env({"model": MODEL, "max_tokens": 64}, kind="vllm_batch")
    data = jsonl(
        batch_line("ok", [{"role": "user", "content": "x"}]),
        batch_line("big", [{"role": "user", "content": "x"}], max_tokens=65),
    )
    with pytest.raises(RequestError) as info:
        BatchEstimator(WordModels()).estimate(env, InputProbe(data=data))
    assert info.value.code == "max_tokens_exceeded"
    assert info.value.details == {"line": 2, "max_tokens": 65, "limit": 64}


def test_line_that_does_not_fit_the_context(make_env: MakeEnv) -> None:
    env = make_env({"model": MODEL, "max_tokens": 50}, kind="vllm_batch")
    long = " ".join(["word"] * 60)  # 63 prompt tokens + 50 > 100
    data = jsonl(batch_line("long", [{"role": "user", "content": long}]))
    with pytest.raises(RequestError) as info:
        BatchEstimator(WordModels(context=100)).estimate(env, InputProbe(data=data))
    assert info.value.code == "context_length_exceeded"
    assert info.value.details == {
        "line": 1,
        "custom_id": "long",
        "prompt_tokens": 63,
        "max_tokens": 50,
        "max_context": 100,
    }
    fits = jsonl(batch_line("fits", [{"role": "user", "content": long}], max_tokens=37))
    assert BatchEstimator(WordModels(context=100)).estimate(env, InputProbe(data=fits)).input_tokens == 63


def test_a_node_without_models_knows_none(make_env: MakeEnv) -> None:
    with pytest.raises(RequestError) as info:
        estimator_for("vllm_batch").estimate(make_env(kind="vllm_batch"), None)
    assert info.value.code == "unknown_model"


# --------------------------------------------------------------------------------------------- dispatch


def test_estimator_for_dispatches_by_kind() -> None:
    assert isinstance(estimator_for("ffmpeg_transcode"), MediaEstimator)
    assert isinstance(estimator_for("vllm_batch", WordModels()), BatchEstimator)
    with pytest.raises(RequestError) as info:
        estimator_for("blender_render")
    assert info.value.code == "unknown_kind" and status_of(info.value) == 422
