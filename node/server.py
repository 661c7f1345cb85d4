"""The HTTP API of docs/protocol.md (aiohttp).

Errors leave in one shape, made in one place (:func:`error_middleware`): ``{"error": {code, domain,
message, retryable, details}}`` with the status the error names. Bodies are capped before they are
read; signed requests arrive as ``application/jwt`` (or JSON wrapping the token for POST /v1/jobs).
Documents others rely on (quotes, status, results, the capacity offer) are signed by the node DID.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from core.errors import CapacityError, HearthError, NotFoundError, RequestError, SettlementError
from core.journal import Event, JobRecord
from core.lifecycle import MAX_EVENT_SEQ, STREAM_END_STATES
from core.untrusted import UntrustedJSONError, parse_json
from node.daemon import Node
from node.http_errors import CLIENT_CLOSED, KEPT_HEADERS, error_body, error_response, http_error
from node.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from node.openapi import openapi_document
from node.overview import add_routes as add_overview_routes
from payments.signing import signed_document
from storage import add_routes as add_storage_routes

log = logging.getLogger("hearth.http")

NODE: web.AppKey[Node] = web.AppKey("node", Node)
SSE_HEARTBEAT_SECONDS = 15.0
# An event stream reads the journal this many events at a time: a job's history (a progress event every
# second it runs) may hold far more, and a stream's memory stays bounded however long it is.
EVENT_PAGE_SIZE = 500
# After the drain, requests still in flight (event streams that follow a queued job) get this long once
# the listener is closed; then they are cut (a stream resumes with Last-Event-ID on the next start).
HTTP_SHUTDOWN_SECONDS = 5.0
# Allocations (less deallocations) between collections of the youngest generation in the daemon (Python's
# default is 700; see serve()).
GC_YOUNG_THRESHOLD = 5000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    node = request.app[NODE]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
        # a handler may have read what a concurrent request's group commit has yet to make durable
        await node.settled()
    except HearthError as exc:
        response = error_response(node.metrics, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(node.metrics, http_error(exc))
        for name in KEPT_HEADERS:
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if isinstance(exc, ConnectionError) and (request.transport is None or request.transport.is_closing()):
            # the client left mid-request: nothing is wrong here and nobody reads the answer; counted as
            # 499 (the status proxies use for it)
            response = error_response(node.metrics, CLIENT_CLOSED)
        else:
            log.exception("unhandled error on %s %s", request.method, request.path)
            response = error_response(
                node.metrics, HearthError("internal_error", "the node failed to handle the request")
            )
    node.metrics.http_request(route, response.status)
    return response


async def read_body(request: web.Request) -> bytes:
    """The body, refused with 413 from Content-Length before a byte is read when it is over the cap, and
    with 408 ``body_timeout`` when it does not arrive whole within ``[api] body_timeout_seconds`` (a
    client trickling a body must not hold a connection and a handler for as long as it likes)."""
    api = request.app[NODE].cfg.api
    cap = api.max_body_bytes
    if request.content_length is not None and request.content_length > cap:
        raise RequestError(
            "body_too_large",
            f"the body is {request.content_length} bytes; this node accepts at most {cap}",
            details={"max_bytes": cap},
        )
    try:
        if request.content.is_eof():  # the whole body is here already (the usual case): no wait to bound
            return await request.read()
        async with asyncio.timeout(api.body_timeout_seconds):
            return await request.read()
    except TimeoutError:
        raise RequestError(
            "body_timeout",
            f"the body did not arrive within {api.body_timeout_seconds:g} s",
            details={"timeout_seconds": api.body_timeout_seconds},
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(
            "body_too_large", f"the body exceeds {cap} bytes", details={"max_bytes": cap}
        ) from None


def json_body(raw: bytes) -> Any:
    """A JSON body, parsed within the bounds of :func:`core.untrusted.parse_json` (depth, numbers,
    duplicate names, Unicode); anything else is a 400 ``malformed_json`` naming the bound."""
    try:
        return parse_json(raw)
    except UntrustedJSONError as exc:
        raise RequestError(
            "malformed_json",
            f"the body is not JSON within this node's bounds: {exc.message}",
            details={"bound": exc.reason},
        ) from None


def _token_from_text(raw: bytes) -> str:
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise RequestError("malformed_body", "a JWT body must be ASCII") from None
    if not token:
        raise RequestError("empty_body", "the request body is empty; send a signed request (JWT)")
    return token


async def read_signed(request: web.Request) -> tuple[str, dict[str, Any]]:
    """The signed request token and, for JSON bodies, the rest of the object (quote, funding)."""
    raw = await read_body(request)
    if request.content_type == "application/json":
        doc = json_body(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("request"), str):
            raise RequestError("malformed_body", "a JSON body must be an object with a 'request' JWT string")
        if doc.get("quote") is not None and not isinstance(doc["quote"], str):
            raise RequestError("malformed_body", "'quote' must be a JWT string")
        return doc["request"], doc
    if request.content_type in ("application/jwt", "text/plain", "application/octet-stream", ""):
        return _token_from_text(raw), {}
    raise RequestError(
        "unsupported_media_type",
        f"send application/jwt or application/json, not {request.content_type}",
    )


# -- views --------------------------------------------------------------------------------------------


def job_view(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id,
        "job_id": job.job_id,
        "requester": job.iss,
        "kind": job.kind,
        "state": job.state,
        "price": job.price,
        "currency": "usdc",
        "quote_id": job.quote_id,
        "quote_expires_at": job.quote_expires_at,
        "envelope_hash": job.envelope_hash,
        "attempts": job.attempts,
        "failure": job.failure,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


def signed(node: Node, kind: str, subject: str, document: dict[str, Any]) -> dict[str, Any]:
    """``document`` plus ``jwt``: the same document signed by the node DID under the claim ``kind``."""
    return signed_document(node.signer, kind, subject, document, now=node.now())


# -- handlers -----------------------------------------------------------------------------------------


def refuse_while_draining(node: Node) -> None:
    """Raise the retryable 503 ``draining`` once SIGTERM began the drain: the node takes no new work.

    Jobs already accepted keep their state and run after the next start; the requester may retry this
    request later, or elsewhere.
    """
    if node.draining:
        raise CapacityError("draining", "the node is shutting down and takes no new work; retry later")


async def post_quote(request: web.Request) -> web.Response:
    node = request.app[NODE]
    refuse_while_draining(node)
    token, _ = await read_signed(request)
    with node.metrics.admission_timer("quote").time():
        quote = await node.admission.quote(token)
    return json_response(
        {
            "quote": quote.claims["quote"],
            "jwt": quote.jwt,
            "job": job_view(quote.job),
            "reused": quote.reused,
        },
        status=200 if quote.reused else 201,
    )


async def post_job(request: web.Request) -> web.Response:
    node = request.app[NODE]
    refuse_while_draining(node)
    token, doc = await read_signed(request)
    with node.metrics.admission_timer("submit").time():
        result = await node.admission.submit(token, doc.get("quote"), doc.get("funding"))
    body = signed(
        node, "status", result.job.id, {"job": job_view(result.job), "accepted_now": result.accepted_now}
    )
    return json_response(body, status=201 if result.accepted_now else 200)


def _job(request: web.Request) -> JobRecord:
    node = request.app[NODE]
    job_key = request.match_info["id"]
    job = node.journal.get(job_key)
    if job is None:
        raise NotFoundError("job_not_found", f"no job {job_key} on this node", details={"job": job_key})
    return job


def full_job_view(node: Node, job: JobRecord) -> dict[str, Any]:
    """The status of one job: its view, envelope, webhook delivery and (with a chain) its payment."""
    settlement = node.settlement
    return {
        **job_view(job),
        "envelope": job.envelope,
        "payment": None if settlement is None else settlement.view(job.id),
        "webhook": node.journal.webhook(job.id),
        "validation_notice": node.journal.notice(job.id),
    }


async def get_job(request: web.Request) -> web.Response:
    node = request.app[NODE]
    job = _job(request)
    return json_response(signed(node, "status", job.id, {"job": full_job_view(node, job)}))


async def post_receipt(request: web.Request) -> web.Response:
    node = request.app[NODE]
    job_key = request.match_info["id"]
    raw = await read_body(request)
    if request.content_type != "application/json":
        raise RequestError("unsupported_media_type", "send the receipt as application/json")
    doc = json_body(raw)
    if node.settlement is None:
        node.journal.require(job_key)
        raise SettlementError(
            "payments_not_configured", "this node has no chain configured; it takes no receipts"
        )
    job, recorded = await node.settlement.accept_receipt(job_key, doc)
    return json_response(
        signed(node, "status", job.id, {"job": full_job_view(node, job)}), status=202 if recorded else 200
    )


async def get_result(request: web.Request) -> web.Response:
    node = request.app[NODE]
    job = _job(request)
    if job.result_json is None:
        raise RequestError(
            "result_not_ready",
            f"job {job.id} is {job.state}; it has no result yet",
            retryable=job.state not in STREAM_END_STATES,
            details={"job": job.id, "state": job.state},
        )
    return json_response(signed(node, "result", job.id, {"result": json.loads(job.result_json)}))


async def post_cancel(request: web.Request) -> web.Response:
    node = request.app[NODE]
    job_key = request.match_info["id"]
    token, _ = await read_signed(request)
    job, outcome = await node.admission.cancel(job_key, token)
    return json_response(signed(node, "status", job.id, {"job": job_view(job), "outcome": outcome}))


_EVENT_SEQ_RE = re.compile(r"[0-9]{1,19}")
_FOLLOW_VALUES = {"true": True, "false": False}


def _after_seq(request: web.Request) -> int:
    """``Last-Event-ID`` (which wins) or ``?after=``: a decimal event position, 0 to :data:`MAX_EVENT_SEQ`."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    if _EVENT_SEQ_RE.fullmatch(raw) is None or int(raw) > MAX_EVENT_SEQ:
        raise RequestError(
            "invalid_query",
            f"'after' / Last-Event-ID must be an event position from 0 to {MAX_EVENT_SEQ}",
            details={"parameter": "after", "max": MAX_EVENT_SEQ},
        )
    return int(raw)


