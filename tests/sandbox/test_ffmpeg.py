"""The FFmpeg workload with host ffmpeg on small generated clips: probe, presets, progress, output checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.envelope import AudioSpec, Clip, HlsSpec, Limits, Mp4Spec, ThumbnailsSpec, Validation
from core.errors import ExecutionError, OutputValidationError, RequestError
from node.http_errors import status_of
from sandbox.ffmpeg import (
    INPUT_DEMUXERS,
    Checks,
    MediaInfo,
    Plan,
    ProbeLimits,
    Progress,
    ProgressParser,
    check_output,
    collect_outputs,
    make_test_clip,
    parse_probe,
    probe_argv,
    probe_file,
    raise_for_checks,
    run_plan,
    synthetic_clip_argv,
    transcode_argv,
)
from tests.sandbox.media import random_bytes, rawvideo_avi, remux, truncated

THREADS = 2
CLIP_SECONDS = 3.0
Spec = Mp4Spec | HlsSpec | ThumbnailsSpec | AudioSpec

# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def clip(media_dir: Path) -> Path:
    """3 s of 320x240 25 fps H.264 + stereo AAC."""
    return make_test_clip(media_dir / "clip.mp4", seconds=CLIP_SECONDS, width=320, height=240, fps=25)


@pytest.fixture(scope="module")
def clip_info(clip: Path) -> MediaInfo:
    return probe_file(str(clip))


@pytest.fixture(scope="module")
def silent_clip(media_dir: Path) -> Path:
    return make_test_clip(media_dir / "silent.mp4", seconds=2, width=320, height=240, fps=25, audio=False)


@pytest.fixture(scope="module")
def secret(media_dir: Path) -> tuple[Path, str]:
    """A host file whose content no error or output may ever carry."""
    marker = "HEARTH-SECRET-" + hashlib.sha256(str(media_dir).encode()).hexdigest()[:16]
    path = media_dir / "secret.txt"
    path.write_text(f"root:x:0:0:{marker}:/root:/bin/bash\n")
    return path, marker


class Runner(Protocol):
    """The ``run`` fixture: compile a spec for an input (the clip by default), run it into ``out``."""

    def __call__(
        self, spec: Spec, out: Path, *, source: Path = ..., info: MediaInfo = ...
    ) -> tuple[Plan, Path]: ...


@pytest.fixture
def run(tmp_path: Path, clip: Path, clip_info: MediaInfo) -> Runner:
    """Compile ``spec`` for ``source`` (probed as ``info``), run it with host ffmpeg into ``out``."""

    def go(spec: Spec, out: Path, *, source: Path = clip, info: MediaInfo = clip_info) -> tuple[Plan, Path]:
        out.mkdir(parents=True)
        plan = transcode_argv(spec, info=info, input_path=str(source), output_dir=str(out), threads=THREADS)
        run_plan(plan)
        return plan, out

    return go


def checks_of(plan: Plan, out: Path, **kw: Any) -> Checks:
    validation = kw.pop("validation", Validation())
    limits = kw.pop("limits", Limits())
    return check_output(collect_outputs(plan, out), plan=plan, validation=validation, limits=limits, **kw)


def failing(checks: Checks) -> dict[str, dict[str, Any]]:
    return {c["name"]: c["detail"] for c in checks["checks"] if not c["passed"]}


def digests(out: Path) -> dict[str, str]:
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def refused(code: str, call: Callable[[], object]) -> RequestError:
    with pytest.raises(RequestError) as err:
        call()
    assert err.value.code == code, err.value.to_dict()
    assert err.value.domain == "validation"
    assert err.value.retryable is False
    assert status_of(err.value) == 422
    return err.value


# -- probing --------------------------------------------------------------------------------------------


def test_probe_argv_pins_file_protocol_and_safe_demuxers() -> None:
    argv = probe_argv("/in/input")
    assert argv[0] == "ffprobe"
    assert argv[argv.index("-protocol_whitelist") + 1] == "file"
    allowed = argv[argv.index("-format_whitelist") + 1].split(",")
    assert allowed == list(INPUT_DEMUXERS)
    assert not {"hls", "concat", "ffconcat", "image2", "image2pipe", "dash", "tee", "data"} & set(allowed)
    assert {"-show_format", "-show_streams"} <= set(argv)
    assert argv[argv.index("-print_format") + 1] == "json"
    assert argv[-1] == "file:/in/input"  # an explicit scheme: "concat:a|b" cannot pick a protocol
    with pytest.raises(ValueError):
        probe_argv("relative/input")


def test_probe_reads_a_generated_clip(clip_info: MediaInfo) -> None:
    assert clip_info.demuxer == "mov"
    assert clip_info.duration_seconds == pytest.approx(CLIP_SECONDS, abs=0.05)
    assert (clip_info.width, clip_info.height, clip_info.video_codec, clip_info.fps) == (
        320,
        240,
        "h264",
        25.0,
    )
    assert (clip_info.audio_codec, clip_info.channels, clip_info.sample_rate) == ("aac", 2, 48_000)
    assert clip_info.kinds() == ("video", "audio")


@pytest.mark.parametrize(
    ("name", "make", "code"),
    [
        ("noise.mp4", lambda p: random_bytes(p), "input_not_media"),
        ("empty.mkv", lambda p: p.write_bytes(b""), "input_not_media"),
        # ffmpeg reads any .txt as ANSI art (the tty demuxer): the allow list is what turns it away.
        (
            "notes.txt",
            lambda p: p.write_text("just some text, not a video\n" * 50),
            "input_format_not_allowed",
        ),
    ],
)
def test_probe_refuses_non_media(
    tmp_path: Path, name: str, make: Callable[[Path], object], code: str
) -> None:
    path = tmp_path / name
    make(path)
    err = refused(code, lambda: probe_file(str(path)))
    assert "just some text" not in str(err) + json.dumps(err.to_dict())


def test_probe_refuses_a_truncated_mp4_without_its_index(tmp_path: Path, clip: Path) -> None:
    # moov comes last in a plain MP4: the first half has media data but no index.
    cut = truncated(clip, tmp_path / "cut.mp4")
    refused("input_not_media", lambda: probe_file(str(cut)))


def test_truncated_faststart_mp4_fails_its_checks_not_the_node(
    tmp_path: Path, clip: Path, run: Runner
) -> None:
    # With the index first, the cut file probes as 3 s but holds ~half of that: the run must not pass.
    cut = truncated(remux(clip, tmp_path / "fs.mp4", "-movflags", "+faststart"), tmp_path / "cut.mp4")
    info = probe_file(str(cut))
    assert info.duration_seconds == pytest.approx(CLIP_SECONDS, abs=0.05)
    plan, out = run(Mp4Spec(format="mp4", resolution="360p"), tmp_path / "out", source=cut, info=info)
    checks = checks_of(plan, out)
    assert not checks["passed"]
    assert set(failing(checks)) == {"duration"}
    assert failing(checks)["duration"]["actual_seconds"]["output.mp4"] < CLIP_SECONDS / 2 + 0.3


@pytest.mark.parametrize(
    ("name", "body", "demuxer"),
    [
        (
            "evil.m3u8",
            "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{secret}\n#EXT-X-ENDLIST\n",
            "hls",
        ),
        (
            "evil_no_extension",
            "#EXTM3U\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:10,\n{secret}\n#EXTINF:10,\nfile:///etc/passwd\n",
            "hls",
        ),
        ("evil.ffconcat", "ffconcat version 1.0\nfile '{secret}'\n", "concat"),
    ],
)
def test_playlists_that_point_at_host_files_are_refused_and_leak_nothing(
    tmp_path: Path,
    run: Runner,
    clip_info: MediaInfo,
    secret: tuple[Path, str],
    name: str,
    body: str,
    demuxer: str,
) -> None:
    secret_path, marker = secret
    playlist = tmp_path / name
    playlist.write_text(body.format(secret=secret_path))
    leaks = [marker, Path("/etc/passwd").read_text().splitlines()[0]]
    err = refused("input_format_not_allowed", lambda: probe_file(str(playlist)))
    assert err.details["format"] == demuxer
    text = str(err) + json.dumps(err.to_dict())
    assert not [leak for leak in leaks if leak in text]
    # Even with the probe bypassed (a plan made for a real MP4), the pinned demuxer refuses the playlist
    # before anything is written.
    with pytest.raises(ExecutionError) as failed:
        run(Mp4Spec(format="mp4", resolution="360p"), tmp_path / "out", source=playlist, info=clip_info)
    assert failed.value.code == "ffmpeg_failed"
    assert not [leak for leak in leaks if leak in str(failed.value) + json.dumps(failed.value.to_dict())]
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (8000, 8000), (8192, 4400)])
def test_probe_refuses_a_file_claiming_huge_dimensions(tmp_path: Path, width: int, height: int) -> None:
    avi = rawvideo_avi(tmp_path / "huge.avi", width=width, height=height)
    err = refused("input_dimensions_too_large", lambda: probe_file(str(avi)))
    assert (err.details["width"], err.details["height"]) == (width, height)


def test_absurd_dimensions_leave_no_usable_stream(tmp_path: Path) -> None:
    # 60000x60000 is past what ffmpeg itself will represent: the stream probes as 0x0 and is unusable.
    avi = rawvideo_avi(tmp_path / "absurd.avi", width=60_000, height=60_000)
    refused("input_no_usable_stream", lambda: probe_file(str(avi)))


def test_decoder_pixel_cap_is_enforced_by_ffmpeg_itself(
    tmp_path: Path, clip: Path, clip_info: MediaInfo
) -> None:
    # Should a frame larger than the probe saw appear mid-stream, the decoder refuses it: shown here with a
    # cap one pixel below the clip's 320x240 frames.
    (tmp_path / "out").mkdir()
    strict = ProbeLimits(max_pixels=320 * 240 - 1)
    spec = Mp4Spec(format="mp4", resolution="360p")
    plan = transcode_argv(
        spec, info=clip_info, input_path=str(clip), output_dir=str(tmp_path / "out"), threads=1, limits=strict
    )
    with pytest.raises(ExecutionError) as err:
        run_plan(plan)
    assert err.value.code == "ffmpeg_failed"


def _probe_json(**overrides: Any) -> str:
    """A recorded ffprobe document (trimmed) of a 1080p phone video; overrides replace format fields."""
    doc: dict[str, Any] = {
        "streams": [
            {
                "index": 0,
                "codec_name": "h264",
                "codec_type": "video",
                "width": 1920,
                "height": 1080,
                "sample_aspect_ratio": "1:1",
                "avg_frame_rate": "30000/1001",
                "r_frame_rate": "30000/1001",
                "duration": "12.012000",
                "disposition": {"default": 1, "attached_pic": 0},
                "tags": {"title": "SECRET-TAG-TEXT"},
            },
            {
                "index": 1,
                "codec_name": "aac",
                "codec_type": "audio",
                "sample_rate": "44100",
                "channels": 2,
                "duration": "12.000000",
            },
        ],
        "format": {
            "format_name": "mov,mp4,m4a,3gp,3g2,mj2",
            "duration": "12.012000",
            "size": "9000000",
            "tags": {"comment": "SECRET-TAG-TEXT"},
        },
    }
    doc["format"].update(overrides)
    return json.dumps(doc)


def test_parse_probe_reads_a_recorded_document() -> None:
    info = parse_probe(_probe_json())
    assert info.demuxer == "mov"
    assert info.duration_seconds == pytest.approx(12.012)
    assert info.fps == pytest.approx(29.97, abs=0.01)
    assert (info.width, info.height, info.sample_rate, info.size_bytes) == (1920, 1080, 44_100, 9_000_000)


@pytest.mark.parametrize(
    ("code", "overrides"),
    [
        ("input_too_long", {"duration": "86400.5"}),
        ("input_format_not_allowed", {"format_name": "hls"}),
        ("input_format_not_allowed", {"format_name": "yuv4mpegpipe"}),
    ],
)
def test_parse_probe_refuses_and_never_echoes_tags(code: str, overrides: dict[str, Any]) -> None:
    err = refused(code, lambda: parse_probe(_probe_json(**overrides)))
    assert "SECRET-TAG-TEXT" not in str(err) + json.dumps(err.to_dict())


def test_parse_probe_refuses_unusable_and_oversized_documents() -> None:
    doc = json.loads(_probe_json())
    del doc["format"]["duration"]
    for s in doc["streams"]:
        del s["duration"]
    refused("input_duration_unknown", lambda: parse_probe(json.dumps(doc)))
    only_subs = {
        "streams": [{"index": 0, "codec_type": "subtitle", "codec_name": "subrip"}],
        "format": {"format_name": "matroska,webm", "duration": "5.0"},
    }
    refused("input_no_usable_stream", lambda: parse_probe(json.dumps(only_subs)))
    many = json.loads(_probe_json())
    many["streams"] = [dict(many["streams"][1], index=i) for i in range(40)]
    refused("input_too_many_streams", lambda: parse_probe(json.dumps(many)))
    refused("input_not_media", lambda: parse_probe("{\n\n}"))
    with pytest.raises(ExecutionError) as err:
        parse_probe("ffprobe: not json")
    assert err.value.code == "probe_output_invalid"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = st.sampled_from(
    [
        "codec_type",
        "codec_name",
        "width",
        "height",
        "avg_frame_rate",
        "sample_aspect_ratio",
        "duration",
        "side_data_list",
        "tags",
        "disposition",
        "channels",
        "sample_rate",
        "index",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    stream=st.dictionaries(_FIELDS, _JSON, max_size=8),
    fmt=st.dictionaries(st.sampled_from(["format_name", "duration", "size"]), _JSON, max_size=3),
)
def test_parse_probe_takes_any_document_without_crashing(stream: dict[str, Any], fmt: dict[str, Any]) -> None:
    doc = json.dumps({"streams": [stream], "format": fmt})
    try:
        info = parse_probe(doc, allowed_formats=(*INPUT_DEMUXERS, str(fmt.get("format_name"))))
    except RequestError as err:
        assert err.domain == "validation" and err.code.startswith("input_")
    else:
        assert info.video is not None or info.audio is not None


# -- argv ------------------------------------------------------------------------------------------------

PRESETS: dict[str, Spec] = {
    "mp4_clip": Mp4Spec(format="mp4", resolution="360p", clip=Clip(start_seconds=0.5, duration_seconds=2.0)),
    "mp4_silent": Mp4Spec(format="mp4", resolution="480p", audio_codec="none"),
    "hls": HlsSpec(format="hls", renditions=["360p", "480p"], segment_seconds=2),
    "thumbs_jpeg": ThumbnailsSpec(format="thumbnails", timestamps=[0.0, 1.5, CLIP_SECONDS]),
    "thumbs_png": ThumbnailsSpec(format="thumbnails", timestamps=[1.0], image_format="png"),
    "audio_aac": AudioSpec(format="audio", audio_codec="aac"),
    "audio_mp3": AudioSpec(format="audio", audio_codec="mp3", bitrate_kbps=96),
    "audio_flac": AudioSpec(
        format="audio", audio_codec="flac", clip=Clip(start_seconds=1, duration_seconds=1)
    ),
}


def _values(argv: tuple[str, ...], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_argv_is_plain_ffmpeg_with_every_safety_and_bitexact_flag(clip_info: MediaInfo, preset: str) -> None:
    plan = transcode_argv(PRESETS[preset], info=clip_info, threads=3)
    argv = plan.argv
    assert argv[0] == "ffmpeg" and all(isinstance(a, str) for a in argv)
    assert not {"sh", "bash", "/bin/sh", "-c"} & set(argv)
    assert {"-nostdin", "-hide_banner", "-y", "-nostats"} <= set(argv)
    assert _values(argv, "-progress") == ["pipe:1"]
    inputs = _values(argv, "-i")
    assert inputs and all(i == "file:/in/input" for i in inputs)  # the container's read-only input
    # Every input is pinned: protocol, demuxer (the probed one, forced), decoders, pixel cap.
    for flag, value in [("-f", "mov"), ("-format_whitelist", "mov"), ("-max_pixels", str(8192 * 4320))]:
        assert _values(argv, flag).count(value) == len(inputs), flag
    assert len(_values(argv, "-codec_whitelist")) == len(inputs)
    # Every output is reproducible and writes only under /out.
    outputs = len(plan.media) if plan.kind == "thumbnails" else 1
    for flag, value in [
        ("-fflags", "+bitexact"),
        ("-flags:v", "+bitexact"),
        ("-flags:a", "+bitexact"),
        ("-map_metadata", "-1"),
        ("-map_chapters", "-1"),
    ]:
        assert _values(argv, flag).count(value) == outputs, flag
    assert _values(argv, "-protocol_whitelist").count("file") == len(inputs) + outputs
    assert set(_values(argv, "-threads")) == {"3"} and plan.threads == 3
    assert argv[-1].startswith("/out/")
    if plan.kind == "thumbnails":
        assert _values(argv, "-frames:v") == ["1"] * outputs
    else:
        [limit] = _values(argv, "-t")
        assert plan.expected_duration_seconds is not None
        assert float(limit) == pytest.approx(plan.expected_duration_seconds)
        assert float(limit) <= min(CLIP_SECONDS, ProbeLimits().max_duration_seconds)
    if plan.kind in ("mp4", "hls"):
        for flag in ("-preset", "-crf", "-profile:v", "-g", "-keyint_min", "-sc_threshold", "-pix_fmt"):
            assert _values(argv, flag), flag
        assert _values(argv, "-c:v") == ["libx264"]
        # x264's frame threads are timing-dependent; slice threads are what make two runs byte-identical.
        assert _values(argv, "-x264-params") == ["sliced-threads=1"]
    if "-c:a" in argv:
        assert _values(argv, "-ar") == ["48000"] and _values(argv, "-ac") == ["2"]


def test_argv_hash_records_what_ran(clip_info: MediaInfo) -> None:
    spec = PRESETS["mp4_clip"]
    a = transcode_argv(spec, info=clip_info, threads=2)
    assert a.argv_hash == transcode_argv(spec, info=clip_info, threads=2).argv_hash
    assert a.argv_hash != transcode_argv(spec, info=clip_info, threads=4).argv_hash
    with pytest.raises(ValueError):
        transcode_argv(spec, info=clip_info, threads=0)


def test_specs_that_cannot_apply_to_the_input_are_refused(clip_info: MediaInfo) -> None:
    late = Mp4Spec(format="mp4", clip=Clip(start_seconds=CLIP_SECONDS + 1, duration_seconds=1))
    refused("clip_out_of_range", lambda: transcode_argv(late, info=clip_info, threads=1))
    past = ThumbnailsSpec(format="thumbnails", timestamps=[CLIP_SECONDS + 0.5])
    refused("timestamp_out_of_range", lambda: transcode_argv(past, info=clip_info, threads=1))
    no_audio = dataclasses.replace(clip_info, audio=None)
    refused("input_no_audio", lambda: transcode_argv(AudioSpec(format="audio"), info=no_audio, threads=1))
    no_video = dataclasses.replace(clip_info, video=None)
    refused("input_no_video", lambda: transcode_argv(PRESETS["hls"], info=no_video, threads=1))


def test_output_size_keeps_display_aspect_with_even_sides() -> None:
    doc = json.loads(_probe_json())
    doc["streams"][0].update(width=1080, height=1920)  # portrait phone video
    portrait = parse_probe(json.dumps(doc))
    plan = transcode_argv(Mp4Spec(format="mp4", resolution="720p"), info=portrait, threads=1)
    assert (plan.media[0].width, plan.media[0].height) == (720, 1280)
    doc["streams"][0].update(width=720, height=576, sample_aspect_ratio="16:11")  # anamorphic PAL widescreen
    anamorphic = parse_probe(json.dumps(doc))
    plan = transcode_argv(Mp4Spec(format="mp4", resolution="480p"), info=anamorphic, threads=1)
    assert (plan.media[0].width, plan.media[0].height) == (872, 480)
    assert (plan.media[0].width or 1) % 2 == 0


# -- running presets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_passes_its_checks_and_is_bit_exact(tmp_path: Path, run: Runner, preset: str) -> None:
    spec = PRESETS[preset]
    plan, first = run(spec, tmp_path / "a")
    checks = checks_of(plan, first)
    assert checks["passed"], failing(checks)
    assert [c["name"] for c in checks["checks"]] == [
        "stream_layout",
        "duration",
        "file_size",
        "resolution",
        "codec",
        "hash",
    ]
    produced = digests(first)
    assert set(plan.outputs) <= set(produced)
    # The same input, preset and threads, into another folder: byte for byte the same files.
    _, second = run(spec, tmp_path / "b")
    assert digests(second) == produced
    replay = checks_of(plan, second, expected_sha256=produced)
    assert replay["passed"], failing(replay)


def test_hls_ladder_has_a_master_and_fixed_length_segments(tmp_path: Path, run: Runner) -> None:
    plan, out = run(PRESETS["hls"], tmp_path / "hls")
    master = (out / "master.m3u8").read_text()
    assert "RESOLUTION=480x360" in master and "RESOLUTION=640x480" in master
    for rendition in ("360p", "480p"):
        playlist = (out / rendition / "index.m3u8").read_text()
        lengths = [
            float(line.split(":")[1].rstrip(",")) for line in playlist.splitlines() if "#EXTINF" in line
        ]
        assert lengths == pytest.approx([2.0, 1.0], abs=0.05)
        assert "#EXT-X-ENDLIST" in playlist
    # A lost segment is caught by the playlist cross-check.
    (out / "480p" / "seg_00001.ts").unlink()
    problems = failing(checks_of(plan, out))["stream_layout"]["playlist_problems"]
    assert problems == ["480p/index.m3u8 does not list exactly the segments on disk"]


def test_rotated_input_is_encoded_upright(tmp_path: Path, clip: Path, run: Runner) -> None:
    rotated = remux(clip, tmp_path / "rotated.mp4", "-metadata:s:v", "rotate=90")
    info = probe_file(str(rotated))
    assert info.video is not None and info.video.rotation in (90, 270)
    plan, out = run(Mp4Spec(format="mp4", resolution="360p"), tmp_path / "out", source=rotated, info=info)
    assert (plan.media[0].width, plan.media[0].height) == (360, 480)
    checks = checks_of(plan, out)
    assert checks["passed"], failing(checks)


def test_clip_start_and_duration_are_honoured(tmp_path: Path, run: Runner) -> None:
    spec = Mp4Spec(format="mp4", resolution="360p", clip=Clip(start_seconds=1.0, duration_seconds=1.2))
    plan, out = run(spec, tmp_path / "out")
    assert plan.expected_duration_seconds == pytest.approx(1.2)
    duration = next(c for c in checks_of(plan, out)["checks"] if c["name"] == "duration")
    assert duration["passed"]
    assert duration["detail"]["actual_seconds"]["output.mp4"] == pytest.approx(1.2, abs=0.1)
    # A clip running past the end is cut at the end, and the plan expects exactly that.
    tail = Mp4Spec(format="mp4", resolution="360p", clip=Clip(start_seconds=2.0, duration_seconds=30))
    plan, out = run(tail, tmp_path / "tail")
    assert plan.expected_duration_seconds == pytest.approx(CLIP_SECONDS - 2.0, abs=0.05)
    assert checks_of(plan, out)["passed"]


# -- output checks that fail -----------------------------------------------------------------------------


def test_too_short_output_fails_the_duration_check(tmp_path: Path, run: Runner) -> None:
    plan, out = run(PRESETS["mp4_clip"], tmp_path / "out")
    checks = checks_of(plan, out, validation=Validation(min_duration_seconds=10))
    assert set(failing(checks)) == {"duration"}
    assert failing(checks)["duration"]["failed"] == ["output.mp4"]
    with pytest.raises(OutputValidationError) as err:
        raise_for_checks(checks)
    assert err.value.code == "checks_failed" and err.value.domain == "validation"
    assert err.value.details["checks"] == checks and err.value.details["failed"] == ["duration"]
    raise_for_checks(checks_of(plan, out))  # passing checks raise nothing


def test_missing_audio_fails_the_stream_layout_check(tmp_path: Path, run: Runner, silent_clip: Path) -> None:
    info = probe_file(str(silent_clip))
    plan, out = run(Mp4Spec(format="mp4", resolution="360p"), tmp_path / "out", source=silent_clip, info=info)
    assert checks_of(plan, out)["passed"]  # the plan knew there was no audio to keep...
    checks = checks_of(plan, out, validation=Validation(required_streams=["video", "audio"]))
    assert set(failing(checks)) == {"stream_layout"}  # ...but the requester demanded it
    assert failing(checks)["stream_layout"]["wrong_streams"] == [
        {"name": "output.mp4", "streams": ["video"], "expected": ["video"]}
    ]


def test_wrong_resolution_and_codec_fail_their_checks(
    tmp_path: Path, run: Runner, clip_info: MediaInfo
) -> None:
    plan, out = run(PRESETS["mp4_clip"], tmp_path / "out")
    other = transcode_argv(
        Mp4Spec(format="mp4", resolution="720p", clip=Clip(start_seconds=0.5, duration_seconds=2.0)),
        info=clip_info,
        output_dir=str(out),
        threads=THREADS,
    )
    assert failing(checks_of(other, out))["resolution"]["mismatched"] == [
        {"name": "output.mp4", "expected": "960x720", "actual": "480x360"}
    ]
    wanted = dataclasses.replace(plan, media=(dataclasses.replace(plan.media[0], audio_codec="mp3"),))
    assert set(failing(checks_of(wanted, out))) == {"codec"}


def test_oversize_extra_and_tampered_outputs_fail(tmp_path: Path, run: Runner) -> None:
    plan, out = run(PRESETS["audio_mp3"], tmp_path / "out")
    before = digests(out)
    with (out / "audio.mp3").open("ab") as fh:
        fh.write(b"\0" * (1024 * 1024 + 1))
    (out / "stray.bin").write_bytes(b"x")
    checks = checks_of(plan, out, limits=Limits(max_output_mb=1), expected_sha256=before)
    bad = failing(checks)
    assert bad["file_size"]["total_bytes"] > bad["file_size"]["max_bytes"] == 1024 * 1024
    assert bad["stream_layout"]["unexpected"] == ["stray.bin"]
    assert bad["hash"]["mismatched"] == ["audio.mp3", "stray.bin"]
    (out / "audio.mp3").unlink()
    assert failing(checks_of(plan, out))["stream_layout"]["missing"] == ["audio.mp3"]


def test_symlinks_in_the_output_are_not_followed(
    tmp_path: Path, run: Runner, secret: tuple[Path, str]
) -> None:
    plan, out = run(PRESETS["thumbs_png"], tmp_path / "out")
    (out / "thumb_000.png").unlink()
    (out / "thumb_000.png").symlink_to(secret[0])
    files = collect_outputs(plan, out)
    [link] = [f for f in files if f.name == "thumb_000.png"]
    assert (link.size_bytes, link.sha256, link.probe_error) == (0, "", "not_a_regular_file")
    checks = check_output(files, plan=plan, validation=Validation(), limits=Limits())
    assert set(failing(checks)) >= {"stream_layout", "file_size", "hash"}


# -- progress --------------------------------------------------------------------------------------------

RECORDED = """\
frame=0
fps=0.00
stream_0_0_q=0.0
bitrate=N/A
total_size=48
out_time_us=N/A
out_time_ms=N/A
out_time=N/A
dup_frames=0
drop_frames=0
speed=N/A
progress=continue
frame=12
fps=23.50
out_time_us=-23220
out_time=-00:00:00.023220
speed=N/A
progress=continue
frame=31
fps=24.01
bitrate= 823.9kbits/s
out_time_us=1000000
out_time_ms=1000000
out_time=00:00:01.000000
speed=1.98x
progress=continue
frame=40
out_time=00:00:02.500000
speed=2.1x
progress=continue
frame=41
out_time_us=2400000
garbage line without equals
=
progress=continue
frame=75
fps=25.00
out_time_us=4000000
speed=2.5x
progress=end
"""


def test_progress_parser_on_recorded_lines() -> None:
    reports = list(ProgressParser(4.0).feed_lines(RECORDED.splitlines()))
    assert [r.percent for r in reports] == [0.0, 0.0, 25.0, 62.5, 62.5, 100.0]
    assert reports[0] == Progress(percent=0.0, out_time_seconds=None, fps=0.0, speed=None, done=False)
    assert reports[1].out_time_seconds == 0.0  # encoder delay: a negative time reads as zero
    assert (reports[2].fps, reports[2].speed, reports[2].out_time_seconds) == (24.01, 1.98, 1.0)
    assert reports[3].out_time_seconds == 2.5  # only the clock form was given
    assert reports[4].out_time_seconds == 2.4 and reports[4].percent == 62.5  # never backwards
    assert reports[-1].done and not any(r.done for r in reports[:-1])


def test_progress_parser_takes_bytes_partial_blocks_and_no_expected_duration() -> None:
    parser = ProgressParser(None)
    assert parser.feed(b"out_time_us=5000000\n") is None
    assert parser.feed(b"speed=N/A\n") is None
    report = parser.feed(b"progress=continue\n")
    assert report is not None and report.percent == 0.0 and report.out_time_seconds == 5.0
    # A process killed mid-block leaves a partial block: it yields nothing and breaks nothing after it.
    half = ProgressParser(10.0)
    assert list(half.feed_lines(["frame=3", "out_time_us=10"])) == []
    [end] = half.feed_lines(["out_time_us=20000000", "progress=end"])
    assert end.percent == 100.0 and end.out_time_seconds == 20.0


def test_progress_from_a_real_run(tmp_path: Path, clip: Path, clip_info: MediaInfo) -> None:
    (tmp_path / "out").mkdir()
    spec = HlsSpec(format="hls", renditions=["360p"], segment_seconds=2)
    plan = transcode_argv(
        spec, info=clip_info, input_path=str(clip), output_dir=str(tmp_path / "out"), threads=1
    )
    seen: list[Progress] = []
    last = run_plan(plan, on_progress=seen.append)
    assert seen and seen[-1] == last and last.done and last.percent == 100.0
    assert last.out_time_seconds == pytest.approx(CLIP_SECONDS, abs=0.1)
    percents = [r.percent for r in seen]
    assert percents == sorted(percents) and all(0 <= p <= 100 for p in percents)


def test_run_plan_kills_a_run_past_its_time_limit(tmp_path: Path, clip: Path, clip_info: MediaInfo) -> None:
    (tmp_path / "out").mkdir()
    plan = transcode_argv(
        PRESETS["hls"], info=clip_info, input_path=str(clip), output_dir=str(tmp_path / "out"), threads=1
    )
    with pytest.raises(ExecutionError) as err:
        run_plan(plan, timeout_seconds=0.001)
    assert err.value.code == "timeout"


# -- the test clip ---------------------------------------------------------------------------------------


def test_test_clip_is_deterministic(tmp_path: Path) -> None:
    a = make_test_clip(tmp_path / "a.mp4", seconds=1, width=160, height=120, fps=10)
    b = make_test_clip(tmp_path / "b.mp4", seconds=1, width=160, height=120, fps=10)
    assert a.read_bytes() == b.read_bytes()
    info = probe_file(str(a))
    assert (info.width, info.height, info.fps, info.audio_codec) == (160, 120, 10.0, "aac")
    argv = synthetic_clip_argv(tmp_path / "c.mp4", seconds=1, width=160, height=120, fps=10, audio=False)
    assert "sine" not in " ".join(argv) and argv[-1] == str(tmp_path / "c.mp4")


def test_test_clip_failure_is_an_execution_error(tmp_path: Path) -> None:
    with pytest.raises(ExecutionError) as err:
        make_test_clip(tmp_path / "missing-dir" / "x.mp4", seconds=1)
    assert err.value.code == "ffmpeg_failed"
