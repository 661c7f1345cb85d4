"""``hearth validator run``: the validator as a daemon, so a paid round settles with no person in it.

A node whose job names ``validation.validator_url`` sends, once the job is completed, a notice: a JWT
signed by the node DID (``Content-Type: application/jwt``) with ``aud`` = this validator's DID, a fresh
``jti``, ``job`` (the node's job id) and ``node`` (the node's endpoint). ``POST /v1/validations`` checks
it as a node checks a request (:class:`payments.jwt.RequestVerifier`: shape, signature, audience, times,
replay), within a bounded body and the untrusted-JSON limits, and answers 202 (recorded) or 200 (a job
already known: its stored state and verdict). Every refusal is a structured 4xx and records nothing.

The work then runs in the background, each step recorded first (:mod:`validator.verdicts`)::

    accepted -> validating     validator.validate.validate(post=False), exactly as `hearth validate`
    validating -> judged       the signed receipt and the report stored, before anything is sent
    judged -> posted           the stored receipt POSTed to the node (idempotent there: 200 when known)

A node that cannot be reached (or answers 5xx, or a retryable refusal) is tried again with exponential
backoff, for as long as it takes; a restart resumes every open row. A job that cannot be judged ends
``refused`` with no receipt. ``/healthz`` and ``/metrics`` (Prometheus text) serve the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from core.errors import AuthError, ConflictError, HearthError, PolicyError, RequestError
from core.faults import NO_FAULTS, FaultPoints
from core.logs import job_context
from core.netpolicy import AddressNotAllowed, AddressPolicy
from payments.jwt import RequestVerifier
from payments.keys import EthSigner
from requester.client import NodeClient, NodeError, NodeUnreachable
from validator.validate import receipt_body, validate
from validator.verdicts import NoticeRow, VerdictStore

log = logging.getLogger("hearth.validator")

MAX_NOTICE_BYTES: Final = 16 * 1024  # a notice is a few hundred bytes of JWT
BODY_TIMEOUT_SECONDS: Final = 10.0
MAX_LIFETIME_SECONDS: Final = 3600  # the node signs notices for an hour (node.webhooks)
CLOCK_SKEW_SECONDS: Final = 60
MAX_CONCURRENT_JOBS: Final = 4
BACKOFF_BASE_SECONDS: Final = 1.0
DEFAULT_BACKOFF_MAX_SECONDS: Final = 60.0
NODE_TIMEOUT: Final = aiohttp.ClientTimeout(total=300, sock_connect=10)
JOB_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
ENDPOINT: Final = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(/[^\s#?]*)?$")
MAX_ENDPOINT_LENGTH: Final = 2048

# Fault points (core.faults) a crash test may stop the process at.
VALIDATING: Final = "validator.validating"  # recorded validating, nothing judged yet
JUDGED: Final = "validator.judged"  # the receipt stored, not yet posted

# The status of each refusal this service makes (the node's boundary does the same for its own).
_STATUS_BY_CODE: Final = {
    "malformed_jwt": 400,
    "unsupported_alg": 400,
    "missing_claim": 400,
    "invalid_did": 400,
    "unsupported_did_method": 400,
    "unsupported_key_type": 400,
    "wrong_audience": 403,
    "replayed_jti": 409,
    "body_timeout": 408,
    "body_too_large": 413,
    "unsupported_media_type": 415,
}


def status_of(exc: HearthError) -> int:
    """The HTTP status of a refusal, as the node's boundary gives it: by code, else 401 for a token, 403
    a policy, 409 a conflict, 400 anything else."""
    if exc.code in _STATUS_BY_CODE:
        return _STATUS_BY_CODE[exc.code]
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, PolicyError):
        return 403
    return 409 if isinstance(exc, ConflictError) else 400


def error_response(exc: HearthError) -> web.Response:
    """``{"error": {...}}`` with the refusal's status (docs/protocol.md's one shape)."""
    body = orjson.dumps(exc.to_dict(), default=str)
    return web.Response(body=body, status=status_of(exc), content_type="application/json")


# aiohttp's own refusals, in the one error shape (the node's boundary names them the same)
_HTTP_CODES: Final = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every refusal as ``{"error": {...}}``: aiohttp's own (no route, wrong method) and any bug (500)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        body = {
            "error": {
                "code": code,
                "domain": "request",
                "message": exc.reason,
                "retryable": False,
                "details": {},
            }
        }
        return web.Response(body=orjson.dumps(body), status=exc.status, content_type="application/json")
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request %s %s failed", request.method, request.path)
        body = {
            "error": {"code": "internal_error", "domain": "internal", "message": "see the validator's log"}
        }
        return web.Response(body=orjson.dumps(body), status=500, content_type="application/json")


def json_response(doc: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


@dataclass(frozen=True, slots=True)
class Notice:
    """A verified notice: which node, which of its jobs, and where the node listens."""

    node_did: str
    job: str
    endpoint: str


class Metrics:
    """The service's counters, in one registry served by ``/metrics``."""

    def __init__(self, store: VerdictStore) -> None:
        self.registry = CollectorRegistry()
        self.notices = Counter(
            "hearth_validator_notices",
            "Notices received, by outcome (accepted, known, refused)",
            ["outcome"],
            registry=self.registry,
        )
        self.verdicts = Counter(
            "hearth_validator_verdicts",
            "Verdicts reached, by outcome (passed, failed, refused)",
            ["outcome"],
            registry=self.registry,
        )
        self.posts = Counter(
            "hearth_validator_posts",
            "Receipts posted to nodes, by outcome (accepted, refused, unreachable)",
            ["outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "hearth_validator_retries", "Tries scheduled again with backoff", registry=self.registry
        )
        jobs = Gauge(
            "hearth_validator_jobs", "Jobs in the store, by state", ["state"], registry=self.registry
        )
        for state in ("accepted", "validating", "judged", "posted", "refused"):
            jobs.labels(state).set_function(_count_of(store, state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _count_of(store: VerdictStore, state: str) -> Callable[[], float]:
    return lambda: float(store.counts().get(state, 0))


class ValidatorService:
    """The daemon: the HTTP app, the store and one background task per job in progress."""

    def __init__(
        self,
        signer: EthSigner,
        store: VerdictStore,
        *,
        allow_private_addresses: bool = False,
        backoff_max_seconds: float = DEFAULT_BACKOFF_MAX_SECONDS,
        faults: FaultPoints = NO_FAULTS,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.signer = signer
        self.did = signer.did
        self.store = store
        self.metrics = Metrics(store)
        self.policy = AddressPolicy.from_settings(allow_private=allow_private_addresses)
        self.backoff_max_seconds = backoff_max_seconds
        self._faults = faults
        self._now = now
        self._verifier = RequestVerifier(
            self.did,
            store,
            clock_skew_seconds=CLOCK_SKEW_SECONDS,
            max_lifetime_seconds=MAX_LIFETIME_SECONDS,
            now=now,
        )
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_JOBS)

    # -- the app -----------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_NOTICE_BYTES, middlewares=[_errors])
        app.router.add_post("/v1/validations", self.post_validation)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        app.on_startup.append(self._resume)
        app.on_shutdown.append(self._stop)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"ok": True, "validator": self.did, "jobs": self.store.counts()})

    async def metrics_page(self, request: web.Request) -> web.Response:
        resp = web.Response(body=self.metrics.render())
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    async def post_validation(self, request: web.Request) -> web.Response:
        try:
            token = await _read_token(request)
            with self._verifier.admit(token) as verified:
                notice = self._notice(verified.iss, verified.payload)
                row, created = self.store.admit(notice.node_did, notice.job, notice.endpoint)
        except HearthError as exc:
            self.metrics.notices.labels("refused").inc()
            log.info("notice refused: %s: %s", exc.code, exc.message)
            return error_response(exc)
        if created:
            self.metrics.notices.labels("accepted").inc()
            log.info(
                "notice accepted for job %s of %s", notice.job, notice.node_did, extra={"job": notice.job}
            )
        else:
            self.metrics.notices.labels("known").inc()
        self._start(row)
        return json_response(row.view(), status=202 if created else 200)

    def _notice(self, iss: str, payload: dict[str, Any]) -> Notice:
        job, endpoint = payload.get("job"), payload.get("node")
        if not isinstance(job, str) or not JOB_ID.match(job):
            raise RequestError(
                "invalid_notice", "the notice's job must be the node's job id", details={"claim": "job"}
            )
        if (
            not isinstance(endpoint, str)
            or len(endpoint) > MAX_ENDPOINT_LENGTH
            or not ENDPOINT.match(endpoint)
        ):
            raise RequestError(
                "invalid_notice", "the notice's node must be an http(s):// URL", details={"claim": "node"}
            )
        try:
            self.policy.check_url(endpoint)
        except AddressNotAllowed as exc:
            raise PolicyError(
                "endpoint_not_allowed",
                f"the node's endpoint is a non-public address ({exc.host}); this validator does not call it",
                details={"node": endpoint, "reason": exc.reason},
            ) from None
        return Notice(node_did=iss, job=job, endpoint=endpoint.rstrip("/"))

    # -- the work ----------------------------------------------------------------------------------------

    async def _resume(self, app: web.Application) -> None:
        rows = self.store.open_rows()
        if rows:
            log.info("resuming %d job(s) left open", len(rows))
        for row in rows:
            self._start(row)

    async def _stop(self, app: web.Application) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, row: NoticeRow) -> None:
        key = (row.node_did, row.job)
        if row.state not in ("accepted", "validating", "judged") or key in self._tasks:
            return
        task = asyncio.create_task(self._run(row.node_did, row.job), name=f"validate-{row.job}")
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))

    async def _run(self, node_did: str, job: str) -> None:
        with job_context(job):
            while True:
                row = self.store.get(node_did, job)
                if row is None or row.state not in ("accepted", "validating", "judged"):
                    return
                wait = row.next_at - self._now()
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    async with self._slots:
                        await self._step(row)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not end the job's work: log it, back off, try again
                    log.exception("validation step for job %s failed", job)
                    self._retry(row, {"code": "internal_error", "message": "see the validator's log"})

    async def _step(self, row: NoticeRow) -> None:
        connector = self.policy.connector()
        async with NodeClient(row.endpoint, timeout=NODE_TIMEOUT, connector=connector) as client:
            if row.state == "judged":
                await self._post(client, row)
            else:
                await self._judge(client, row)

    async def _judge(self, client: NodeClient, row: NoticeRow) -> None:
        self.store.validating(row.node_did, row.job)
        self._faults.reached(VALIDATING)
        try:
            report = await validate(client, row.job, self.signer, node_did=row.node_did, post=False)
        except (NodeUnreachable, NodeError) as exc:
            if _passing(exc):
                self._retry(row, _error(exc))
                return
            self._refuse(row, exc)
            return
        except HearthError as exc:
            if exc.retryable:
                self._retry(row, _error(exc))
            else:
                self._refuse(row, exc)
            return
        body = receipt_body(report.receipt, report.signature, report.credential)
        self.store.judged(row.node_did, row.job, body, report.to_json())
        self.metrics.verdicts.labels("passed" if report.passed else "failed").inc()
        log.info(
            "job %s judged: %s, amount %d",
            row.job,
            "passed" if report.passed else "failed",
            report.receipt.amount,
        )
        self._faults.reached(JUDGED)
        judged = self.store.get(row.node_did, row.job)
        assert judged is not None
        await self._post(client, judged)

    async def _post(self, client: NodeClient, row: NoticeRow) -> None:
        receipt = row.receipt
        assert receipt is not None
        try:
            await client.post_receipt(row.job, receipt)
        except (NodeUnreachable, NodeError) as exc:
            if _passing(exc):
                self.metrics.posts.labels(
                    "unreachable" if isinstance(exc, NodeUnreachable) else "retry"
                ).inc()
                self._retry(row, _error(exc))
                return
            self.metrics.posts.labels("refused").inc()
            log.warning("the node refused the receipt of job %s: %s", row.job, exc.message)
            self.store.refused(row.node_did, row.job, _error(exc))
            return
        self.store.posted(row.node_did, row.job)
        self.metrics.posts.labels("accepted").inc()
        log.info("receipt of job %s posted", row.job)

    def _refuse(self, row: NoticeRow, exc: HearthError) -> None:
        log.warning("job %s cannot be validated: %s: %s", row.job, exc.code, exc.message)
        self.store.refused(row.node_did, row.job, _error(exc))
        self.metrics.verdicts.labels("refused").inc()

    def _retry(self, row: NoticeRow, error: dict[str, Any]) -> None:
        current = self.store.get(row.node_did, row.job)
        attempts = current.attempts if current is not None else 0
        delay = min(BACKOFF_BASE_SECONDS * 2**attempts, self.backoff_max_seconds)
        if attempts == 0:
            log.info("job %s: %s; retrying with backoff", row.job, error.get("message", error.get("code")))
        self.store.retry_later(row.node_did, row.job, error, delay)
        self.metrics.retries.inc()


