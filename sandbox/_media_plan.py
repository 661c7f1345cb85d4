"""Typed presets compiled to ffmpeg argv: what a run will do, which files it leaves, and how long they last.

Every argv is built for replay: the same input, preset and thread count give the same bytes. That is why
each run pins the demuxer (the one the probe saw), decoders, frame rate, scaler flags, encoder settings,
audio rate and layout, and strips every volatile field (encoder versions, creation times, metadata).
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Final, Literal

from core.envelope import AudioSpec, Clip, HlsSpec, Mp4Spec, Resolution, ThumbnailsSpec, canonical_json
from sandbox._media_common import (
    BITEXACT_OUTPUT,
    CONTAINER_INPUT_PATH,
    CONTAINER_OUTPUT_DIR,
    FFMPEG,
    bad_input,
    seconds_arg,
)
from sandbox._media_probe import (
    DEFAULT_PROBE_LIMITS,
    INPUT_DEMUXERS,
    MediaInfo,
    ProbeLimits,
    StreamInfo,
    decoders_for,
)

StreamName = Literal["video", "audio"]
Spec = Mp4Spec | HlsSpec | ThumbnailsSpec | AudioSpec

SHORT_SIDE: Final[dict[Resolution, int]] = {"360p": 360, "480p": 480, "720p": 720, "1080p": 1080}
# VBV caps on top of CRF keep a hostile, noisy input from producing an output far larger than estimated.
VIDEO_MAXRATE_KBPS: Final[dict[Resolution, int]] = {"360p": 1000, "480p": 1500, "720p": 3000, "1080p": 6000}
X264_PRESET: Final = "veryfast"
X264_PROFILE: Final = "high"
X264_CRF: Final = 23
MP4_GOP_SECONDS: Final = 2
VIDEO_AUDIO_BITRATE_KBPS: Final = 128
AUDIO_SAMPLE_RATE: Final = 48_000
AUDIO_CHANNELS: Final = 2
FLAC_COMPRESSION_LEVEL: Final = 5
JPEG_QSCALE: Final = 2
MAX_OUTPUT_FPS: Final = Fraction(60)
FALLBACK_FPS: Final = Fraction(30)
MAX_THREADS: Final = 64
# The encoder threads a job gets for its CPU limit: a rule, not a setting, so a replay or a validator
# re-running the plan makes the same bytes.
MAX_FFMPEG_THREADS: Final = 16
# Swscale's SIMD paths differ between CPUs; "bitexact" keeps a replay on another machine byte-identical.
SCALER_FLAGS: Final = "bicubic+accurate_rnd+bitexact"

MP4_OUTPUT: Final = "output.mp4"
HLS_MASTER: Final = "master.m3u8"
HLS_PLAYLIST: Final = "index.m3u8"
HLS_SEGMENT_TEMPLATE: Final = "seg_%05d.ts"
HLS_SEGMENT_PATTERN: Final = r"seg_\d{5}\.ts"
AUDIO_OUTPUTS: Final[dict[str, tuple[str, str]]] = {
    # audio_codec -> (file name, muxer)
    "aac": ("audio.m4a", "mp4"),
    "mp3": ("audio.mp3", "mp3"),
    "flac": ("audio.flac", "flac"),
}
_ENCODERS: Final = {"aac": "aac", "mp3": "libmp3lame", "flac": "flac"}
# The demuxer that reads each output back for validation.
_READ_BACK: Final = {
    "mp4": "mov",
    "mp3": "mp3",
    "flac": "flac",
    "hls": "mpegts",
    "jpeg": "image2",
    "png": "png_pipe",
}


def ffmpeg_threads(cpus: float) -> int:
    """The encoder thread count for a job's CPU limit; fixed per job so a replay makes the same bytes."""
    return max(1, min(MAX_FFMPEG_THREADS, math.ceil(cpus)))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExpectedMedia:
    """One media output a plan promises, as validation will find it when probing it back.

    For HLS, ``name`` is a rendition folder (``"720p/"``) whose segments together form the media.
    """

    name: str
    demuxer: str
    streams: tuple[StreamName, ...]
    width: int | None = None
    height: int | None = None
    video_codec: str | None = None
    audio_codec: str | None = None
    duration_seconds: float | None = None
    segmented: bool = False
    playlist: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """A compiled preset: the argv to run, the files it must leave, what they contain and how long it lasts.

    ``outputs`` names every file (relative to the output dir) that must exist; HLS segments are matched by
    ``segment_pattern`` under each rendition folder instead, their count depending on the cut, and
    ``master_playlist`` lists the renditions.
    ``expected_duration_seconds`` drives progress percent and the duration check (None for stills).
    """

    kind: Literal["mp4", "hls", "thumbnails", "audio"]
    argv: tuple[str, ...]
    threads: int
    outputs: tuple[str, ...]
    media: tuple[ExpectedMedia, ...]
    expected_duration_seconds: float | None
    segment_pattern: str | None = None
    master_playlist: str | None = None

    @property
    def argv_hash(self) -> str:
        """``sha256(JCS(argv))`` as hex: the provenance record of exactly what ran."""
        return hashlib.sha256(canonical_json(list(self.argv))).hexdigest()


