"""The HTTP connection layer under hostile traffic: descriptors, connection cap, timeouts, parser errors.

aiohttp accepts every connection it is offered and keeps each until the client leaves; a client that
opens connections and sends nothing (or one header byte a second) used to exhaust the daemon's file
descriptors, and with them the journal, the Docker socket and the blockstore. This module keeps the
connection layer inside a budget that is decided once, at start:

- **Descriptors.** :func:`descriptor_budget` raises the soft ``RLIMIT_NOFILE`` to the hard limit (where
  the system allows it; the unit sets ``LimitNOFILE=`` so it need not) and derives the connection cap
  from it: ``[api] max_connections``, clamped to the soft limit less ``[api] reserved_descriptors`` (the
  journal, Docker, blockstore files, subprocesses, and the connections the event loop accepts in one
  burst before any of them is looked at).
- **Cap.** :class:`ConnectionGuard` counts the open connections. One over the cap closes the oldest
  connection that is idle (waiting for a request, with none in progress); when every connection is busy,
  the newcomer gets a 503 ``too_many_connections`` and is closed. Idle connections cannot crowd out
  requests, and the descriptor limit is never reached by connections.
- **Timeouts.** A request's headers must arrive within ``[api] header_timeout_seconds`` of its first byte
  (of the connection, for the first request), else 408 ``header_timeout`` and the connection closes;
  aiohttp has no such timer. A keep-alive connection idle for ``[api] idle_timeout_seconds`` is closed
  (aiohttp's ``keepalive_timeout``, which also bounds a new connection that never sends a byte).
- **Parser errors** (bad request line, over-long or too many headers, Content-Length with
  Transfer-Encoding, bad chunked framing, the bytes after a short Content-Length) are answered in the
  error shape of docs/protocol.md with a 4xx, counted in the HTTP metrics, and logged as one short warning
  that carries no client bytes (aiohttp logged them at error level with the offending bytes).

It reaches into aiohttp's :class:`~aiohttp.web_protocol.RequestHandler` (3.x) at a few attributes of its
protocol: ``_request_count`` (requests parsed on the connection), ``_waiter`` (pending while the
connection waits for its next request: aiohttp's own notion of idle), ``_messages`` (parsed requests not
yet handled), ``_request_in_progress`` and ``_lingering_time``. tests/node/test_hostile_connections.py
exercises each of them against a real daemon.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.http import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from core.config import ApiSection
from core.errors import HearthError, RequestError
from node.http_errors import BoundaryError, error_body, retry_after_header, status_of
from node.metrics import Metrics

log = logging.getLogger("hearth.http")

# The route label of requests refused before they had a route (the parser refused them).
MALFORMED_ROUTE = "malformed"
# The listen backlog, aiohttp's default. The event loop accepts up to this many connections in one go
# before any of them is counted, so the backlog is also kept within half of the descriptor reserve.
LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class DescriptorBudget:
    """What the process may open (``soft``/``hard`` RLIMIT_NOFILE after start) and the connection cap."""

    soft: int
    hard: int
    reserved: int
    cap: int


def connection_cap(soft: int, configured: int, reserved: int) -> tuple[int, int]:
    """``(cap, reserve)``: the configured cap clamped below the soft limit, less the reserve.

    A limit too small for the configured reserve keeps half of it for the rest of the node.
    """
    reserve = min(reserved, soft // 2)
    return max(1, min(configured, soft - reserve)), reserve


def descriptor_budget(api: ApiSection) -> DescriptorBudget:
    """Raise the soft descriptor limit to the hard one where allowed, and derive the connection cap.

    Under the unit the raise is refused (its seccomp filter denies ``@resources``) and unneeded:
    ``LimitNOFILE=`` sets both limits.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:
            log.info("the descriptor limit stays at %d: %s", soft, type(exc).__name__)
    effective = soft if soft != resource.RLIM_INFINITY else api.max_connections + api.reserved_descriptors
    cap, reserve = connection_cap(effective, api.max_connections, api.reserved_descriptors)
    if cap < api.max_connections:
        log.warning(
            "[api] max_connections %d is above what the descriptor limit allows: capped at %d",
            api.max_connections,
            cap,
            extra={"nofile_soft": soft, "reserved_descriptors": reserve},
        )
    return DescriptorBudget(soft=soft, hard=hard, reserved=reserve, cap=cap)


# -- refusals in the error shape ------------------------------------------------------------------------

# Substrings of aiohttp's own description (the text before the client's bytes) that tell the refusals
# apart; the code is ours, the description is never echoed.
_BAD_MESSAGE_CODES: tuple[tuple[str, int, str, str], ...] = (
    (
        "transfer-encoding can't be present",
        400,
        "conflicting_framing",
        "Content-Length and Transfer-Encoding must not both be sent",
    ),
    ("too many headers", 431, "too_many_headers", "the request has too many header fields"),
    ("chunk", 400, "bad_chunked_encoding", "the chunked body is malformed"),
    ("content-length", 400, "bad_content_length", "the Content-Length header is malformed"),
    ("transfer-encoding", 400, "bad_transfer_encoding", "the Transfer-Encoding header is not supported"),
)


