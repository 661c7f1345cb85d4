"""Bounded handling of a container's output streams: stdout split into lines, a tail of stderr.

Both are bounded so that a workload printing without end (or without newlines) costs the node a fixed
amount of memory, however much it writes.
"""

from __future__ import annotations

MAX_LINE_BYTES = 64 * 1024  # a longer stdout "line" is passed on in pieces of this size


class LineSplitter:
    """Turns chunks of bytes into complete text lines, keeping at most ``max_line_bytes`` pending."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._max = max_line_bytes
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[str]:
        """The lines completed by ``chunk`` (without their newline), in order."""
        self._pending += chunk
        *complete, rest = self._pending.split(b"\n")
        lines = [_text(line) for line in complete]
        while len(rest) > self._max:
            lines.append(_text(rest[: self._max]))
            rest = rest[self._max :]
        self._pending = bytearray(rest)
        return lines

    def flush(self) -> list[str]:
        """The unterminated last line, if any (the stream has ended)."""
        rest, self._pending = self._pending, bytearray()
        return [_text(rest)] if rest else []


class Tail:
    """The last ``limit`` bytes written to a stream, as text for error details."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        if len(self._buf) > self._limit:
            del self._buf[: len(self._buf) - self._limit]

    def text(self) -> str:
        return _text(self._buf).rstrip()


def _text(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", errors="replace").rstrip("\r")