def transcode_argv(
    spec: Spec,
    *,
    info: MediaInfo,
    input_path: str = CONTAINER_INPUT_PATH,
    output_dir: str = CONTAINER_OUTPUT_DIR,
    threads: int,
    limits: ProbeLimits = DEFAULT_PROBE_LIMITS,
) -> Plan:
    """Compile ``spec`` for the probed input ``info`` into a :class:`Plan` (no shell, no free-form flags).

    ``threads`` is fixed into the argv (it changes x264's output, so replay must reuse it). Raises a
    ``RequestError`` (domain ``validation``) when the spec cannot apply to this input: a clip that starts
    past the end, video asked of an audio-only file, audio asked of a silent one.
    """
    if not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be in [1, {MAX_THREADS}], got {threads}")
    if info.demuxer not in INPUT_DEMUXERS:
        raise bad_input("input_format_not_allowed", f"the input's container ({info.demuxer}) is not accepted")
    for path in (input_path, output_dir):
        if not path.startswith("/"):
            raise ValueError(f"media paths must be absolute, got {path!r}")
    job = _Job(info=info, input_path=input_path, output_dir=output_dir, threads=threads, limits=limits)
    match spec:
        case Mp4Spec():
            return job.mp4(spec)
        case HlsSpec():
            return job.hls(spec)
        case ThumbnailsSpec():
            return job.thumbnails(spec)
        case AudioSpec():
            return job.audio(spec)


