"""Safe probing of untrusted media: the ffprobe argv, and the parse that refuses what the node won't touch.

The argv pins ffprobe to the ``file`` protocol and an allow list of demuxers, so a playlist (HLS, concat,
ffconcat) can never make it open another path or URL. :func:`parse_probe` then refuses anything outside
the node's caps. Refusals name numbers and ffmpeg's own format/codec identifiers only: tags, titles and
every other byte that came from the file stay out of messages and details.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final, Literal, cast

from core.errors import ExecutionError, HearthError, RequestError
from sandbox._media_common import (
    DEFAULT_PROBE_TIMEOUT_SECONDS,
    FFPROBE,
    MAX_PROBE_OUTPUT_BYTES,
    ToolTimeout,
    bad_input,
    run_tool,
)

# Containers a requester may send. Each entry is the first name of an ffmpeg demuxer, the one `-f` takes.
# Playlist and indirection demuxers (hls, dash, concat, ffconcat, image2 patterns, tee, data URIs) are
# deliberately absent: they open further paths.
INPUT_DEMUXERS: Final[tuple[str, ...]] = (
    "mov",
    "matroska",
    "avi",
    "mpegts",
    "mpeg",
    "flv",
    "ogg",
    "wav",
    "mp3",
    "flac",
    "aac",
)
# Still-image demuxers, used only to probe the node's own thumbnail outputs.
IMAGE_DEMUXERS: Final[tuple[str, ...]] = ("image2", "jpeg_pipe", "png_pipe")

# Codec -> the decoders ffmpeg may pick for it (the names `-codec_whitelist` matches). Streams in other
# codecs are unusable; fewer decoders reachable from hostile bytes is less attack surface.
VIDEO_DECODERS: Final[Mapping[str, tuple[str, ...]]] = {
    "h264": ("h264",),
    "hevc": ("hevc",),
    "vp8": ("vp8",),
    "vp9": ("vp9",),
    "av1": ("libdav1d", "libaom-av1", "av1"),
    "mpeg4": ("mpeg4",),
    "mpeg2video": ("mpeg2video",),
    "mpeg1video": ("mpeg1video",),
    "mjpeg": ("mjpeg",),
    "png": ("png",),
    "prores": ("prores",),
    "theora": ("theora",),
    "rawvideo": ("rawvideo",),
}
AUDIO_DECODERS: Final[Mapping[str, tuple[str, ...]]] = {
    "aac": ("aac", "aac_fixed"),
    "mp3": ("mp3float", "mp3"),
    "mp2": ("mp2float", "mp2"),
    "opus": ("opus", "libopus"),
    "vorbis": ("vorbis", "libvorbis"),
    "flac": ("flac",),
    "alac": ("alac",),
    "ac3": ("ac3", "ac3_fixed"),
    "eac3": ("eac3",),
    "pcm_s16le": ("pcm_s16le",),
    "pcm_s16be": ("pcm_s16be",),
    "pcm_s24le": ("pcm_s24le",),
    "pcm_f32le": ("pcm_f32le",),
}

DEFAULT_MAX_WIDTH: Final = 8192
DEFAULT_MAX_HEIGHT: Final = 8192
DEFAULT_MAX_PIXELS: Final = 8192 * 4320  # 8K UHD
DEFAULT_MAX_DURATION_SECONDS: Final = 6 * 3600.0
DEFAULT_MAX_STREAMS: Final = 32

StreamKind = Literal["video", "audio", "subtitle", "data", "attachment", "unknown"]
_KINDS: Final[frozenset[str]] = frozenset({"video", "audio", "subtitle", "data", "attachment"})
# ffprobe prints the refusing demuxer as "[hls @ 0x55...] Format not on whitelist '...'".
_NOT_ALLOWED = re.compile(rb"^\[([a-z0-9_]{1,32}) @ 0x[0-9a-f]+\] Format not on whitelist", re.MULTILINE)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeLimits:
    """Caps an input must fit before any work is planned; a refusal names the cap it broke."""

    max_width: int = DEFAULT_MAX_WIDTH
    max_height: int = DEFAULT_MAX_HEIGHT
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_duration_seconds: float = DEFAULT_MAX_DURATION_SECONDS
    max_streams: int = DEFAULT_MAX_STREAMS


DEFAULT_PROBE_LIMITS: Final = ProbeLimits()


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamInfo:
    """One stream as ffprobe saw it, reduced to what planning and validation use."""

    index: int
    kind: StreamKind
    codec: str | None
    width: int | None = None
    height: int | None = None
    frame_rate: Fraction | None = None
    sample_aspect: Fraction = Fraction(1)
    rotation: int = 0
    sample_rate: int | None = None
    channels: int | None = None
    duration_seconds: float | None = None
    attached_pic: bool = False

    @property
    def display_size(self) -> tuple[int, int] | None:
        """Width and height as shown: sample aspect applied, then rotation (ffmpeg autorotates)."""
        if not self.width or not self.height:
            return None
        w = max(1, round(self.width * self.sample_aspect))
        return (self.height, w) if self.rotation in (90, 270) else (w, self.height)


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaInfo:
    """A probed media file: its demuxer, duration and streams, with the streams a job would use."""

    demuxer: str
    duration_seconds: float | None
    size_bytes: int | None
    streams: tuple[StreamInfo, ...]
    video: StreamInfo | None
    audio: StreamInfo | None

    @property
    def width(self) -> int | None:
        return self.video.width if self.video else None

    @property
    def height(self) -> int | None:
        return self.video.height if self.video else None

    @property
    def video_codec(self) -> str | None:
        return self.video.codec if self.video else None

    @property
    def fps(self) -> float | None:
        return float(self.video.frame_rate) if self.video and self.video.frame_rate else None

    @property
    def audio_codec(self) -> str | None:
        return self.audio.codec if self.audio else None

    @property
    def channels(self) -> int | None:
        return self.audio.channels if self.audio else None

    @property
    def sample_rate(self) -> int | None:
        return self.audio.sample_rate if self.audio else None

    def kinds(self) -> tuple[StreamKind, ...]:
        """The kinds of every stream, in file order (attached pictures excluded: they are not video)."""
        return tuple(s.kind for s in self.streams if not s.attached_pic)


def probe_argv(path: str, *, allowed_formats: Sequence[str] = INPUT_DEMUXERS) -> list[str]:
    """The ffprobe argv for ``path`` (absolute): JSON out, ``file`` protocol only, allow-listed demuxers."""
    _require_absolute(path)
    return [
        FFPROBE,
        "-v",
        "error",
        "-hide_banner",
        "-protocol_whitelist",
        "file",
        "-format_whitelist",
        ",".join(allowed_formats),
        "-print_format",
        "json",
        "-show_format",
        "-show_streams",
        # The explicit scheme keeps a name such as "concat:a|b" or "subfile,..." from choosing a protocol.
        "file:" + path,
    ]


def parse_probe(
    json_text: str | bytes,
    *,
    limits: ProbeLimits = DEFAULT_PROBE_LIMITS,
    allowed_formats: Sequence[str] = INPUT_DEMUXERS,
) -> MediaInfo:
    """Read ffprobe's JSON into :class:`MediaInfo`, or refuse the file with a ``RequestError``.

    Refused (domain ``validation``, never retryable): not media (``input_not_media``), a demuxer off the
    allow list (``input_format_not_allowed``), too many streams, a video stream above the size caps
    (``input_dimensions_too_large``), an unknown or too long duration, no usable stream.
    """
    if len(json_text) > MAX_PROBE_OUTPUT_BYTES:
        raise bad_input("input_not_media", "the input's metadata is too large to be media the node accepts")
    try:
        doc = json.loads(json_text)
    except ValueError:
        raise ExecutionError("probe_output_invalid", "ffprobe did not print JSON") from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    raw_streams = doc.get("streams") if isinstance(doc, dict) else None
    if not isinstance(fmt, dict) or not isinstance(raw_streams, list) or not raw_streams:
        raise bad_input("input_not_media", "the input is not a media file the node can read")
    demuxer = str(fmt.get("format_name", "")).split(",")[0]
    if demuxer not in allowed_formats:
        raise _format_refused(
            demuxer if re.fullmatch(r"[a-z0-9_]{1,32}", demuxer) else "unknown", allowed_formats
        )
    if len(raw_streams) > limits.max_streams:
        raise bad_input(
            "input_too_many_streams",
            f"the input has {len(raw_streams)} streams; at most {limits.max_streams} are accepted",
            streams=len(raw_streams),
            max_streams=limits.max_streams,
        )
    streams = tuple(_stream(s) for s in raw_streams if isinstance(s, dict))
    for s in streams:
        _check_size(s, limits)
    duration = _positive(fmt.get("duration"))
    if duration is None:
        duration = max((s.duration_seconds for s in streams if s.duration_seconds), default=None)
    if duration is None and demuxer not in IMAGE_DEMUXERS:
        raise bad_input("input_duration_unknown", "the input's duration cannot be determined")
    if duration is not None and duration > limits.max_duration_seconds:
        raise bad_input(
            "input_too_long",
            f"the input lasts {duration:.1f} s; at most {limits.max_duration_seconds:.0f} s are accepted",
            duration_seconds=duration,
            max_duration_seconds=limits.max_duration_seconds,
        )
    video = next((s for s in streams if _usable_video(s)), None)
    audio = next((s for s in streams if _usable_audio(s)), None)
    if video is None and audio is None:
        raise bad_input(
            "input_no_usable_stream",
            "the input has no video or audio stream in a codec the node decodes",
            streams=[{"index": s.index, "kind": s.kind, "codec": s.codec} for s in streams],
        )
    return MediaInfo(
        demuxer=demuxer,
        duration_seconds=duration,
        size_bytes=_int(fmt.get("size")),
        streams=streams,
        video=video,
        audio=audio,
    )


def probe_file(
    path: str,
    *,
    limits: ProbeLimits = DEFAULT_PROBE_LIMITS,
    allowed_formats: Sequence[str] = INPUT_DEMUXERS,
    timeout_seconds: float = DEFAULT_PROBE_TIMEOUT_SECONDS,
) -> MediaInfo:
    """Run host ffprobe on ``path`` and :func:`parse_probe` the result (refusals as there).

    ffprobe's stderr is read only for the fixed "not on whitelist" notice; it is never passed on, since
    a demuxer's complaint may quote the file.
    """
    try:
        result = run_tool(probe_argv(path, allowed_formats=allowed_formats), timeout_seconds=timeout_seconds)
    except ToolTimeout:
        raise bad_input(
            "input_probe_timeout",
            f"probing the input took longer than {timeout_seconds:.0f} s",
            timeout_seconds=timeout_seconds,
        ) from None
    if result.returncode != 0:
        raise probe_refusal(result.stderr, allowed_formats=allowed_formats)
    return parse_probe(result.stdout, limits=limits, allowed_formats=allowed_formats)


def probe_refusal(stderr: bytes, *, allowed_formats: Sequence[str] = INPUT_DEMUXERS) -> RequestError:
    """The refusal for a probe that failed, wherever ffprobe ran (host or sandbox).

    ``stderr`` is read only for the fixed "not on whitelist" notice; it is never passed on.
    """
    refused = _NOT_ALLOWED.search(stderr)
    if refused:
        return _format_refused(refused.group(1).decode(), allowed_formats)
    return bad_input("input_not_media", "the input is not a media file the node can read")


def sandboxed_probe_refusal(
    error: ExecutionError, *, allowed_formats: Sequence[str] = INPUT_DEMUXERS
) -> HearthError:
    """What a probe that failed in its sandbox means: a refusal of the input, or the node's own failure.

    ffprobe reads headers and decodes a frame or two. An input that makes it exit with an error, outgrow
    the probe's memory, outlast its time or flood its output is hostile or absurd: the requester's fault,
    refused in ``validation`` (422, never retryable) as a host probe would refuse it. Anything else (the
    engine down, the image missing) is the node's and comes back unchanged.
    """
    details = error.details
    if error.code == "nonzero_exit":
        return probe_refusal(str(details.get("stderr_tail", "")).encode(), allowed_formats=allowed_formats)
    if error.code == "oom_killed":
        return bad_input(
            "input_probe_memory",
            f"probing the input needed more than the probe's {details.get('memory_mb')} MB of memory",
            memory_mb=details.get("memory_mb"),
        )
    if error.code == "timeout":
        return bad_input(
            "input_probe_timeout",
            f"probing the input took longer than {details.get('timeout_seconds')} s",
            timeout_seconds=details.get("timeout_seconds"),
        )
    if error.code == "output_cap_exceeded":
        return bad_input("input_not_media", "the input's metadata is too large to be media the node accepts")
    return error


def decoders_for(info: MediaInfo, streams: Sequence[StreamInfo]) -> tuple[str, ...]:
    """The decoder names ``streams`` of ``info`` need: the value of ``-codec_whitelist`` for a run."""
    names: list[str] = []
    for s in streams:
        table = VIDEO_DECODERS if s.kind == "video" else AUDIO_DECODERS
        names.extend(n for n in table.get(s.codec or "", ()) if n not in names)
    return tuple(names)


def _require_absolute(path: str) -> None:
    if not path.startswith("/"):
        raise ValueError(f"media paths must be absolute, got {path!r}")


def _format_refused(name: str, allowed: Sequence[str]) -> RequestError:
    return bad_input(
        "input_format_not_allowed",
        f"the input's container ({name}) is not one the node accepts",
        format=name,
        allowed=list(allowed),
    )


def _check_size(s: StreamInfo, limits: ProbeLimits) -> None:
    if s.kind != "video" or not s.width or not s.height:
        return
    if s.width > limits.max_width or s.height > limits.max_height or s.width * s.height > limits.max_pixels:
        raise bad_input(
            "input_dimensions_too_large",
            f"the input's video is {s.width}x{s.height}; at most {limits.max_width}x{limits.max_height} "
            f"and {limits.max_pixels} pixels are accepted",
            width=s.width,
            height=s.height,
            max_width=limits.max_width,
            max_height=limits.max_height,
            max_pixels=limits.max_pixels,
        )


def _usable_video(s: StreamInfo) -> bool:
    return (
        s.kind == "video" and not s.attached_pic and s.codec in VIDEO_DECODERS and s.display_size is not None
    )


def _usable_audio(s: StreamInfo) -> bool:
    return s.kind == "audio" and s.codec in AUDIO_DECODERS and bool(s.channels) and bool(s.sample_rate)


def _stream(raw: Mapping[str, Any]) -> StreamInfo:
    kind = raw.get("codec_type")
    disposition = raw.get("disposition")
    codec = raw.get("codec_name")
    return StreamInfo(
        index=_int(raw.get("index")) or 0,
        kind=cast(StreamKind, kind) if isinstance(kind, str) and kind in _KINDS else "unknown",
        codec=codec if isinstance(codec, str) and re.fullmatch(r"[a-z0-9_]{1,32}", codec) else None,
        width=_int(raw.get("width")),
        height=_int(raw.get("height")),
        frame_rate=_rate(raw.get("avg_frame_rate")) or _rate(raw.get("r_frame_rate")),
        sample_aspect=_rate(str(raw.get("sample_aspect_ratio", "")).replace(":", "/")) or Fraction(1),
        rotation=_rotation(raw),
        sample_rate=_int(raw.get("sample_rate")),
        channels=_int(raw.get("channels")),
        duration_seconds=_positive(raw.get("duration")),
        attached_pic=isinstance(disposition, dict) and disposition.get("attached_pic") == 1,
    )


def _rotation(raw: Mapping[str, Any]) -> int:
    """The display rotation in degrees (0, 90, 180, 270) from side data, else the legacy ``rotate`` tag."""
    sides = raw.get("side_data_list")
    for side in sides if isinstance(sides, list) else ():
        if isinstance(side, dict) and "rotation" in side:
            value = _number(side["rotation"])
            if value is not None:
                return round(value / 90) * 90 % 360
    tags = raw.get("tags")
    value = _number(tags.get("rotate")) if isinstance(tags, dict) else None
    return round(value / 90) * 90 % 360 if value is not None else 0


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _positive(value: object) -> float | None:
    number = _number(value)
    return number if number is not None and number > 0 else None


def _int(value: object) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() and number >= 0 else None


def _rate(value: object) -> Fraction | None:
    """A positive ``num/den`` rate ("30000/1001"); ``0/0`` and junk give None."""
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"(\d{1,9})/(\d{1,9})", value)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        return None
    return Fraction(int(m.group(1)), int(m.group(2)))
