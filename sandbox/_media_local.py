"""Running ffmpeg on the host: plans (for tests, the demo and benchmark baselines) and synthetic test clips.

Jobs from requesters never run here; the node runs a plan's argv inside the workload container. These
helpers exist so the same argv can be exercised, and measured bare, without Docker.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from core.errors import ExecutionError
from sandbox._media_common import (
    BITEXACT_OUTPUT,
    DEFAULT_TOOL_TIMEOUT_SECONDS,
    FFMPEG,
    ToolTimeout,
    run_tool,
    seconds_arg,
)
from sandbox._media_plan import Plan
from sandbox._media_progress import Progress, ProgressParser

TEST_CLIP_TONE_HZ: Final = 440
TEST_CLIP_SAMPLE_RATE: Final = 48_000
TEST_CLIP_AUDIO_KBPS: Final = 96


def run_plan(
    plan: Plan,
    *,
    timeout_seconds: float = DEFAULT_TOOL_TIMEOUT_SECONDS,
    on_progress: Callable[[Progress], None] | None = None,
) -> Progress:
    """Run ``plan.argv`` with host ffmpeg, passing each progress report to ``on_progress``; return the last.

    Raises ``ExecutionError``: ``timeout`` (the process is killed), ``ffmpeg_failed`` (non-zero exit; the
    log stays out of the error, since it may quote the input), ``tool_unavailable``.
    """
    parser = ProgressParser(plan.expected_duration_seconds)
    last = Progress(percent=0.0, out_time_seconds=None, fps=None, speed=None, done=False)
    try:
        proc = subprocess.Popen(
            list(plan.argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except OSError as exc:
        raise ExecutionError(
            "tool_unavailable", f"{plan.argv[0]} could not be started: {exc.strerror}", details={}
        ) from None
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout_seconds, kill)
    timer.start()
    with proc:  # closes the pipe and reaps the process however the loop ends
        try:
            assert proc.stdout is not None
            for report in parser.feed_lines(proc.stdout):
                last = report
                if on_progress is not None:
                    on_progress(report)
            proc.wait()  # stdout closes a moment before exit; the timer still guards the wait
        finally:
            timer.cancel()
            if proc.poll() is None:  # only when on_progress raised
                proc.kill()
    returncode = proc.returncode
    if timed_out.is_set():
        raise ExecutionError(
            "timeout",
            f"ffmpeg ran past {timeout_seconds:.0f} s",
            details={"timeout_seconds": timeout_seconds},
        )
    if returncode != 0:
        raise ExecutionError(
            "ffmpeg_failed", f"ffmpeg exited with status {returncode}", details={"returncode": returncode}
        )
    return last


def synthetic_clip_argv(
    path: Path, *, seconds: float, width: int, height: int, fps: int, audio: bool = True
) -> list[str]:
    """ffmpeg argv for a deterministic H.264/AAC MP4: the ``testsrc2`` pattern and, if asked, a sine tone."""
    duration = seconds_arg(seconds)
    sources = ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={duration}"]
    maps = ["-map", "0:v"]
    codecs = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", str(fps)]
    if audio:
        tone = f"sine=frequency={TEST_CLIP_TONE_HZ}:sample_rate={TEST_CLIP_SAMPLE_RATE}:duration={duration}"
        sources += ["-f", "lavfi", "-i", tone]
        maps += ["-map", "1:a"]
        codecs += ["-c:a", "aac", "-b:a", f"{TEST_CLIP_AUDIO_KBPS}k", "-ac", "2"]
    return [
        FFMPEG,
        "-nostdin",
        "-hide_banner",
        "-y",
        "-v",
        "error",
        *sources,
        *maps,
        *codecs,
        "-threads",
        "1",
        *BITEXACT_OUTPUT,
        "-f",
        "mp4",
        str(path),
    ]


def make_test_clip(
    path: Path,
    *,
    seconds: float = 2.0,
    width: int = 320,
    height: int = 240,
    fps: int = 25,
    audio: bool = True,
    timeout_seconds: float = DEFAULT_TOOL_TIMEOUT_SECONDS,
) -> Path:
    """Write :func:`synthetic_clip_argv`'s clip to ``path`` with host ffmpeg and return ``path``."""
    argv = synthetic_clip_argv(path, seconds=seconds, width=width, height=height, fps=fps, audio=audio)
    try:
        result = run_tool(argv, timeout_seconds=timeout_seconds)
    except ToolTimeout:
        raise ExecutionError("timeout", f"making the test clip took over {timeout_seconds:.0f} s") from None
    if result.returncode != 0:
        raise ExecutionError(
            "ffmpeg_failed",
            f"ffmpeg could not make the test clip (status {result.returncode})",
            details={
                "returncode": result.returncode,
                "stderr": result.stderr.decode(errors="replace")[-2000:],
            },
        )
    return path