@dataclass(frozen=True, slots=True)
class _Job:
    info: MediaInfo
    input_path: str
    output_dir: str
    threads: int
    limits: ProbeLimits

    def mp4(self, spec: Mp4Spec) -> Plan:
        video = self._video()
        audio = self.info.audio if spec.audio_codec == "aac" else None
        start, duration = self._cut(spec.clip)
        width, height = _target_size(video, spec.resolution, self.limits)
        fps = _output_fps(video)
        graph = f"[0:{video.index}]{_scale_chain(fps, width, height)}[v0]"
        argv = [
            *self._head(),
            *self._input([video, audio], seek=start),
            "-filter_complex",
            graph,
            "-map",
            "[v0]",
            *self._audio_map(audio),
            *_x264(spec.resolution, fps, MP4_GOP_SECONDS),
            *_aac(audio),
            "-t",
            seconds_arg(duration),
            *self._tail(),
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
            self._out(MP4_OUTPUT),
        ]
        media = ExpectedMedia(
            name=MP4_OUTPUT,
            demuxer=_READ_BACK["mp4"],
            streams=("video", "audio") if audio else ("video",),
            width=width,
            height=height,
            video_codec="h264",
            audio_codec="aac" if audio else None,
            duration_seconds=duration,
        )
        return self._plan("mp4", argv, (MP4_OUTPUT,), (media,), duration)

    def hls(self, spec: HlsSpec) -> Plan:
        video = self._video()
        audio = self.info.audio if spec.audio_codec == "aac" else None
        start, duration = self._cut(spec.clip)
        fps = _output_fps(video)
        sizes = [_target_size(video, r, self.limits) for r in spec.renditions]
        # One decode feeds every rendition: split the video into one scaler chain per output size.
        sources = [f"[s{i}]" for i in range(len(sizes))] if len(sizes) > 1 else [f"[0:{video.index}]"]
        chains = [
            f"{src}{_scale_chain(fps, w, h)}[v{i}]"
            for i, (src, (w, h)) in enumerate(zip(sources, sizes, strict=True))
        ]
        if len(sizes) > 1:
            chains.insert(0, f"[0:{video.index}]split={len(sizes)}{''.join(sources)}")
        maps: list[str] = []
        rates: list[str] = []
        for i, resolution in enumerate(spec.renditions):
            maps += ["-map", f"[v{i}]", *self._audio_map(audio)]
            kbps = VIDEO_MAXRATE_KBPS[resolution]
            rates += [f"-maxrate:v:{i}", f"{kbps}k", f"-bufsize:v:{i}", f"{2 * kbps}k"]
        stream_map = " ".join(
            f"v:{i},{f'a:{i},' if audio else ''}name:{r}" for i, r in enumerate(spec.renditions)
        )
        segment_seconds = spec.segment_seconds
        argv = [
            *self._head(),
            *self._input([video, audio], seek=start),
            "-filter_complex",
            ";".join(chains),
            *maps,
            *_x264(None, fps, segment_seconds),
            *rates,
            # Keyframes exactly on segment boundaries make every segment the same length and independent.
            "-force_key_frames:v",
            f"expr:gte(t,n_forced*{segment_seconds})",
            *_aac(audio),
            "-t",
            seconds_arg(duration),
            *self._tail(),
            "-f",
            "hls",
            "-hls_time",
            str(segment_seconds),
            "-hls_playlist_type",
            "vod",
            "-hls_flags",
            "independent_segments",
            "-hls_segment_type",
            "mpegts",
            "-hls_segment_filename",
            self._out(f"%v/{HLS_SEGMENT_TEMPLATE}"),
            "-master_pl_name",
            HLS_MASTER,
            "-var_stream_map",
            stream_map,
            self._out(f"%v/{HLS_PLAYLIST}"),
        ]
        media = tuple(
            ExpectedMedia(
                name=f"{r}/",
                demuxer=_READ_BACK["hls"],
                streams=("video", "audio") if audio else ("video",),
                width=w,
                height=h,
                video_codec="h264",
                audio_codec="aac" if audio else None,
                duration_seconds=duration,
                segmented=True,
                playlist=f"{r}/{HLS_PLAYLIST}",
            )
            for r, (w, h) in zip(spec.renditions, sizes, strict=True)
        )
        outputs = (HLS_MASTER, *(f"{r}/{HLS_PLAYLIST}" for r in spec.renditions))
        return self._plan(
            "hls", argv, outputs, media, duration, segment_pattern=HLS_SEGMENT_PATTERN, master=HLS_MASTER
        )

    def thumbnails(self, spec: ThumbnailsSpec) -> Plan:
        video = self._video()
        width, height = _target_size(video, spec.resolution, self.limits)
        stop = self._seekable_end(video)
        ext, codec, pix_fmt, encode = (
            ("jpg", "mjpeg", "yuvj420p", ["-c:v", "mjpeg", "-q:v", str(JPEG_QSCALE)])
            if spec.image_format == "jpeg"
            else ("png", "png", "rgb24", ["-c:v", "png"])
        )
        inputs: list[str] = []
        chains: list[str] = []
        outs: list[str] = []
        names: list[str] = []
        for i, t in enumerate(spec.timestamps):
            if t > (self.info.duration_seconds or 0.0):
                raise bad_input(
                    "timestamp_out_of_range",
                    f"thumbnail timestamp {t} s lies past the input's end",
                    timestamp=t,
                    duration_seconds=self.info.duration_seconds,
                )
            name = f"thumb_{i:03d}.{ext}"
            names.append(name)
            inputs += self._input([video], seek=min(t, stop))
            chains.append(
                f"[{i}:{video.index}]scale={width}:{height}:flags={SCALER_FLAGS},setsar=1,format={pix_fmt}[t{i}]"
            )
            outs += [
                "-map",
                f"[t{i}]",
                "-frames:v",
                "1",
                *encode,
                *self._tail(),
                "-f",
                "image2",
                "-update",
                "1",
                self._out(name),
            ]
        argv = [*self._head(), *inputs, "-filter_complex", ";".join(chains), *outs]
        media = tuple(
            ExpectedMedia(
                name=name,
                demuxer=_READ_BACK[spec.image_format],
                streams=("video",),
                width=width,
                height=height,
                video_codec=codec,
            )
            for name in names
        )
        return self._plan("thumbnails", argv, tuple(names), media, None)

    def audio(self, spec: AudioSpec) -> Plan:
        audio = self.info.audio
        if audio is None:
            raise bad_input("input_no_audio", "the input has no audio stream in a codec the node decodes")
        start, duration = self._cut(spec.clip)
        name, muxer = AUDIO_OUTPUTS[spec.audio_codec]
        bitrate = [] if spec.audio_codec == "flac" else ["-b:a", f"{spec.bitrate_kbps}k"]
        level = ["-compression_level", str(FLAC_COMPRESSION_LEVEL)] if spec.audio_codec == "flac" else []
        argv = [
            *self._head(),
            *self._input([audio], seek=start),
            "-map",
            f"0:{audio.index}",
            "-c:a",
            _ENCODERS[spec.audio_codec],
            *bitrate,
            *level,
            "-ar",
            str(AUDIO_SAMPLE_RATE),
            "-ac",
            str(AUDIO_CHANNELS),
            "-t",
            seconds_arg(duration),
            *self._tail(),
            *(["-movflags", "+faststart"] if muxer == "mp4" else []),
            "-f",
            muxer,
            self._out(name),
        ]
        media = ExpectedMedia(
            name=name,
            demuxer=_READ_BACK[muxer],
            streams=("audio",),
            audio_codec=spec.audio_codec,
            duration_seconds=duration,
        )
        return self._plan("audio", argv, (name,), (media,), duration)

    # -- pieces shared by the presets ------------------------------------------------------------

    def _plan(
        self,
        kind: Literal["mp4", "hls", "thumbnails", "audio"],
        argv: list[str],
        outputs: tuple[str, ...],
        media: tuple[ExpectedMedia, ...],
        duration: float | None,
        *,
        segment_pattern: str | None = None,
        master: str | None = None,
    ) -> Plan:
        return Plan(
            kind=kind,
            argv=tuple(argv),
            threads=self.threads,
            outputs=outputs,
            media=media,
            expected_duration_seconds=duration,
            segment_pattern=segment_pattern,
            master_playlist=master,
        )

    def _head(self) -> list[str]:
        return [
            FFMPEG,
            "-nostdin",
            "-hide_banner",
            "-y",
            "-v",
            "error",
            "-nostats",
            "-progress",
            "pipe:1",
            "-filter_complex_threads",
            str(self.threads),
        ]

    def _input(self, streams: Sequence[StreamInfo | None], *, seek: float) -> list[str]:
        """Input options: pinned protocol, demuxer, decoders and pixel cap, then the (accurate) seek."""
        decoders = decoders_for(self.info, [s for s in streams if s is not None])
        return [
            "-threads",
            str(self.threads),
            "-flags",
            "+bitexact",
            "-protocol_whitelist",
            "file",
            "-format_whitelist",
            self.info.demuxer,
            "-f",
            self.info.demuxer,
            "-codec_whitelist",
            ",".join(decoders),
            "-max_pixels",
            str(self.limits.max_pixels),
            *(["-ss", seconds_arg(seek)] if seek > 0 else []),
            "-i",
            "file:" + self.input_path,
        ]

    def _tail(self) -> list[str]:
        """Per-output options that make the bytes reproducible."""
        return [
            "-threads",
            str(self.threads),
            *BITEXACT_OUTPUT,
            "-map_chapters",
            "-1",
            "-protocol_whitelist",
            "file",
        ]

    @staticmethod
    def _audio_map(audio: StreamInfo | None) -> list[str]:
        return ["-map", f"0:{audio.index}"] if audio else []

    def _out(self, name: str) -> str:
        return posixpath.join(self.output_dir, name)

    def _video(self) -> StreamInfo:
        if self.info.video is None:
            raise bad_input("input_no_video", "the input has no video stream in a codec the node decodes")
        return self.info.video

    def _cut(self, clip: Clip | None) -> tuple[float, float]:
        """Start and length of the output: the clip within the input, bounded by the duration cap."""
        total = self.info.duration_seconds or 0.0
        start = clip.start_seconds if clip else 0.0
        if start >= total:
            raise bad_input(
                "clip_out_of_range",
                f"the clip starts at {start} s but the input lasts {total:.3f} s",
                start_seconds=start,
                duration_seconds=total,
            )
        length = total - start
        if clip:
            length = min(length, clip.duration_seconds)
        return start, min(length, self.limits.max_duration_seconds)

    def _seekable_end(self, video: StreamInfo) -> float:
        """The latest seek that still lands before the last frame (two frame periods of slack)."""
        end = video.duration_seconds or self.info.duration_seconds or 0.0
        return max(0.0, end - 2 / float(_output_fps(video)))


