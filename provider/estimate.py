"""Work estimates: how much CPU, GPU, output and tokens a job will take, before it is priced.

One interface, :class:`WorkEstimator`, with one implementation per job kind. An estimate uses the best
knowledge at hand, named in ``basis``:

- ``"ffprobe"``: the fetched input was probed (duration, frame size);
- ``"clip"``: the envelope's clip fixes the duration;
- ``"timestamps"``: thumbnails, whose cost depends only on how many are asked for;
- ``"token_count"``: the batch JSONL was read and its tokens counted;
- ``"spec"``: a batch bounded by its spec (max_requests x max_tokens) without its data;
- ``"limits"``: nothing better is known, so the estimate is the most the envelope's limits allow.

Every estimate is capped by the envelope's limits (the sandbox stops a job at its timeout and output cap),
so the price built on it is a safe upper bound of the charge, as a quote must be (DESIGN §5).

The constants below are rules of thumb, named so they can be tuned once ``bench/`` measures this
machine; the comment on each says where it comes from.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from node.envelope import (
    AudioSpec,
    FfmpegTranscodeEnvelope,
    HlsSpec,
    Limits,
    Mp4Spec,
    ThumbnailsSpec,
    VllmBatchEnvelope,
)
from node.errors import HearthError, RequestError

Envelope = FfmpegTranscodeEnvelope | VllmBatchEnvelope
Basis = Literal["ffprobe", "clip", "timestamps", "token_count", "spec", "limits"]

MIB = 1024 * 1024  # output sizes are in MiB, the unit the sandbox's max_output_mb cap counts in

# --- media ---------------------------------------------------------------------------------------------
# Frame sizes of the envelope's named resolutions (16:9).
RESOLUTION_PIXELS: dict[str, int] = {
    "360p": 640 * 360,
    "480p": 854 * 480,
    "720p": 1280 * 720,
    "1080p": 1920 * 1080,
}
REFERENCE_PIXELS = RESOLUTION_PIXELS["720p"]
# libx264 at preset "medium" encodes 720p30 at roughly 30-40 fps per current x86 core (x264 and
# `ffmpeg -benchmark` figures), i.e. about one CPU-second per second of 720p output. Cost scales with pixels.
ENCODE_CPU_SECONDS_PER_SECOND_720P = 1.0
# H.264 decoding runs about an order of magnitude faster than encoding (`ffmpeg -benchmark -f null -`).
DECODE_CPU_SECONDS_PER_SECOND_720P = 0.15
# When the input has not been probed, assume a 1080p source (the most common upload size) for decoding.
DEFAULT_INPUT_PIXELS = RESOLUTION_PIXELS["1080p"]
# HLS adds segmenting and playlist writing on top of the per-rendition encodes.
HLS_OVERHEAD_FACTOR = 1.05
# Video bitrate per output height: the top rung for that height in Apple's HLS Authoring Specification
# ladder (1080p 7800k, 720p 4500k), with 360p/480p rounded up because CRF-encoded small frames run above a
# streaming ladder. Used only for the output-size estimate.
VIDEO_KBPS: dict[str, int] = {"360p": 1000, "480p": 1500, "720p": 4500, "1080p": 7800}
# AAC at the common stereo default.
AUDIO_KBPS_DEFAULT = 128
# MP4/MPEG-TS container overhead over the raw elementary streams.
CONTAINER_OVERHEAD_FACTOR = 1.03
# Audio-only extraction skips video decoding; AAC/MP3/FLAC encode at 20-100x realtime on one core.
AUDIO_CPU_SECONDS_PER_SECOND = 0.05
# A thumbnail = a seek to the nearest keyframe, decoding up to one GOP, scaling and one image encode.
THUMBNAIL_CPU_SECONDS = 0.5
# Bytes per pixel of a still: JPEG at ffmpeg's default quality ~0.25, PNG of a natural image ~1.5.
THUMBNAIL_BYTES_PER_PIXEL: dict[str, float] = {"jpeg": 0.25, "png": 1.5}

# --- batch inference -----------------------------------------------------------------------------------
# "One token is roughly 4 characters of English text" (OpenAI tokenizer guide); bytes count UTF-8.
APPROX_BYTES_PER_TOKEN = 4
# Chat templates wrap each message in role and separator tokens: OpenAI's token-counting cookbook counts 3,
# Llama 3's template about 5; take the larger.
MESSAGE_OVERHEAD_TOKENS = 5
# Every reply is primed with the assistant header (3 tokens in the OpenAI cookbook).
REPLY_PRIMING_TOKENS = 3
# Without the batch data, assume this many input tokens per request (a short prompt plus a system message).
DEFAULT_INPUT_TOKENS_PER_REQUEST = 512
# Throughput of a ~8B model. On one datacenter GPU, vLLM with continuous batching sustains thousands of
# output tokens/s in aggregate; prefill runs several times faster. Taken low so time is not under-priced.
GPU_PREFILL_TOKENS_PER_SECOND = 5000.0
GPU_DECODE_TOKENS_PER_SECOND = 1000.0
# vLLM's CPU backend on a few cores: tens of tokens/s decode for small models, prefill ~10x that.
CPU_PREFILL_TOKENS_PER_SECOND = 200.0
CPU_DECODE_TOKENS_PER_SECOND = 20.0
# Each line of an OpenAI batch output file wraps the completion in ids, status and usage (~600 bytes).
BATCH_OUTPUT_LINE_OVERHEAD_BYTES = 600
BATCH_URL = "/v1/chat/completions"


@dataclass(frozen=True, slots=True)
class WorkEstimate:
    """The work a job is expected to take, the quantities pricing multiplies by its rates."""

    cpu_seconds: float
    gpu_seconds: float
    output_mb: float
    input_tokens: int
    output_tokens: int
    basis: Basis

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class InputProbe:
    """What is known of the fetched input: ffprobe's duration and frame size for media, bytes for a batch.

    Every field is optional; an estimator uses what is there and falls back to the envelope otherwise.
    """

    duration_seconds: float | None = None
    width: int | None = None
    height: int | None = None
    data: bytes | None = None


class WorkEstimator(Protocol):
    """Estimates one kind of job. Raises :class:`RequestError` when the input itself is unusable."""

    def estimate(self, env: Envelope, probe: InputProbe | None) -> WorkEstimate: ...


def _bounded(
    limits: Limits,
    *,
    cpu_seconds: float,
    output_mb: float,
    basis: Basis,
    gpu_seconds: float = 0.0,
    input_tokens: int = 0,
    output_tokens: int = 0,
) -> WorkEstimate:
    """An estimate capped at what the limits let a run consume (timeout x resources, output cap)."""
    return WorkEstimate(
        cpu_seconds=min(cpu_seconds, limits.timeout_seconds * limits.cpus),
        gpu_seconds=min(gpu_seconds, float(limits.timeout_seconds * limits.gpus)),
        output_mb=min(output_mb, float(limits.max_output_mb)),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        basis=basis,
    )


def _limits_bound(limits: Limits) -> WorkEstimate:
    return WorkEstimate(
        cpu_seconds=limits.timeout_seconds * limits.cpus,
        gpu_seconds=float(limits.timeout_seconds * limits.gpus),
        output_mb=float(limits.max_output_mb),
        input_tokens=0,
        output_tokens=0,
        basis="limits",
    )


def _held_gpu_seconds(limits: Limits, cpu_seconds: float) -> float:
    # An ffmpeg job encodes on the CPU; a GPU it asked for is still held for the run's wall time.
    return cpu_seconds / limits.cpus * limits.gpus if limits.gpus else 0.0


class MediaEstimator:
    """Estimates ``ffmpeg_transcode`` jobs from the duration and frame sizes involved."""

    def estimate(self, env: Envelope, probe: InputProbe | None) -> WorkEstimate:
        if not isinstance(env, FfmpegTranscodeEnvelope):
            raise HearthError("estimator_mismatch", f"MediaEstimator cannot estimate a {env.kind} job")
        spec = env.output_spec
        limits = env.limits
        if isinstance(spec, ThumbnailsSpec):
            return self._thumbnails(spec, limits)
        duration, basis = self._duration(spec, probe)
        if duration is None:
            return _limits_bound(limits)
        if isinstance(spec, AudioSpec):
            cpu = duration * AUDIO_CPU_SECONDS_PER_SECOND
            output = spec.bitrate_kbps * 1000 / 8 * duration * CONTAINER_OVERHEAD_FACTOR / MIB
        else:
            cpu, output = self._video(spec, duration, probe)
        return _bounded(
            limits,
            cpu_seconds=cpu,
            gpu_seconds=_held_gpu_seconds(limits, cpu),
            output_mb=output,
            basis=basis,
        )

    @staticmethod
    def _duration(
        spec: Mp4Spec | HlsSpec | AudioSpec, probe: InputProbe | None
    ) -> tuple[float | None, Basis]:
        """Seconds of output: the clip within the probed input, else the clip, else the probed input."""
        probed = probe.duration_seconds if probe is not None else None
        clip = spec.clip
        if probed is not None:
            if clip is None:
                return probed, "ffprobe"
            return max(0.0, min(clip.duration_seconds, probed - clip.start_seconds)), "ffprobe"
        if clip is not None:
            return clip.duration_seconds, "clip"
        return None, "limits"

    @staticmethod
    def _video(spec: Mp4Spec | HlsSpec, duration: float, probe: InputProbe | None) -> tuple[float, float]:
        """CPU-seconds and MiB for the video outputs: one encode per rendition, one decode of the input."""
        if probe is not None and probe.width and probe.height:
            input_pixels = probe.width * probe.height
        else:
            input_pixels = DEFAULT_INPUT_PIXELS
        resolutions = spec.renditions if isinstance(spec, HlsSpec) else [spec.resolution]
        encode_ratio = sum(RESOLUTION_PIXELS[r] for r in resolutions) / REFERENCE_PIXELS
        per_second = (
            ENCODE_CPU_SECONDS_PER_SECOND_720P * encode_ratio
            + DECODE_CPU_SECONDS_PER_SECOND_720P * input_pixels / REFERENCE_PIXELS
        )
        if isinstance(spec, HlsSpec):
            per_second *= HLS_OVERHEAD_FACTOR
        audio_kbps = 0 if spec.audio_codec == "none" else AUDIO_KBPS_DEFAULT
        kbps = sum(VIDEO_KBPS[r] + audio_kbps for r in resolutions)
        output_mb = kbps * 1000 / 8 * duration * CONTAINER_OVERHEAD_FACTOR / MIB
        return duration * per_second, output_mb

    @staticmethod
    def _thumbnails(spec: ThumbnailsSpec, limits: Limits) -> WorkEstimate:
        count = len(spec.timestamps)
        cpu = count * THUMBNAIL_CPU_SECONDS
        bytes_each = RESOLUTION_PIXELS[spec.resolution] * THUMBNAIL_BYTES_PER_PIXEL[spec.image_format]
        return _bounded(
            limits,
            cpu_seconds=cpu,
            gpu_seconds=_held_gpu_seconds(limits, cpu),
            output_mb=count * bytes_each / MIB,
            basis="timestamps",
        )


class TokenCounter(Protocol):
    """Counts the tokens of a piece of text for one model's tokenizer."""

    def count(self, text: str) -> int: ...


