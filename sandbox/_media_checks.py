"""Output validation: the ``checks`` document of a result (docs/protocol.md), judged from what the run left.

:func:`collect_outputs` reads an output folder (sizes, sha256, ffprobe of each media file, playlist text);
:func:`check_output` judges that against the plan and the envelope's ``validation`` and ``limits``. Both
the node (before it reports) and a validator (before it signs) run the same judgement.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypedDict

from core.envelope import Limits, Validation, canonical_json
from core.errors import HearthError, OutputValidationError
from sandbox._media_common import DEFAULT_PROBE_TIMEOUT_SECONDS
from sandbox._media_plan import ExpectedMedia, Plan
from sandbox._media_probe import IMAGE_DEMUXERS, MediaInfo, probe_file

CheckName = Literal["stream_layout", "duration", "file_size", "resolution", "codec", "hash"]

MIB: Final = 1024 * 1024  # max_output_mb counts MiB, as the sandbox's output cap does
DEFAULT_DURATION_TOLERANCE_SECONDS: Final = 0.5
DEFAULT_DURATION_TOLERANCE_RATIO: Final = 0.01
MAX_OUTPUT_FILES: Final = 20_000
MAX_PLAYLIST_BYTES: Final = 1024 * 1024
# Probing every segment of a long HLS ladder costs minutes; an even sample (ends included) finds a bad encode.
MAX_PROBED_SEGMENTS: Final = 8
_SHA256: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputFile:
    """One file the run left, named relative to the output dir.

    ``info`` is its probe (None when not media, not sampled, or unreadable: then ``probe_error`` holds the
    refusal code); ``text`` is a playlist's content.
    """

    name: str
    size_bytes: int
    sha256: str
    info: MediaInfo | None = None
    probe_error: str | None = None
    text: str | None = None


class Check(TypedDict):
    """One named check of a result and why it passed or failed."""

    name: CheckName
    passed: bool
    detail: dict[str, Any]


class Checks(TypedDict):
    """The ``checks`` document of a result: passed only if every check passed."""

    passed: bool
    checks: list[Check]


def collect_outputs(
    plan: Plan, output_dir: Path, *, probe_timeout_seconds: float = DEFAULT_PROBE_TIMEOUT_SECONDS
) -> list[OutputFile]:
    """Describe every file under ``output_dir`` for :func:`check_output`, probing media with host ffprobe.

    Symlinks and other non-regular files are listed (so they fail the layout check) but never followed.
    Each media file is probed with only the demuxer the plan wrote it with. An unreadable folder raises
    ``OutputValidationError("output_unreadable")``.
    """
    try:
        return _collect(plan, output_dir, probe_timeout_seconds)
    except OSError as exc:
        raise OutputValidationError(
            "output_unreadable",
            f"the output folder could not be read: {exc.strerror or type(exc).__name__}",
            details={"errno": exc.errno},
        ) from None


def _collect(plan: Plan, output_dir: Path, probe_timeout_seconds: float) -> list[OutputFile]:
    files: list[OutputFile] = []
    entries = sorted(_walk(output_dir))
    if len(entries) > MAX_OUTPUT_FILES:
        raise OutputValidationError(
            "too_many_output_files",
            f"the run left {len(entries)} files; at most {MAX_OUTPUT_FILES} are accepted",
            details={"files": len(entries), "max_files": MAX_OUTPUT_FILES},
        )
    sampled = _sampled_segments(plan, [name for name, _ in entries])
    for name, path in entries:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            files.append(OutputFile(name=name, size_bytes=0, sha256="", probe_error="not_a_regular_file"))
            continue
        media = _media_for(plan, name)
        info: MediaInfo | None = None
        error: str | None = None
        if media is not None and (not media.segmented or name in sampled):
            try:
                info = probe_file(
                    str(path.absolute()),
                    # Stills: ffprobe's pick among image demuxers depends on the file's first bytes.
                    allowed_formats=IMAGE_DEMUXERS if media.demuxer in IMAGE_DEMUXERS else (media.demuxer,),
                    timeout_seconds=probe_timeout_seconds,
                )
            except HearthError as exc:
                error = exc.code
        text = None
        if name.endswith(".m3u8") and st.st_size <= MAX_PLAYLIST_BYTES:
            text = path.read_text(encoding="utf-8", errors="replace")
        files.append(
            OutputFile(
                name=name,
                size_bytes=st.st_size,
                sha256=_sha256(path),
                info=info,
                probe_error=error,
                text=text,
            )
        )
    return files


def check_output(
    files: Sequence[OutputFile],
    *,
    plan: Plan,
    validation: Validation,
    limits: Limits,
    expected_sha256: Mapping[str, str] | None = None,
    duration_tolerance_seconds: float = DEFAULT_DURATION_TOLERANCE_SECONDS,
) -> Checks:
    """Judge a run's files against its plan, the envelope's ``validation`` and ``limits.max_output_mb``.

    Every check runs and is reported, failing or not. ``expected_sha256`` (name -> hex digest), given on
    replay, makes the ``hash`` check compare; otherwise it only requires a well-formed digest per file.
    """
    by_name = {f.name: f for f in files}
    groups = {m.name: _members(m, plan, by_name) for m in plan.media}
    checks: list[Check] = [
        _stream_layout(plan, by_name, groups, validation),
        _duration(plan, by_name, groups, validation, duration_tolerance_seconds),
        _file_size(files, limits),
        _resolution(plan, groups),
        _codec(plan, groups),
        _hash(files, expected_sha256),
    ]
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


# -- reading the folder ---------------------------------------------------------------------------------


def _walk(root: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        # A symlinked folder is reported like a file: os.walk lists it among dirnames without descending.
        names = filenames + [d for d in dirnames if (base / d).is_symlink()]
        out.extend(((base / n).relative_to(root).as_posix(), base / n) for n in names)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _media_for(plan: Plan, name: str) -> ExpectedMedia | None:
    for m in plan.media:
        if name == m.name or (m.segmented and _is_segment(plan, m, name)):
            return m
    return None


def _is_segment(plan: Plan, media: ExpectedMedia, name: str) -> bool:
    rest = name.removeprefix(media.name)
    return (
        rest != name
        and plan.segment_pattern is not None
        and re.fullmatch(plan.segment_pattern, rest) is not None
    )


def _sampled_segments(plan: Plan, names: Sequence[str]) -> set[str]:
    sampled: set[str] = set()
    for m in plan.media:
        if m.segmented:
            segments = sorted(n for n in names if _is_segment(plan, m, n))
            if len(segments) <= MAX_PROBED_SEGMENTS:
                sampled.update(segments)
            else:
                step = (len(segments) - 1) / (MAX_PROBED_SEGMENTS - 1)
                sampled.update(segments[round(i * step)] for i in range(MAX_PROBED_SEGMENTS))
    return sampled


def _members(media: ExpectedMedia, plan: Plan, by_name: Mapping[str, OutputFile]) -> list[OutputFile]:
    """The files that make up one promised media: the file itself, or a rendition's segments in order."""
    if not media.segmented:
        return [by_name[media.name]] if media.name in by_name else []
    return [by_name[n] for n in sorted(by_name) if _is_segment(plan, media, n)]


