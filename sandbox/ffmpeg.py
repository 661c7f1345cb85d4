"""The FFmpeg workload: probe untrusted input, compile a typed preset to argv, follow progress, judge output.

A job flows through it in this order::

    probe_argv(path)            ffprobe argv: file protocol only, allow-listed demuxers
    parse_probe(json) / probe_file(path)
                                -> MediaInfo, or a RequestError (domain "validation") refusing the input
    transcode_argv(spec, info=..., threads=...)
                                -> Plan: argv (bit-exact, pinned demuxer/decoders, bounded -t),
                                   files it must leave, expected duration
    ProgressParser(plan.expected_duration_seconds).feed(line)
                                -> Progress per "-progress pipe:1" block
    collect_outputs(plan, out_dir) / check_output(files, plan=..., validation=..., limits=...)
                                -> Checks {"passed", "checks": [...]}; raise_for_checks() on failure

Paths default to the workload container's (:data:`CONTAINER_INPUT_PATH`, :data:`CONTAINER_OUTPUT_DIR`);
host runs (tests, the demo, benchmarks) pass their own, and use :func:`run_plan` and
:func:`make_test_clip`.
"""

from __future__ import annotations

from sandbox._checks import raise_for_checks
from sandbox._media_checks import (
    DEFAULT_DURATION_TOLERANCE_SECONDS,
    MAX_OUTPUT_FILES,
    Check,
    CheckName,
    Checks,
    OutputFile,
    check_output,
    collect_outputs,
)
from sandbox._media_common import (
    CONTAINER_INPUT_PATH,
    CONTAINER_OUTPUT_DIR,
    DEFAULT_PROBE_TIMEOUT_SECONDS,
    DEFAULT_TOOL_TIMEOUT_SECONDS,
)
from sandbox._media_local import make_test_clip, run_plan, synthetic_clip_argv
from sandbox._media_plan import MAX_FFMPEG_THREADS, ExpectedMedia, Plan, ffmpeg_threads, transcode_argv
from sandbox._media_probe import (
    DEFAULT_PROBE_LIMITS,
    INPUT_DEMUXERS,
    MediaInfo,
    ProbeLimits,
    StreamInfo,
    parse_probe,
    probe_argv,
    probe_file,
    probe_refusal,
    sandboxed_probe_refusal,
)
from sandbox._media_progress import Progress, ProgressParser

__all__ = [
    "CONTAINER_INPUT_PATH",
    "CONTAINER_OUTPUT_DIR",
    "DEFAULT_DURATION_TOLERANCE_SECONDS",
    "DEFAULT_PROBE_LIMITS",
    "DEFAULT_PROBE_TIMEOUT_SECONDS",
    "DEFAULT_TOOL_TIMEOUT_SECONDS",
    "INPUT_DEMUXERS",
    "MAX_FFMPEG_THREADS",
    "MAX_OUTPUT_FILES",
    "Check",
    "CheckName",
    "Checks",
    "ExpectedMedia",
    "MediaInfo",
    "OutputFile",
    "Plan",
    "ProbeLimits",
    "Progress",
    "ProgressParser",
    "StreamInfo",
    "check_output",
    "collect_outputs",
    "ffmpeg_threads",
    "make_test_clip",
    "parse_probe",
    "probe_argv",
    "probe_file",
    "probe_refusal",
    "raise_for_checks",
    "run_plan",
    "sandboxed_probe_refusal",
    "synthetic_clip_argv",
    "transcode_argv",
]