def parser_refusal(exc: BaseException | None, max_line: int) -> RequestError:
    """The structured refusal of a request aiohttp's parser rejected, without any of the client's bytes."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return BoundaryError(
            "header_too_large",
            f"a request or header line is longer than {max_line} bytes",
            status=431,
            details={"max_line_bytes": max_line},
        )
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return RequestError("bad_method", "the request method is not an HTTP token")
    if isinstance(exc, http_exceptions.BadStatusLine):
        return RequestError("bad_request_line", "the request line is not 'METHOD target HTTP/1.x'")
    if isinstance(exc, http_exceptions.InvalidURLError):
        return RequestError("bad_target", "the request target is not a valid URL")
    if isinstance(exc, http_exceptions.InvalidHeader):
        return RequestError("bad_header", "a header field is malformed")
    if isinstance(exc, http_exceptions.TransferEncodingError):
        return RequestError("bad_chunked_encoding", "the chunked body is malformed")
    if isinstance(exc, http_exceptions.ContentLengthError):
        return RequestError("bad_content_length", "the body does not match its Content-Length")
    if isinstance(exc, http_exceptions.HttpProcessingError):
        described = exc.message.split(":", 1)[0].lower()
        for needle, status, code, message in _BAD_MESSAGE_CODES:
            if needle in described:
                return BoundaryError(code, message, status=status)
    return RequestError("malformed_request", "the request is not valid HTTP/1.1")


_REASONS = {408: "Request Timeout", 503: "Service Unavailable"}


def raw_response(error: HearthError) -> bytes:
    """A whole HTTP/1.1 response carrying ``error``, for a connection no handler runs on."""
    body = error_body(error)
    head = [
        f"HTTP/1.1 {status_of(error)} {_REASONS.get(status_of(error), 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    retry_after = retry_after_header(error)
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# -- the guard ------------------------------------------------------------------------------------------


class ConnectionGuard:
    """The open connections of one listener, the cap on them, and what was closed and why."""

    def __init__(self, api: ApiSection, budget: DescriptorBudget, metrics: Metrics | None = None) -> None:
        self.api = api
        self.budget = budget
        self.cap = budget.cap
        self.metrics = metrics
        # accept order: the front is the oldest; busy connections met while looking for an idle one move
        # to the back, so a search is short however many long requests (event streams) are open
        self._open: OrderedDict[GuardedRequestHandler, None] = OrderedDict()
        self.closed: dict[str, int] = {"header_timeout": 0, "evicted": 0, "refused": 0}

    @property
    def handler_kwargs(self) -> dict[str, Any]:
        """What aiohttp's RequestHandler takes from the config (AppRunner passes the same to its Server)."""
        return {
            "access_log": None,
            "keepalive_timeout": self.api.idle_timeout_seconds,
            "max_line_size": self.api.max_header_line_bytes,
            "max_field_size": self.api.max_header_line_bytes,
        }

    @property
    def backlog(self) -> int:
        return max(8, min(LISTEN_BACKLOG, self.budget.reserved // 2))

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: GuardedRequestHandler) -> bool:
        """Count ``conn`` in; at the cap, close the oldest idle connection, or refuse ``conn`` (False)."""
        if len(self._open) >= self.cap:
            victim = self._oldest_idle()
            if victim is None:
                self.closed["refused"] += 1
                log.warning(
                    "refused a connection: %d connections open, all busy",
                    len(self._open),
                    extra={"cap": self.cap},
                )
                return False
            self.closed["evicted"] += 1
            log.warning(
                "closed the oldest idle connection: %d connections open (the cap)",
                len(self._open),
                extra={"cap": self.cap},
            )
            self.release(victim)
            victim.force_close()
        self._open[conn] = None
        return True

    def release(self, conn: GuardedRequestHandler) -> None:
        self._open.pop(conn, None)

    def _oldest_idle(self) -> GuardedRequestHandler | None:
        for _ in range(len(self._open)):
            conn = next(iter(self._open))
            if conn.idle:
                return conn
            self._open.move_to_end(conn)
        return None

    def header_timed_out(self) -> None:
        self.closed["header_timeout"] += 1
        log.warning(
            "closed a connection: request headers incomplete after %ss",
            self.api.header_timeout_seconds,
            extra={"code": "header_timeout"},
        )

    def refused_request(self, error: HearthError, peer: str | None, *, count: bool = True) -> None:
        """A request the parser refused: one short line (no client bytes) and, with ``count``, the HTTP
        metrics (without it the error middleware answers the refusal and counts it)."""
        log.warning(
            "refused a malformed request: %s",
            error.code,
            extra={"code": error.code, "status": status_of(error), "peer": peer or "-"},
        )
        if count and self.metrics is not None:
            self.metrics.http_requests.labels(MALFORMED_ROUTE, str(status_of(error))).inc()
            self.metrics.error(error.domain, error.code)

    def collector(self) -> Collector:
        return _GuardCollector(self)


class _GuardCollector(Collector):
    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def collect(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        g = self._guard
        open_ = GaugeMetricFamily("hearth_http_connections", "Open HTTP connections")
        open_.add_metric([], len(g))
        cap = GaugeMetricFamily(
            "hearth_http_connection_cap", "Most HTTP connections open at once (from RLIMIT_NOFILE)"
        )
        cap.add_metric([], g.cap)
        closed = CounterMetricFamily(
            "hearth_http_connections_closed",
            "HTTP connections the node closed: header_timeout, evicted (idle, at the cap), refused (cap)",
            labels=["reason"],
        )
        for reason, n in sorted(g.closed.items()):
            closed.add_metric([reason], n)
        return [open_, cap, closed]


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol with the guard's cap, a header timeout, and parser errors in the error shape."""

    __slots__ = ("_body", "_guard", "_header_timer")

    def __init__(self, manager: Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None

    @property
    def idle(self) -> bool:
        """No request in progress or queued: nothing is lost by closing the connection now."""
        if self._force_close:
            return True
        if self._request_count == 0:
            return True  # aiohttp's start() may not have run yet
        return self._waiter is not None and not self._waiter.done()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._guard.admit(self):
            refusal = BoundaryError(
                "too_many_connections",
                "the node has as many connections open as it allows; retry shortly",
                status=503,
                retryable=True,
                details={"max_connections": self._guard.cap, "retry_after_seconds": 1},
            )
            if self.transport is not None:
                self.transport.write(raw_response(refusal))
            self.force_close()  # flushes the answer, then closes
            return
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        self._guard.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        if data and self._header_timer is None and self.idle:
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        parsed, queued = self._request_count, len(self._messages)
        super().data_received(data)
        if self._request_count == parsed:
            return
        self._cancel_header_timer()
        new = list(self._messages)[queued:]
        message, payload = new[-1] if new else (None, None)
        if isinstance(message, RawRequestMessage):
            self._body = payload  # the body the parser reads next
        elif message is not None:
            self._fail_body(getattr(message, "exc", None))

    def _fail_body(self, exc: BaseException | None) -> None:
        """A framing error inside a request's body reaches the handler reading that body.

        aiohttp queues the error as if it were a next request and leaves the handler waiting for a body
        that never completes; instead the handler's read fails with the structured refusal (the error
        middleware answers it), and the connection closes after that answer.
        """
        body, self._body = self._body, None
        if body is None or body.is_eof():
            return  # between requests: the queued error is answered as one (handle_error)
        self._messages.pop()
        refusal = parser_refusal(exc, self.max_line_size)
        if self._request_in_progress or any(payload is body for _, payload in self._messages):
            self._guard.refused_request(refusal, self.peer_host, count=False)
            body.set_exception(refusal)  # its handler reads it, or will
            self._lingering_time = 0.0  # nothing more is read from this connection
            self.close()
        else:  # answered already; aiohttp is draining the unread body: stop, and close
            self._guard.refused_request(refusal, self.peer_host)
            body.feed_eof()
            self.force_close()

    @property
    def peer_host(self) -> str | None:
        peer = self.peername
        return str(peer[0]) if isinstance(peer, tuple) else None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        timeout = self._guard.api.header_timeout_seconds
        self._header_timer = self._loop.call_later(timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._force_close or not self.idle or self.transport is None:
            return
        self._guard.header_timed_out()
        timeout = self._guard.api.header_timeout_seconds
        refusal = BoundaryError(
            "header_timeout",
            f"the request headers did not arrive within {timeout} s",
            status=408,
            retryable=True,
            details={"header_timeout_seconds": timeout},
        )
        self.transport.write(raw_response(refusal))
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer in the error shape: a parser refusal (4xx) or a failure outside the error middleware."""
        if request.writer.output_size > 0:  # a response is under way: the connection is beyond repair
            raise ConnectionError("the response has started; the error cannot be sent")
        error: HearthError
        if status >= 500:
            log.error("request failed outside the error middleware (%d)", status, exc_info=exc)
            error = BoundaryError(
                "internal_error", "the node failed to handle the request", status=status, domain="internal"
            )
        else:
            error = parser_refusal(exc, self.max_line_size)
            self._guard.refused_request(error, request.remote)
        response = web.Response(
            body=error_body(error), status=status_of(error), content_type="application/json"
        )
        response.force_close()
        return response


class GuardedSite(web.BaseSite):
    """A TCP listener of ``runner`` whose connections are :class:`GuardedRequestHandler` under ``guard``."""

    def __init__(self, runner: web.BaseRunner, guard: ConnectionGuard, host: str, port: int) -> None:
        super().__init__(runner, backlog=guard.backlog)
        self._guard = guard
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()  # registers the site with its runner, which stops it at cleanup
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None  # BaseSite refuses a runner that is not set up
        kwargs = self._guard.handler_kwargs

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, self._guard, loop=loop, **kwargs)

        factory: Callable[[], asyncio.BaseProtocol] = protocol
        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
