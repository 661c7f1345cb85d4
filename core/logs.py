"""Structured logs: one JSON object per line, carrying the job and trace id of the work it is about.

The job a line concerns is held in a context variable: :func:`job_context` sets it where a job's work
starts (the scheduler's attempt task, admission once a request names its job, settlement's per-job
steps), and every line logged inside, by any module, carries ``job`` and ``trace_id``. The trace id is
derived from the job id (the first 128 bits of its sha256, W3C trace-context sized), so the admission,
the run and the settlement of one job share it across restarts without being stored anywhere.

Nothing secret is logged: keys are never handed to a logger (tests read a whole job's log for the node's
key material).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from core.defaults import DEFAULT_LOG_REPEAT_BURST, DEFAULT_LOG_REPEAT_WINDOW_SECONDS

LogFormat = Literal["json", "text"]

_JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("hearth_job", default=None)
# LogRecord's own attributes: everything else on a record came through ``extra=`` and is logged as a field.
_STANDARD: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def trace_id_for(job: str) -> str:
    """The trace id of a job's whole life: 32 hex digits, the same wherever and whenever it is computed."""
    return hashlib.sha256(job.encode()).hexdigest()[:32]


@contextlib.contextmanager
def job_context(job: str) -> Iterator[None]:
    """Within this block (and tasks it starts), log lines carry ``job`` and its ``trace_id``."""
    token = _JOB.set(job)
    try:
        yield
    finally:
        _JOB.reset(token)


def enter_job(job: str) -> None:
    """Mark the rest of the current task as ``job``'s work (a request handler, once it knows its job)."""
    _JOB.set(job)


def current_job() -> str | None:
    return _JOB.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, job, trace id and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        job = getattr(record, "job", None) or _JOB.get()
        if job is not None:
            doc["job"] = str(job)
            doc["trace_id"] = trace_id_for(str(job))
        for key, value in record.__dict__.items():
            # a private attribute is no ``extra`` (libraries stamp their own on every record)
            if key not in _STANDARD and key not in doc and not key.startswith("_"):
                doc[key] = value if isinstance(value, int | float | bool | type(None)) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """The human format, with the job appended when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job = getattr(record, "job", None) or _JOB.get()
        return f"{text} [job {job}]" if job is not None else text


_transitions = logging.getLogger("hearth.jobs")


def log_transition(event: Any) -> None:
    """A journal listener (:meth:`node.journal.Journal.add_listener`): one line per state change of a job."""
    if event.type != "transition" or not _transitions.isEnabledFor(logging.INFO):
        return  # (a node logging at WARNING builds no line for each of its transitions)
    fields: dict[str, Any] = {"job": event.job, "from_state": event.from_state, "to_state": event.to_state}
    if event.domain is not None:
        fields |= {"domain": event.domain, "retryable": event.retryable}
    _transitions.info(
        "%s -> %s (%s): %s", event.from_state or "-", event.to_state, event.actor, event.reason, extra=fields
    )


@dataclass
class _Window:
    start: float
    passed: int = 1
    suppressed: int = 0


class RepeatFilter(logging.Filter):
    """Lets ``burst`` warnings or errors of one kind through per ``window`` seconds and counts the rest.

    A fault that repeats in a loop (``accept()`` failing with EMFILE once the descriptors run out, a
    client sending garbage) must not fill the disk: the operator needs the first lines, and how many
    more there were. A kind is the logger, the level and the message template (before ``%`` formatting).
    The first line of a kind after its window carries ``suppressed`` (how many were dropped before it);
    a kind that does not recur is reported by a summary line once its window has passed and the next
    line of any kind is logged. Lines below WARNING (job transitions, the audit trail) always pass.
    """

    def __init__(
        self,
        burst: int = DEFAULT_LOG_REPEAT_BURST,
        window: float = DEFAULT_LOG_REPEAT_WINDOW_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 1024,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self._clock = clock
        self._max_kinds = max_kinds
        self._kinds: dict[tuple[str, int, str], _Window] = {}
        self._next_sweep = clock() + window
        self._handler: logging.Handler | None = None

    def attach(self, handler: logging.Handler) -> None:
        """Filter ``handler``'s records; summaries of dropped lines are emitted through it."""
        self._handler = handler
        handler.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_summary", False):
            return True
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        if record.levelno < logging.WARNING:
            return True
        kind = (record.name, record.levelno, str(record.msg)[:200])
        seen = self._kinds.get(kind)
        if seen is None or now - seen.start >= self.window:
            if seen is not None and seen.suppressed:
                record.suppressed = seen.suppressed
            if seen is None and len(self._kinds) >= self._max_kinds:
                self._kinds.pop(next(iter(self._kinds)))  # the table is bounded too; counts may be lost
            self._kinds[kind] = _Window(start=now)
            return True
        if seen.passed < self.burst:
            seen.passed += 1
            return True
        seen.suppressed += 1
        return False

    def _sweep(self, now: float) -> None:
        """Report and forget the kinds whose window has passed."""
        self._next_sweep = now + self.window
        for kind, seen in list(self._kinds.items()):
            if now - seen.start < self.window:
                continue
            del self._kinds[kind]
            if seen.suppressed and self._handler is not None:
                name, level, template = kind
                summary = logging.LogRecord(
                    "hearth.logs",
                    level,
                    __file__,
                    0,
                    "similar lines suppressed: %d",
                    (seen.suppressed,),
                    None,
                )
                summary.repeat_summary = True
                summary.suppressed = seen.suppressed
                summary.of_logger = name
                summary.of_message = template
                self._handler.handle(summary)


def configure_logging(
    level: str = "INFO",
    fmt: LogFormat = "json",
    *,
    repeat_burst: int = DEFAULT_LOG_REPEAT_BURST,
    repeat_window_seconds: float = DEFAULT_LOG_REPEAT_WINDOW_SECONDS,
) -> None:
    """Send every logger's lines to stderr in ``fmt``, repeats limited; called once by ``hearth run``."""
    handler = logging.StreamHandler()
    RepeatFilter(repeat_burst, repeat_window_seconds).attach(handler)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
