"""The job envelope of docs/protocol.md: strict models, canonical (JCS) hashing and the idempotency key.

Every model forbids unknown fields and coerces nothing: a requester (often an agent) learns at once and
precisely what is wrong with an envelope, instead of the node guessing. Kinds form a closed, versioned set;
an ffmpeg job names a typed preset whose parameters the node later compiles to an argument list.
"""

from __future__ import annotations

import base64
import hashlib
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
import rfc8785
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import RequestError

ENVELOPE_VERSION: Literal[1] = 1
MAX_MEDIA_SECONDS = 86_400  # every time in a media envelope (clip, thumbnails, durations) lies within a day
JOB_KINDS = ("ffmpeg_transcode", "vllm_batch")

JobId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
EthAddress = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$")]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# Where the node POSTs the job's status changes (signed, at least once); no credentials in the URL.
CallbackUrl = Annotated[str, Field(pattern=r"^https?://[A-Za-z0-9.\-\[\]:]+(/[^\s#]*)?$", max_length=2048)]
Did = Annotated[str, Field(pattern=r"^did:[a-z0-9]+:[A-Za-z0-9._:%-]+$", max_length=512)]
# USDC has 6 decimals; a price is a plain decimal string so no float ever touches money.
PriceStr = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?$")]
Resolution = Literal["360p", "480p", "720p", "1080p"]
InputUri = Annotated[
    str,
    Field(
        pattern=r"^(ipfs://[A-Za-z0-9]{8,128}(/[A-Za-z0-9._-]+)*|https://[^\s]{1,2000}|b[a-z2-7]{20,128})$",
        max_length=2048,
    ),
]


class _Strict(BaseModel):
    # allow_inf_nan=False: no float field ever holds infinity or NaN, which JCS cannot write
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Clip(_Strict):
    """Cut ``duration_seconds`` starting at ``start_seconds`` of the input."""

    start_seconds: float = Field(ge=0, le=MAX_MEDIA_SECONDS)
    duration_seconds: float = Field(gt=0, le=MAX_MEDIA_SECONDS)


class Mp4Spec(_Strict):
    """Transcode to an H.264/AAC MP4 at one resolution, optionally clipped."""

    format: Literal["mp4"]
    resolution: Resolution = "720p"
    codec: Literal["h264"] = "h264"
    audio_codec: Literal["aac", "none"] = "aac"
    clip: Clip | None = None


class HlsSpec(_Strict):
    """HLS renditions (one per resolution) with fixed-length segments."""

    format: Literal["hls"]
    renditions: list[Resolution] = Field(min_length=1, max_length=4)
    segment_seconds: int = Field(default=4, ge=2, le=10)
    codec: Literal["h264"] = "h264"
    audio_codec: Literal["aac", "none"] = "aac"
    clip: Clip | None = None

    @field_validator("renditions")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("renditions must be distinct")
        return v


class ThumbnailsSpec(_Strict):
    """Still images at the given timestamps."""

    format: Literal["thumbnails"]
    timestamps: list[float] = Field(min_length=1, max_length=50)
    image_format: Literal["jpeg", "png"] = "jpeg"
    resolution: Resolution = "360p"

    @field_validator("timestamps")
    @classmethod
    def _non_negative(cls, v: list[float]) -> list[float]:
        if any(not 0 <= t <= MAX_MEDIA_SECONDS for t in v):
            raise ValueError(f"timestamps must lie in [0, {MAX_MEDIA_SECONDS}] seconds")
        return v


class AudioSpec(_Strict):
    """Extract the audio track, optionally clipped."""

    format: Literal["audio"]
    audio_codec: Literal["aac", "mp3", "flac"] = "aac"
    bitrate_kbps: int = Field(default=128, ge=32, le=320)
    clip: Clip | None = None


FfmpegSpec = Annotated[Mp4Spec | HlsSpec | ThumbnailsSpec | AudioSpec, Field(discriminator="format")]


class VllmBatchSpec(_Strict):
    """An OpenAI batch (chat completions JSONL) run against a model from the node's catalog."""

    format: Literal["openai_batch_jsonl"] = "openai_batch_jsonl"
    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
    max_tokens: int = Field(default=256, ge=1, le=32_768)
    max_requests: int = Field(default=1000, ge=1, le=100_000)


