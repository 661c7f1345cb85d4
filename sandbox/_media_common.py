"""Shared pieces of the FFmpeg workload: tool names, container paths, time limits and the host tool runner."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Final

from core.errors import ExecutionError, RequestError

FFMPEG: Final = "ffmpeg"
FFPROBE: Final = "ffprobe"

# Inside the workload container: the input is bind-mounted read-only, /out is the one writable directory.
CONTAINER_INPUT_PATH: Final = "/in/input"
CONTAINER_OUTPUT_DIR: Final = "/out"

DEFAULT_PROBE_TIMEOUT_SECONDS: Final = 30.0
DEFAULT_TOOL_TIMEOUT_SECONDS: Final = 120.0
# ffprobe's JSON for a sane file is a few KiB; tags can bloat it, and nothing needs more than this.
MAX_PROBE_OUTPUT_BYTES: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a finished host tool run left: exit status and both streams."""

    returncode: int
    stdout: bytes
    stderr: bytes


class ToolTimeout(Exception):
    """Raised by :func:`run_tool` when the tool outlived its time limit (it has been killed)."""


def run_tool(argv: list[str], *, timeout_seconds: float) -> ToolResult:
    """Run ``argv`` (never through a shell) with no stdin and a hard time limit.

    A missing binary or an OS failure becomes :class:`ExecutionError`; a timeout is left to the caller
    as :class:`ToolTimeout` because whose fault it is (the input's or the node's) depends on the tool.
    """
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_seconds, check=False
        )
    except subprocess.TimeoutExpired:
        raise ToolTimeout(argv[0]) from None
    except OSError as exc:
        raise ExecutionError(
            "tool_unavailable",
            f"{argv[0]} could not be started: {exc.strerror or type(exc).__name__}",
            details={"tool": argv[0]},
        ) from None
    return ToolResult(done.returncode, done.stdout, done.stderr)


def bad_input(code: str, message: str, **details: object) -> RequestError:
    """A refusal of the job's input: the requester's fault, judged at validation, never retryable.

    Messages and details carry only numbers and ffmpeg's own format/codec names, never the file's bytes.
    """
    return RequestError(code, message, details=dict(details), domain="validation", retryable=False)


def seconds_arg(value: float) -> str:
    """``value`` seconds as an ffmpeg time argument: fixed microsecond precision, no exponent, no noise."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"


# Per-output options without which the same input and argv would not give the same bytes.
BITEXACT_OUTPUT: tuple[str, ...] = (
    "-fflags",
    "+bitexact",
    "-flags:v",
    "+bitexact",
    "-flags:a",
    "+bitexact",
    "-map_metadata",
    "-1",
)