# -- HLS playlists --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Playlist:
    ended: bool
    entries: tuple[tuple[float, str], ...]  # (EXTINF seconds, segment URI)


def _media_playlist(text: str) -> _Playlist:
    entries: list[tuple[float, str]] = []
    pending: float | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#EXTINF:"):
            try:
                pending = float(line.removeprefix("#EXTINF:").split(",")[0])
            except ValueError:
                pending = float("nan")
        elif line and not line.startswith("#") and pending is not None:
            entries.append((pending, line))
            pending = None
    return _Playlist(ended="#EXT-X-ENDLIST" in text, entries=tuple(entries))


def _playlist(by_name: Mapping[str, OutputFile], name: str | None) -> str | None:
    found = by_name.get(name) if name else None
    return found.text if found else None


def _hls_problems(plan: Plan, by_name: Mapping[str, OutputFile]) -> list[str]:
    """What is wrong with an HLS ladder's playlists: master variants, segment lists, end markers."""
    problems: list[str] = []
    renditions = [m for m in plan.media if m.segmented]
    master = _playlist(by_name, plan.master_playlist)
    variants = sorted(ln.strip() for ln in (master or "").splitlines() if ln.strip() and ln[0] != "#")
    if variants != sorted(str(m.playlist) for m in renditions):
        problems.append("the master playlist does not list exactly the renditions")
    for m in renditions:
        text = _playlist(by_name, m.playlist)
        if text is None:
            if m.playlist in by_name:  # (a missing one is reported as missing)
                problems.append(f"{m.playlist} is too large to be a playlist of this plan")
            continue
        parsed = _media_playlist(text)
        listed = sorted(m.name + uri for _, uri in parsed.entries)
        if not parsed.ended:
            problems.append(f"{m.playlist} has no end marker")
        if listed != [n for n in sorted(by_name) if _is_segment(plan, m, n)]:
            problems.append(f"{m.playlist} does not list exactly the segments on disk")
    return problems


# -- the checks -----------------------------------------------------------------------------------------


def _check(name: CheckName, passed: bool, **detail: Any) -> Check:
    return {"name": name, "passed": passed, "detail": detail}