def _follow(request: web.Request) -> bool:
    raw = request.query.get("follow", "true")
    if raw not in _FOLLOW_VALUES:
        raise RequestError("invalid_query", "'follow' must be true or false", details={"parameter": "follow"})
    return _FOLLOW_VALUES[raw]


async def get_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: the job's past events after ``after``/Last-Event-ID, then live ones.

    The journal is the stream's only source, read a page of :data:`EVENT_PAGE_SIZE` events at a time however
    long the job's history; the hub's queue only wakes a following stream, so a queue that overflowed
    loses nothing.
    """
    node = request.app[NODE]
    job = _job(request)
    after = _after_seq(request)
    follow = _follow(request)
    hub = request.app[EVENT_HUB]
    queue = hub.subscribe(job.id)  # before the first read: nothing committed after it goes unnoticed
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    try:
        await response.prepare(request)
        last = after
        while True:
            # the state before the pages: they then hold the event that brought the job there
            state = node.journal.require(job.id).state
            last = await _send_backlog(response, node, job.id, last)
            if not follow or state in STREAM_END_STATES:
                break
            await _wait_for_news(response, queue, last)
        await response.write_eof()
        return response
    except ConnectionResetError:  # the client went away: the stream simply ends
        return response
    except HearthError as exc:
        if not response.prepared:
            raise
        # the status line is gone: the error travels as the stream's last event, in the usual shape
        log.warning("event stream of %s ended by %s", job.id, exc.code)
        with contextlib.suppress(ConnectionError):
            await response.write(b"event: error\ndata: " + error_body(exc) + b"\n\n")
            await response.write_eof()
        return response
    finally:
        hub.unsubscribe(job.id, queue)


async def _send_backlog(response: web.StreamResponse, node: Node, job: str, after: int) -> int:
    """Send ``job``'s committed events after ``after``, a page at a time; returns the last position sent."""
    last = after
    while True:
        page = node.journal.events(job, after_seq=last, limit=EVENT_PAGE_SIZE)
        await node.settled()  # only committed events go out (raises if the page was read from a failed group)
        for event in page:
            await _send_event(response, event)
            last = event.seq
        if len(page) < EVENT_PAGE_SIZE:
            return last