def _error(exc: HearthError) -> dict[str, Any]:
    """The error's ``{code, domain, message, retryable, details}``, as a row keeps it."""
    return dict(exc.to_dict()["error"])


def _passing(exc: NodeUnreachable | NodeError) -> bool:
    """Whether the node's failure may pass: unreachable, a 5xx, a 408/429, or a refusal it says is."""
    if isinstance(exc, NodeUnreachable):
        return True
    return exc.status >= 500 or exc.status in (408, 429) or exc.retryable


async def _read_token(request: web.Request) -> str:
    """The notice's compact JWT: application/jwt, at most :data:`MAX_NOTICE_BYTES`, whole within
    :data:`BODY_TIMEOUT_SECONDS`, ASCII."""
    if request.content_type != "application/jwt":
        raise RequestError("unsupported_media_type", "send the notice as application/jwt")
    if request.content_length is not None and request.content_length > MAX_NOTICE_BYTES:
        raise RequestError(
            "body_too_large",
            f"the notice is {request.content_length} bytes; at most {MAX_NOTICE_BYTES}",
            details={"max_bytes": MAX_NOTICE_BYTES},
        )
    try:
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            raw = await request.read()
    except TimeoutError:
        raise RequestError(
            "body_timeout",
            f"the notice did not arrive within {BODY_TIMEOUT_SECONDS:g} s",
            details={"timeout_seconds": BODY_TIMEOUT_SECONDS},
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise RequestError(
            "body_too_large",
            f"the notice exceeds {MAX_NOTICE_BYTES} bytes",
            details={"max_bytes": MAX_NOTICE_BYTES},
        ) from None
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise AuthError("malformed_jwt", "the notice is not a compact JWT (non-ASCII bytes)") from None


async def run(
    signer: EthSigner,
    home: Path,
    host: str,
    port: int,
    *,
    allow_private_addresses: bool = False,
    backoff_max_seconds: float = DEFAULT_BACKOFF_MAX_SECONDS,
    faults: FaultPoints = NO_FAULTS,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or the task is cancelled); open work resumes on start."""
    store = VerdictStore.open(home)
    service = ValidatorService(
        signer,
        store,
        allow_private_addresses=allow_private_addresses,
        backoff_max_seconds=backoff_max_seconds,
        faults=faults,
    )
    runner = web.AppRunner(service.app(), handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = port
        for address in runner.addresses:
            bound = int(address[1])
            break
        log.info("listening", extra={"host": host, "port": bound, "validator": service.did})
        if on_ready is not None:
            on_ready(bound)
        await (stop or asyncio.Event()).wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
        store.close()