def _stream_layout(
    plan: Plan,
    by_name: Mapping[str, OutputFile],
    groups: Mapping[str, list[OutputFile]],
    validation: Validation,
) -> Check:
    missing = [o for o in plan.outputs if o not in by_name]
    missing += [m.name for m in plan.media if m.segmented and not groups[m.name]]
    expected = set(plan.outputs) | {f.name for g in groups.values() for f in g}
    unexpected = sorted(n for n in by_name if n not in expected)
    unreadable = sorted(f.name for g in groups.values() for f in g if f.probe_error is not None)
    required = sorted(validation.required_streams)
    wrong: list[dict[str, Any]] = []
    for m in plan.media:
        for f in groups[m.name]:
            kinds = sorted(f.info.kinds()) if f.info else None
            if kinds is not None and (kinds != sorted(m.streams) or not set(required) <= set(kinds)):
                wrong.append({"name": f.name, "streams": kinds, "expected": sorted(m.streams)})
    problems = _hls_problems(plan, by_name) if plan.master_playlist else []
    return _check(
        "stream_layout",
        not (missing or unexpected or unreadable or wrong or problems),
        missing=missing,
        unexpected=unexpected,
        unreadable=unreadable,
        wrong_streams=wrong,
        required_streams=required,
        playlist_problems=problems,
    )


def _media_duration(
    media: ExpectedMedia, members: Sequence[OutputFile], by_name: Mapping[str, OutputFile]
) -> float | None:
    """A file's probed duration, or an HLS rendition's: the sum of its playlist's segment lengths."""
    if media.segmented:
        text = _playlist(by_name, media.playlist)
        return None if text is None else sum(d for d, _ in _media_playlist(text).entries)
    info = members[0].info if members else None
    return info.duration_seconds if info else None


def _duration(
    plan: Plan,
    by_name: Mapping[str, OutputFile],
    groups: Mapping[str, list[OutputFile]],
    validation: Validation,
    tolerance: float,
) -> Check:
    expected = plan.expected_duration_seconds
    low, high = validation.min_duration_seconds, validation.max_duration_seconds
    if expected is None:
        return _check("duration", True, applicable=False)
    allowed = tolerance + expected * DEFAULT_DURATION_TOLERANCE_RATIO
    actual = {
        m.name: _media_duration(m, groups[m.name], by_name)
        for m in plan.media
        if m.duration_seconds is not None
    }
    failed = [
        name
        for name, d in actual.items()
        if d is None
        or not abs(d - expected) <= allowed
        or (low is not None and d < low)
        or (high is not None and d > high)
    ]
    return _check(
        "duration",
        not failed,
        expected_seconds=round(expected, 3),
        tolerance_seconds=round(allowed, 3),
        min_seconds=low,
        max_seconds=high,
        actual_seconds={k: None if v is None else round(v, 3) for k, v in actual.items()},
        failed=failed,
    )


def _file_size(files: Sequence[OutputFile], limits: Limits) -> Check:
    total = sum(f.size_bytes for f in files)
    cap = limits.max_output_mb * MIB
    empty = sorted(f.name for f in files if f.size_bytes == 0)
    return _check("file_size", total <= cap and not empty, total_bytes=total, max_bytes=cap, empty=empty)


def _resolution(plan: Plan, groups: Mapping[str, list[OutputFile]]) -> Check:
    mismatched: list[dict[str, Any]] = []
    for m in plan.media:
        if m.width is None or m.height is None:
            continue
        for f in groups[m.name]:
            if f.info is None:
                continue
            got = f"{f.info.width}x{f.info.height}" if f.info.video else None
            if got != f"{m.width}x{m.height}":
                mismatched.append({"name": f.name, "expected": f"{m.width}x{m.height}", "actual": got})
    sizes = sorted({f"{m.width}x{m.height}" for m in plan.media if m.width is not None})
    return _check("resolution", not mismatched, expected=sizes, mismatched=mismatched)


def _codec(plan: Plan, groups: Mapping[str, list[OutputFile]]) -> Check:
    mismatched: list[dict[str, Any]] = []
    for m in plan.media:
        for f in groups[m.name]:
            if f.info is None:
                continue
            want = {"video": m.video_codec, "audio": m.audio_codec}
            got = {"video": f.info.video_codec, "audio": f.info.audio_codec}
            if any(want[k] is not None and got[k] != want[k] for k in want):
                mismatched.append({"name": f.name, "expected": want, "actual": got})
    return _check("codec", not mismatched, mismatched=mismatched)


def _hash(files: Sequence[OutputFile], expected: Mapping[str, str] | None) -> Check:
    malformed = sorted(f.name for f in files if not _SHA256.fullmatch(f.sha256))
    manifest = {f.name: f.sha256 for f in files}
    mismatched: list[str] = []
    if expected is not None:
        mismatched = sorted(
            n for n in manifest.keys() | expected.keys() if manifest.get(n) != expected.get(n)
        )
    return _check(
        "hash",
        not malformed and not mismatched,
        files=len(files),
        # One digest over every (name, sha256): what replay compares when it has no per-file record.
        manifest_sha256=hashlib.sha256(canonical_json(manifest)).hexdigest(),
        compared=expected is not None,
        malformed=malformed,
        mismatched=mismatched,
    )