class ApproxTokenCounter:
    """An estimate of token counts: UTF-8 bytes / 4, rounded up.

    Used until the model catalog supplies each model's own tokenizer. English prose tokenizes at about
    four bytes per token in BPE vocabularies; code and non-Latin scripts run denser, so treat the count as
    an estimate, not a bound.
    """

    def count(self, text: str) -> int:
        return math.ceil(len(text.encode("utf-8")) / APPROX_BYTES_PER_TOKEN)


@dataclass(frozen=True, slots=True)
class _BatchTotals:
    requests: int
    input_tokens: int
    output_tokens: int


class BatchEstimator:
    """Estimates ``vllm_batch`` jobs by counting the tokens of the OpenAI batch JSONL when it is at hand."""

    def __init__(self, counter: TokenCounter | None = None) -> None:
        self._counter: TokenCounter = counter or ApproxTokenCounter()

    def estimate(self, env: Envelope, probe: InputProbe | None) -> WorkEstimate:
        if not isinstance(env, VllmBatchEnvelope):
            raise HearthError("estimator_mismatch", f"BatchEstimator cannot estimate a {env.kind} job")
        spec = env.output_spec
        if probe is not None and probe.data is not None:
            totals = self._count(env, probe.data)
            basis: Basis = "token_count"
        else:
            totals = _BatchTotals(
                requests=spec.max_requests,
                input_tokens=spec.max_requests * DEFAULT_INPUT_TOKENS_PER_REQUEST,
                output_tokens=spec.max_requests * spec.max_tokens,
            )
            basis = "spec"
        limits = env.limits
        if limits.gpus > 0:
            wall = (
                totals.input_tokens / GPU_PREFILL_TOKENS_PER_SECOND
                + totals.output_tokens / GPU_DECODE_TOKENS_PER_SECOND
            )
        else:
            wall = (
                totals.input_tokens / CPU_PREFILL_TOKENS_PER_SECOND
                + totals.output_tokens / CPU_DECODE_TOKENS_PER_SECOND
            )
        output_bytes = (
            totals.output_tokens * APPROX_BYTES_PER_TOKEN + totals.requests * BATCH_OUTPUT_LINE_OVERHEAD_BYTES
        )
        return _bounded(
            limits,
            cpu_seconds=wall * limits.cpus,
            gpu_seconds=wall * limits.gpus,
            output_mb=output_bytes / MIB,
            basis=basis,
            input_tokens=totals.input_tokens,
            output_tokens=totals.output_tokens,
        )

    def _count(self, env: VllmBatchEnvelope, data: bytes) -> _BatchTotals:
        """Validate the batch JSONL line by line and total its input and output tokens.

        Raises ``RequestError("invalid_batch", 422)`` naming the first bad line (1-based) and why.
        """
        spec = env.output_spec
        seen: set[str] = set()
        requests = input_tokens = output_tokens = 0
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            requests += 1
            if requests > spec.max_requests:
                raise _bad_line(number, f"the batch has more than max_requests ({spec.max_requests}) lines")
            body = _parse_line(number, raw, seen, spec.model)
            input_tokens += self._prompt_tokens(number, body["messages"])
            output_tokens += min(_line_max_tokens(number, body) or spec.max_tokens, spec.max_tokens)
        if requests == 0:
            raise _bad_line(1, "the batch has no requests")
        return _BatchTotals(requests, input_tokens, output_tokens)

    def _prompt_tokens(self, number: int, messages: Any) -> int:
        if not isinstance(messages, list) or not messages:
            raise _bad_line(number, "body.messages must be a non-empty list")
        tokens = REPLY_PRIMING_TOKENS
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise _bad_line(number, "each message must be an object with a string role")
            tokens += MESSAGE_OVERHEAD_TOKENS + self._counter.count(_message_text(number, message))
        return tokens