class Limits(_Strict):
    """Hard bounds on one run; the sandbox enforces them and pricing reserves capacity for them."""

    timeout_seconds: int = Field(default=900, ge=1, le=86_400)
    max_output_mb: int = Field(default=700, ge=1, le=100_000)
    cpus: float = Field(default=1.0, gt=0, le=256)
    memory_mb: int = Field(default=2048, ge=64, le=2_000_000)
    gpus: int = Field(default=0, ge=0, le=16)


class Validation(_Strict):
    """What the validator will check of the result; the node runs the same checks before reporting."""

    min_duration_seconds: float | None = Field(default=None, ge=0, le=MAX_MEDIA_SECONDS)
    max_duration_seconds: float | None = Field(default=None, gt=0, le=MAX_MEDIA_SECONDS)
    required_streams: list[Literal["video", "audio"]] = Field(default_factory=list, max_length=2)
    all_answered: bool = True
    # A validator service (``hearth validator run``) the node notifies once the job is completed; it then
    # validates the result and posts the receipt with no person in the loop.
    validator_url: CallbackUrl | None = None


class Payment(_Strict):
    """Terms of payment: the most the requester will pay, and where the escrow lives."""

    max_price: PriceStr
    currency: Literal["usdc"] = "usdc"
    chain_id: int = Field(ge=1, le=2**53)
    escrow: EthAddress
    payer: EthAddress
    validator: Did

    @property
    def max_price_decimal(self) -> Decimal:
        return Decimal(self.max_price)


class _EnvelopeBase(_Strict):
    version: Literal[1] = ENVELOPE_VERSION
    job_id: JobId
    input_uri: InputUri
    input_sha256: Sha256Hex | None = None
    limits: Limits = Field(default_factory=Limits)
    validation: Validation = Field(default_factory=Validation)
    payment: Payment
    callback_url: CallbackUrl | None = None

    @model_validator(mode="after")
    def _https_needs_sha(self) -> _EnvelopeBase:
        if self.input_uri.startswith("https://") and self.input_sha256 is None:
            raise ValueError("an https:// input_uri needs input_sha256")
        return self


class FfmpegTranscodeEnvelope(_EnvelopeBase):
    kind: Literal["ffmpeg_transcode"]
    output_spec: FfmpegSpec


class VllmBatchEnvelope(_EnvelopeBase):
    kind: Literal["vllm_batch"]
    output_spec: VllmBatchSpec


Envelope = Annotated[FfmpegTranscodeEnvelope | VllmBatchEnvelope, Field(discriminator="kind")]


