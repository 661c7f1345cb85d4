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
so the price built on it is a safe upper bound of the charge, as a quote must be (the README's Bidding).

The constants below are rules of thumb, named so they can be tuned once ``bench/`` measures this
machine; the comment on each says where it comes from.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from core.envelope import (
    AudioSpec,
    FfmpegTranscodeEnvelope,
    HlsSpec,
    Limits,
    Mp4Spec,
    ThumbnailsSpec,
    VllmBatchEnvelope,
)
from core.errors import HearthError, RequestError
from sandbox.vllm import parse_batch

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
# Without the batch data, assume this many input tokens per request (a short prompt plus a system message).
DEFAULT_INPUT_TOKENS_PER_REQUEST = 512
# Each line of an OpenAI batch output file wraps the completion in ids, status and usage (~600 bytes).
BATCH_OUTPUT_LINE_OVERHEAD_BYTES = 600


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


class BatchModels(Protocol):
    """What batch estimation needs of the model catalog (:class:`provider.catalog.ModelCatalog`)."""

    def context_of(self, model: str) -> int:
        """The model's context length in tokens; raises ``RequestError("unknown_model")`` if unknown."""
        ...

    def prompt_tokens(self, model: str, messages: Sequence[Mapping[str, str]]) -> int:
        """Exact prompt tokens of ``messages`` under the model's chat template."""
        ...


class BatchEstimator:
    """Estimates ``vllm_batch`` jobs: tokens in and out, counted with the model's tokenizer when possible.

    Inference is priced per token (the catalog's per-model rates), so compute time is not estimated. With
    the batch at hand every line is checked and measured (:func:`sandbox.vllm.parse_batch`): its exact
    prompt tokens, and its ``max_tokens`` as the most it may generate. Without it, the envelope bounds the
    batch: ``max_requests`` lines, each of ``max_tokens`` out and an assumed prompt that fits the context.
    """

    def __init__(self, models: BatchModels) -> None:
        self._models = models

    def estimate(self, env: Envelope, probe: InputProbe | None) -> WorkEstimate:
        if not isinstance(env, VllmBatchEnvelope):
            raise HearthError("estimator_mismatch", f"BatchEstimator cannot estimate a {env.kind} job")
        spec = env.output_spec
        context = self._models.context_of(spec.model)
        if probe is not None and probe.data is not None:
            batch = parse_batch(
                probe.data,
                model=spec.model,
                max_requests=spec.max_requests,
                max_tokens=spec.max_tokens,
                max_context=context,
                prompt_tokens=functools.partial(self._models.prompt_tokens, spec.model),
            )
            requests, input_tokens = len(batch.requests), batch.prompt_tokens
            output_tokens = batch.max_completion_tokens
            basis: Basis = "token_count"
        else:
            requests = spec.max_requests
            prompt = max(1, min(DEFAULT_INPUT_TOKENS_PER_REQUEST, context - spec.max_tokens))
            input_tokens, output_tokens, basis = requests * prompt, requests * spec.max_tokens, "spec"
        output_bytes = output_tokens * APPROX_BYTES_PER_TOKEN + requests * BATCH_OUTPUT_LINE_OVERHEAD_BYTES
        return WorkEstimate(
            cpu_seconds=0.0,
            gpu_seconds=0.0,
            output_mb=min(output_bytes / MIB, float(env.limits.max_output_mb)),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            basis=basis,
        )


MEDIA_ESTIMATOR = MediaEstimator()


def estimator_for(kind: str, models: BatchModels | None = None) -> WorkEstimator:
    """The estimator for a job kind; ``RequestError("unknown_kind", 422)`` for a kind the node lacks.

    ``models`` is the node's model catalog; without one, no batch can be estimated (every model is unknown).
    """
    if kind == "ffmpeg_transcode":
        return MEDIA_ESTIMATOR
    if kind == "vllm_batch":
        return BatchEstimator(models if models is not None else _NO_MODELS)
    raise RequestError(
        "unknown_kind",
        f"no estimator for job kind {kind!r}",
        details={"kind": kind, "known": ["ffmpeg_transcode", "vllm_batch"]},
    )


class _NoModels:
    """The catalog of a node that declares no models: every name is unknown."""

    def context_of(self, model: str) -> int:
        raise RequestError(
            "unknown_model",
            f"this node serves no model called {model!r}",
            details={"model": model, "known": []},
        )

    def prompt_tokens(self, model: str, messages: Sequence[Mapping[str, str]]) -> int:
        return self.context_of(model)


_NO_MODELS = _NoModels()