async def _wait_for_news(response: web.StreamResponse, queue: asyncio.Queue[Event], last: int) -> None:
    """Return once an event after ``last`` was journaled, or a heartbeat after nothing came.

    After a heartbeat the caller reads the journal again anyway: a cheap look that no wake-up can miss.
    """
    while True:
        try:
            async with asyncio.timeout(SSE_HEARTBEAT_SECONDS):  # not wait_for: see node.webhooks
                newest = (await queue.get()).seq
        except TimeoutError:
            await response.write(b": keepalive\n\n")
            return
        while not queue.empty():  # the wake-ups that piled up while the stream was writing
            newest = max(newest, queue.get_nowait().seq)
        if newest > last:
            return


async def _send_event(response: web.StreamResponse, event: Event) -> None:
    data = orjson.dumps(event.as_dict()).decode()
    await response.write(f"id: {event.seq}\nevent: {event.type}\ndata: {data}\n\n".encode())


async def get_capacity(request: web.Request) -> web.Response:
    """The node's signed offer (:mod:`provider.offers`): the same document the registries are pushed."""
    return json_response(request.app[NODE].offers.issue())


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    refuse_while_draining(node)
    if not node.ready:
        raise HearthError("not_ready", "the node is starting", retryable=True)
    return json_response({"status": "ready", "node": node.did})


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    free = node.ledger.free()
    node.metrics.capacity_free.labels("cpus").set(free.cpus)
    node.metrics.capacity_free.labels("memory_mb").set(free.memory_mb)
    node.metrics.capacity_free.labels("gpus").set(free.gpus)
    scheduler = node.scheduler
    node.metrics.queue_depth.set(scheduler.queue_depth if scheduler is not None else 0)
    node.metrics.jobs_running.set(len(scheduler.running) if scheduler is not None else 0)
    stats = await asyncio.to_thread(node.store.stats)
    node.metrics.stored.labels("bytes").set(stats.bytes)
    node.metrics.stored.labels("blocks").set(stats.blocks)
    return web.Response(body=node.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


# -- events fan-out -----------------------------------------------------------------------------------


class EventHub:
    """Fans journal events out to the SSE streams watching each job."""

    def __init__(self) -> None:
        self._subs: dict[str, set[asyncio.Queue[Event]]] = {}

    def subscribe(self, job: str) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=1000)
        self._subs.setdefault(job, set()).add(queue)
        return queue

    def unsubscribe(self, job: str, queue: asyncio.Queue[Event]) -> None:
        subs = self._subs.get(job)
        if subs is not None:
            subs.discard(queue)
            if not subs:
                del self._subs[job]

    def publish(self, event: Event) -> None:
        for queue in self._subs.get(event.job, ()):
            with contextlib.suppress(asyncio.QueueFull):  # a full queue already wakes its reader
                queue.put_nowait(event)


