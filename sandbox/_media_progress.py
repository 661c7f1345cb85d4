"""Progress of a running ffmpeg, read from ``-progress pipe:1``.

ffmpeg prints blocks of ``key=value`` lines, each closed by ``progress=continue`` (or ``progress=end``
once). Values can be ``N/A`` (no output time yet, no speed), a block can arrive cut short if the process
dies, and ``out_time`` starts slightly negative for inputs with an encoder delay; the parser takes all of
that without raising, since a progress bar is never a reason to fail a job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

_CLOCK: Final = re.compile(r"(-?)(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
# A block larger than this is not ffmpeg's; keep memory bounded whatever arrives on stdout.
_MAX_KEYS: Final = 64


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress report: percent of the expected output written, and how fast it is going."""

    percent: float
    out_time_seconds: float | None
    fps: float | None
    speed: float | None
    done: bool


@dataclass(slots=True)
class ProgressParser:
    """Turns ``-progress`` lines into :class:`Progress` reports, one per completed block.

    ``expected_duration_seconds`` is the plan's output length; without it (stills) percent stays 0 until
    the run ends. Percent never goes backwards, so a UI fed from here never jumps back.
    """

    expected_duration_seconds: float | None
    _block: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _percent: float = field(default=0.0, init=False)

    def feed(self, line: str | bytes) -> Progress | None:
        """Take one line; return a report when it closes a block, else None."""
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        key, sep, value = text.strip().partition("=")
        if not sep:
            return None
        if key != "progress":
            if len(self._block) < _MAX_KEYS or key in self._block:
                self._block[key] = value.strip()
            return None
        report = self._report(done=value.strip() == "end")
        self._block.clear()
        return report

    def feed_lines(self, lines: Iterable[str | bytes]) -> Iterator[Progress]:
        """Feed many lines (e.g. a whole captured stdout split into lines), yielding each report."""
        for line in lines:
            report = self.feed(line)
            if report is not None:
                yield report

    def _report(self, *, done: bool) -> Progress:
        out_time = _out_time(self._block)
        expected = self.expected_duration_seconds
        if done:
            self._percent = 100.0
        elif out_time is not None and expected:
            self._percent = max(self._percent, min(100.0, max(0.0, 100.0 * out_time / expected)))
        return Progress(
            percent=round(self._percent, 2),
            out_time_seconds=None if out_time is None else max(0.0, out_time),
            fps=_float(self._block.get("fps")),
            speed=_float(self._block.get("speed", "").rstrip("x")),
            done=done,
        )


def _out_time(block: dict[str, str]) -> float | None:
    """Output time in seconds: ``out_time_us``, else ``out_time_ms`` (also microseconds), else the clock."""
    for key in ("out_time_us", "out_time_ms"):
        micros = _float(block.get(key))
        if micros is not None:
            return micros / 1_000_000
    m = _CLOCK.fullmatch(block.get("out_time", ""))
    if not m:
        return None
    seconds = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
    return -seconds if m.group(1) else seconds


def _float(value: str | None) -> float | None:
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        return None  # "N/A" and anything else that is not a number
    return number if math.isfinite(number) else None