class _EnvelopeDoc(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    job: Envelope


def _problem(err: Any) -> dict[str, str]:
    loc = [str(p) for p in err["loc"][1:]]
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        # the discriminator itself is at fault (e.g. an unknown kind): point at it
        loc.append(str(err.get("ctx", {}).get("discriminator", "")).strip("'"))
    return {"loc": ".".join(loc), "msg": err["msg"], "type": err["type"]}


def parse_envelope(data: Any) -> FfmpegTranscodeEnvelope | VllmBatchEnvelope:
    """Validate ``data`` (decoded JSON) as an envelope or raise ``RequestError('invalid_envelope')``.

    The error's details list each problem as ``{"loc", "msg", "type"}`` so an agent can fix the field.
    """
    try:
        return _EnvelopeDoc.model_validate({"job": data}).job
    except ValidationError as exc:
        problems = [_problem(err) for err in exc.errors(include_url=False, include_input=False)]
        raise RequestError(
            "invalid_envelope",
            f"the job envelope is invalid ({len(problems)} problem(s))",
            details={"problems": problems},
        ) from None


_MAX_SAFE_INT = 2**53 - 1


def _plain(obj: Any) -> Any:
    """``obj`` rewritten so that sorted-key compact JSON of it is its exact JCS form, or ``_NOT_PLAIN``.

    That holds for ASCII keys (code-point order = UTF-16 order), integers within IEEE-754 range, and
    floats whose shortest repr Python and ECMAScript both write in plain decimal notation (1e-4 <= |x| <
    1e16; integral ones become ints, as JCS writes them). Anything else takes the full RFC 8785 path.
    """
    if isinstance(obj, str) or obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return obj if -_MAX_SAFE_INT <= obj <= _MAX_SAFE_INT else _NOT_PLAIN
    if isinstance(obj, float):
        if obj.is_integer():
            return int(obj) if abs(obj) <= _MAX_SAFE_INT else _NOT_PLAIN
        return obj if 1e-4 <= abs(obj) < 1e16 else _NOT_PLAIN
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if not isinstance(key, str) or not key.isascii():
                return _NOT_PLAIN
            v = _plain(value)
            if v is _NOT_PLAIN:
                return _NOT_PLAIN
            out[key] = v
        return out
    if isinstance(obj, list | tuple):
        items = [_plain(v) for v in obj]
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


_NOT_PLAIN = object()


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 (JCS) canonical bytes of a JSON value.

    Envelopes take a fast path through the C JSON encoder where its output is provably identical to
    JCS (see :func:`_plain`); everything else goes through the ``rfc8785`` reference implementation.
    A property test checks the two agree.
    """
    plain = _plain(obj)
    if plain is _NOT_PLAIN:
        return rfc8785.dumps(obj)
    return _dumps_plain(plain)


def _dumps_plain(plain: Any) -> bytes:
    """JCS bytes of a value :func:`_plain` returned (orjson writes such values exactly as JCS does).

    A string holding a lone surrogate (JSON allows ``"\\ud800"``) is not Unicode text and has no JCS form:
    ``ValueError``, as from the reference implementation.
    """
    try:
        return orjson.dumps(plain, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise ValueError(f"not canonicalizable as JSON: {exc}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def envelope_dict(env: FfmpegTranscodeEnvelope | VllmBatchEnvelope) -> dict[str, Any]:
    """The envelope as plain JSON data with defaults filled in: what the node hashes and records."""
    return env.model_dump(mode="json")


def envelope_hash(env: FfmpegTranscodeEnvelope | VllmBatchEnvelope | dict[str, Any]) -> str:
    """``sha256(JCS(envelope))`` as hex (docs/protocol.md); takes the model or its :func:`envelope_dict`."""
    doc = env if isinstance(env, dict) else envelope_dict(env)
    return sha256_hex(canonical_json(doc))


def idempotency_key(iss: str, env: FfmpegTranscodeEnvelope | VllmBatchEnvelope | dict[str, Any]) -> str:
    """``sha256(JCS({iss, job_id, kind, input, output_spec}))``: same submission, same job
    (docs/protocol.md)."""
    d = env if isinstance(env, dict) else envelope_dict(env)
    return sha256_hex(canonical_json(_idempotency_doc(iss, d)))


def _idempotency_doc(iss: str, d: dict[str, Any]) -> dict[str, Any]:
    return {
        "iss": iss,
        "job_id": d["job_id"],
        "kind": d["kind"],
        "input": {"uri": d["input_uri"], "sha256": d["input_sha256"]},
        "output_spec": d["output_spec"],
    }


def envelope_digests(iss: str, doc: dict[str, Any]) -> tuple[str, str]:
    """``(envelope_hash(doc), idempotency_key(iss, doc))`` of an :func:`envelope_dict`, walking it once."""
    plain = _plain(doc)
    if plain is _NOT_PLAIN:
        return envelope_hash(doc), idempotency_key(iss, doc)
    return sha256_hex(_dumps_plain(plain)), sha256_hex(_dumps_plain(_idempotency_doc(iss, plain)))


def node_job_id(iss: str, job_id: str) -> str:
    """The node's id for a job: stable for (requester DID, job_id), so any retry maps to the same job.

    ``hj_`` + 26 base32 characters of ``sha256(iss "\\n" job_id)``; a requester can compute it itself.
    """
    digest = hashlib.sha256(f"{iss}\n{job_id}".encode()).digest()
    # 20 bytes are four whole base32 groups: the same first 26 characters, a third of the work
    return "hj_" + base64.b32encode(digest[:20]).decode("ascii").lower()[:26]