EVENT_HUB: web.AppKey[EventHub] = web.AppKey("event_hub", EventHub)
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi", dict)


def build_app(node: Node, *, manage_node: bool = True) -> web.Application:
    """The aiohttp application; with ``manage_node`` its lifetime starts and stops the node."""
    app = web.Application(middlewares=[error_middleware], client_max_size=node.cfg.api.max_body_bytes)
    app[NODE] = node
    app[EVENT_HUB] = EventHub()
    app[OPENAPI] = openapi_document()

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        if manage_node:
            await node.start()
        node.journal.add_listener(app[EVENT_HUB].publish)
        yield
        if manage_node:
            await node.stop()

    app.cleanup_ctx.append(lifetime)
    r = app.router
    r.add_post("/v1/quotes", post_quote)
    r.add_post("/v1/jobs", post_job)
    r.add_get("/v1/jobs/{id}", get_job)
    r.add_get("/v1/jobs/{id}/result", get_result)
    r.add_get("/v1/jobs/{id}/events", get_events)
    r.add_post("/v1/jobs/{id}/cancel", post_cancel)
    r.add_post("/v1/jobs/{id}/receipt", post_receipt)
    r.add_get("/v1/capacity", get_capacity)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi)
    add_storage_routes(app, node.store, node.cfg.storage)
    add_overview_routes(app, node)
    return app


async def serve(
    node: Node,
    host: str,
    port: int,
    *,
    on_ready: Callable[[int], None] | None = None,
    drain: asyncio.Event | None = None,
) -> None:
    """Run the API until ``drain`` is set or the task is cancelled (the caller handles the signals).

    Once ``drain`` is set the node drains (:meth:`Node.drain`: no new work, running jobs get
    ``[scheduler] drain_grace_seconds``) while the API still answers, then everything closes. Cancelling
    (a second SIGTERM) cuts the drain short: what still runs is stopped and retried by the next start.
    """
    from node.http_guard import ConnectionGuard, GuardedSite, descriptor_budget

    # connection cap, header and idle timeouts, parser errors in the error shape (node/http_guard.py)
    guard = ConnectionGuard(node.cfg.api, descriptor_budget(node.cfg.api), node.metrics)
    app = build_app(node)
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=HTTP_SHUTDOWN_SECONDS, **guard.handler_kwargs
    )
    await runner.setup()  # starts the node: config, journal, ledger, executors, caches
    # The cyclic collector, tuned for a daemon: what start-up made lives as long as the process, so full
    # collections need not walk it again (frozen); and a request allocates a few hundred containers that
    # reference counting frees, so the youngest generation is collected every GC_YOUNG_THRESHOLD allocations
    # rather than every 700. Together they cut the collector's part of a request's CPU to about a quarter.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    collector = guard.collector()
    node.metrics.registry.register(collector)
    site = GuardedSite(runner, guard, host, port)
    try:
        await site.start()
        bound = port
        for address in runner.addresses:  # the port actually bound (port 0 picks a free one)
            bound = int(address[1])
            break
        node.listen_url = f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
        if on_ready is not None:
            on_ready(bound)
        budget = guard.budget
        limits = {"max_connections": guard.cap, "nofile": budget.soft, "reserved": budget.reserved}
        log.info("listening", extra={"host": host, "port": bound, "t": time.time()} | limits)
        await (drain or asyncio.Event()).wait()
        await node.drain(node.cfg.scheduler.drain_grace_seconds)
    finally:
        await runner.cleanup()
        node.metrics.registry.unregister(collector)