def _bad_line(number: int, reason: str) -> RequestError:
    return RequestError(
        "invalid_batch",
        f"batch line {number}: {reason}",
        details={"line": number, "reason": reason},
        http_status=422,
    )


def _parse_line(number: int, raw: bytes, seen: set[str], model: str) -> dict[str, Any]:
    """One OpenAI batch request line, checked; returns its body."""
    try:
        line = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad_line(number, f"not valid JSON ({exc})") from None
    if not isinstance(line, dict):
        raise _bad_line(number, "a line must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _bad_line(number, "custom_id must be a non-empty string")
    if custom_id in seen:
        raise _bad_line(number, f"custom_id {custom_id!r} is repeated")
    seen.add(custom_id)
    if line.get("method") != "POST":
        raise _bad_line(number, 'method must be "POST"')
    if line.get("url") != BATCH_URL:
        raise _bad_line(number, f'url must be "{BATCH_URL}"')
    body = line.get("body")
    if not isinstance(body, dict):
        raise _bad_line(number, "body must be an object")
    if body.get("model") != model:
        raise _bad_line(number, f"body.model must be the envelope's model {model!r}")
    return body


def _line_max_tokens(number: int, body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad_line(number, "max_tokens must be a positive integer")
    return value


def _message_text(number: int, message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise _bad_line(number, "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad_line(number, "message content must be a string or a list of text parts")


_ESTIMATORS: dict[str, WorkEstimator] = {
    "ffmpeg_transcode": MediaEstimator(),
    "vllm_batch": BatchEstimator(),
}


def estimator_for(kind: str) -> WorkEstimator:
    """The estimator for a job kind; ``RequestError("unknown_kind", 422)`` for a kind the node lacks."""
    try:
        return _ESTIMATORS[kind]
    except KeyError:
        raise RequestError(
            "unknown_kind",
            f"no estimator for job kind {kind!r}",
            details={"kind": kind, "known": sorted(_ESTIMATORS)},
            http_status=422,
        ) from None