def _output_fps(video: StreamInfo) -> Fraction:
    rate = video.frame_rate
    if rate is None or rate < 1:
        return FALLBACK_FPS
    return min(rate, MAX_OUTPUT_FPS)


def _target_size(video: StreamInfo, resolution: Resolution, limits: ProbeLimits) -> tuple[int, int]:
    """The output frame: short side at the preset's height, aspect kept, both sides even."""
    display = video.display_size
    assert display is not None  # a usable video stream has a display size
    dw, dh = display
    short = SHORT_SIDE[resolution]
    long_side = max(2, 2 * round(short * max(dw, dh) / min(dw, dh) / 2))
    width, height = (long_side, short) if dw >= dh else (short, long_side)
    if width > limits.max_width or height > limits.max_height:
        raise bad_input(
            "input_aspect_unsupported",
            f"the input's aspect ratio would make a {width}x{height} output",
            width=width,
            height=height,
        )
    return width, height


def _scale_chain(fps: Fraction, width: int, height: int) -> str:
    rate = f"{fps.numerator}/{fps.denominator}"
    return f"fps={rate},scale={width}:{height}:flags={SCALER_FLAGS},setsar=1,format=yuv420p"


def _x264(resolution: Resolution | None, fps: Fraction, gop_seconds: int) -> list[str]:
    """Explicit x264 settings; VBV caps only with ``resolution`` (HLS sets them per stream instead)."""
    keyint = str(max(1, math.floor(fps * gop_seconds)))
    rate: list[str] = []
    if resolution is not None:
        kbps = VIDEO_MAXRATE_KBPS[resolution]
        rate = ["-maxrate", f"{kbps}k", "-bufsize", f"{2 * kbps}k"]
    return [
        "-c:v",
        "libx264",
        "-preset",
        X264_PRESET,
        "-profile:v",
        X264_PROFILE,
        "-crf",
        str(X264_CRF),
        *rate,
        "-g",
        keyint,
        "-keyint_min",
        keyint,
        "-sc_threshold",
        "0",
        # x264's frame threads make VBV and lookahead decisions depend on thread timing, so two runs can
        # differ; slice threads split each frame into one slice per thread and give the same bytes.
        "-x264-params",
        "sliced-threads=1",
        "-pix_fmt",
        "yuv420p",
    ]


def _aac(audio: StreamInfo | None) -> list[str]:
    if audio is None:
        return []
    return [
        "-c:a",
        "aac",
        "-b:a",
        f"{VIDEO_AUDIO_BITRATE_KBPS}k",
        "-ar",
        str(AUDIO_SAMPLE_RATE),
        "-ac",
        str(AUDIO_CHANNELS),
    ]
