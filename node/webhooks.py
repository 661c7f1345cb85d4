"""Webhooks: a job's status changes POSTed to its envelope's ``callback_url``, signed, at least once.

The journal's events are the outbox. A job with a callback has a cursor row (written with the job, in
the same transaction): the last transition the requester acknowledged. The dispatcher sends, per job and
in order, the oldest transition past the cursor and moves the cursor only on a 2xx answer, so a crash
between the POST and the cursor write sends that event again: receivers de-duplicate by its id
(``Hearth-Event-Id`` header, the JWT's ``jti``: ``"<job>:<seq>"``, stable across resends).

The body is a JWT (``Content-Type: application/jwt``) signed by the node DID, like its quotes and
results: ``{"iss": node, "aud": requester, "jti": event id, "event": {...}, "job": {...}}``. A failing
delivery is retried with exponential backoff (``[webhooks]``) up to ``max_attempts`` per event, then the
node gives up on that callback and says so in the job's status view.

A callback is a URL a requester chose, so it obeys the address policy (:mod:`core.netpolicy`): a
loopback, private, link-local or otherwise non-public host is refused as written (at admission and
again before each send) and as resolved (by the session's connector, which connects only to the
addresses it checked), unless ``[webhooks] allow_private_addresses`` or ``allow_networks`` allows it.
Redirects are never followed: a 3xx answer is a failed delivery.

Validation notices go the same way. A job whose envelope names ``validation.validator_url`` owes its
validator one notice once it is ``completed`` (the journal's ``validation_notices``): a JWT signed by the
node DID, ``{"iss": node, "aud": the envelope's payment.validator, "jti": fresh per send, "job": id,
"node": this node's endpoint}``, POSTed by the same rounds, under the same address policy, backoff and
attempt limit, and marked delivered only on a 2xx. Each send has its own ``jti`` (the validator refuses a
token it has seen); a validator that already knows the job answers 200 with its verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from core.config import WebhooksSection
from core.errors import HearthError, PolicyError
from core.journal import Event, Journal, NoticeDue, WebhookDue
from core.netpolicy import AddressNotAllowed, AddressPolicy, Lookup
from payments.did import canonical_did
from payments.jwt import sign_jwt
from payments.keys import Signer

log = logging.getLogger("hearth.webhooks")

# How long a delivered body stays verifiable (its ``exp``); a retry later on signs a new one.
TOKEN_LIFETIME_SECONDS = 3600
# Deliveries in flight at once (each to a different job: one job's events go one at a time, in order).
MAX_CONCURRENT_DELIVERIES = 8
# The least time between two delivery rounds. Transitions only wake the dispatcher; under load (thousands
# of transitions a second) they share a round instead of each paying a journal query.
MIN_ROUND_SECONDS = 0.05
# The last_error of every connection-level failure (refused, reset, timeout, TLS), whatever it was.
UNREACHABLE_ERROR = "the callback could not be reached"


def event_id(event: Event) -> str:
    """The id a receiver de-duplicates on: the same for every resend of this event."""
    return f"{event.job}:{event.seq}"


def callback_policy(cfg: WebhooksSection) -> AddressPolicy:
    """The address policy callbacks obey: ``[webhooks] allow_private_addresses`` and ``allow_networks``."""
    return AddressPolicy.from_settings(
        allow_private=cfg.allow_private_addresses, allow_networks=cfg.allow_networks
    )


def check_callback(url: str, cfg: WebhooksSection) -> None:
    """Refuse, at admission, a callback naming a non-public address as written (names: on each send)."""
    try:
        callback_policy(cfg).check_url(url)
    except AddressNotAllowed as exc:
        raise _refused(url, exc) from None


def check_validator_url(url: str, cfg: WebhooksSection) -> None:
    """Refuse, at admission, a ``validation.validator_url`` the callback policy would not let it call."""
    try:
        callback_policy(cfg).check_url(url)
    except AddressNotAllowed as exc:
        raise _refused(url, exc, field="validator_url") from None


def _refused(url: str, exc: AddressNotAllowed, *, field: str = "callback_url") -> PolicyError:
    if exc.resolved:
        message = f"{field} host {exc.host} resolves to a private address ({exc.address})"
    else:
        message = f"{field} points at a private or loopback address ({exc.host}); the node does not call it"
    code = "callback_not_allowed" if field == "callback_url" else "validator_url_not_allowed"
    return PolicyError(code, message, details={field: url, "reason": exc.reason})


def notice_id(job: str) -> str:
    """The ``Hearth-Event-Id`` of a job's validation notice (each send's ``jti`` is fresh)."""
    return f"{job}:validation"


class WebhookDispatcher:
    """Owns the delivery task: started and stopped with the node, woken by every new transition."""

    def __init__(
        self,
        cfg: WebhooksSection,
        journal: Journal,
        signer: Signer,
        *,
        now: Callable[[], float] = time.time,
        resolve: Lookup | None = None,
        endpoint: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.cfg = cfg
        self._endpoint = endpoint
        self._policy = callback_policy(cfg)
        self._resolve = resolve
        self._journal = journal
        self._signer = signer
        self._now = now
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=self._policy.connector(lookup=self._resolve),
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_seconds),
        )
        self._journal.add_listener(self._on_event)
        self._task = asyncio.create_task(self._loop(), name="hearth-webhooks")

    async def stop(self) -> None:
        self._journal.remove_listener(self._on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _on_event(self, event: Event) -> None:
        # Called on the journal writer's thread, which may not be the loop's. Reading is_set() from any
        # thread is safe; once set, the wake stays set until the next round starts, so the transitions in
        # between cost nothing more.
        if event.type == "transition" and self._task is not None and not self._wake.is_set():
            with contextlib.suppress(RuntimeError):
                self._task.get_loop().call_soon_threadsafe(self._wake.set)

    async def _loop(self) -> None:
        while True:
            self._wake.clear()  # before the round: a transition during it wakes the next one
            try:
                await self.tick()
            except Exception:  # keep delivering; the next round retries
                log.exception("webhook round failed")
            await asyncio.sleep(MIN_ROUND_SECONDS)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
            # arrives as the wake fires, and stop() would then wait on this loop forever
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.poll_seconds):
                    await self._wake.wait()

    async def tick(self) -> int:
        """Deliver what is due now (one event per job); returns how many deliveries were tried."""
        # journal calls stay on the loop's thread (an indexed query or one short write each), so that a
        # cancelled round never waits on a thread, and the journal's group commits stay on the loop
        now = self._now()
        due = self._journal.webhooks_due(now, MAX_CONCURRENT_DELIVERIES)
        notices = self._journal.notices_due(now, MAX_CONCURRENT_DELIVERIES)
        await asyncio.gather(*(self._deliver(d) for d in due), *(self._notify(n) for n in notices))
        return len(due) + len(notices)

    async def _deliver(self, due: WebhookDue) -> None:
        assert self._session is not None
        event = due.event
        try:
            self._policy.check_url(due.url)  # literals; the connector checks every address a name resolves to
            async with self._session.post(
                due.url,
                data=self._body(due).encode("ascii"),
                headers={"Content-Type": "application/jwt", "Hearth-Event-Id": event_id(event)},
                allow_redirects=False,
            ) as resp:
                if 200 <= resp.status < 300:
                    self._journal.webhook_delivered(due.job, event.seq)
                    return
                error = f"HTTP {resp.status}"
        except AddressNotAllowed as exc:
            message = _refused(due.url, exc).message
            log.warning("webhook for job %s refused: %s", due.job, message, extra={"job": due.job})
            self._journal.webhook_failed(due.job, message, retry_at=None)
            return
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # the status view shows last_error to anyone: refused, reset, timeout and TLS read the same
            # there (no port-scan oracle); the detail goes to the operator's log
            log.info("webhook %s unreachable: %s: %s", event_id(event), type(exc).__name__, exc)
            error = UNREACHABLE_ERROR
        retry_at = self._retry_at(due.attempts + 1, f"webhook {event_id(event)}", due.job, error)
        self._journal.webhook_failed(due.job, error, retry_at=retry_at)

    def _retry_at(self, attempts: int, what: str, job: str, error: str) -> float | None:
        """When to try again after failed try number ``attempts`` (None: give up), logged once per turn."""
        give_up = attempts >= self.cfg.max_attempts
        delay = min(self.cfg.backoff_base_seconds * 2 ** (attempts - 1), self.cfg.backoff_max_seconds)
        if give_up or attempts == 1:
            log.warning(
                "%s for job %s failed (%s)%s",
                what,
                job,
                error,
                "; giving up" if give_up else "; retrying with backoff",
                extra={"job": job},
            )
        return None if give_up else self._now() + delay

    async def _notify(self, due: NoticeDue) -> None:
        """Send one validation notice; mark it delivered on a 2xx, else schedule the next try."""
        assert self._session is not None
        body = self._notice(due)
        if body is None:
            error = "the node has no endpoint to name: set [node] public_url"
        else:
            try:
                self._policy.check_url(due.url)
                async with self._session.post(
                    due.url,
                    data=body.encode("ascii"),
                    headers={"Content-Type": "application/jwt", "Hearth-Event-Id": notice_id(due.job)},
                    allow_redirects=False,
                ) as resp:
                    if 200 <= resp.status < 300:
                        self._journal.notice_delivered(due.job)
                        log.info("validation notice for job %s delivered", due.job, extra={"job": due.job})
                        return
                    error = f"HTTP {resp.status}"
            except AddressNotAllowed as exc:
                message = _refused(due.url, exc, field="validator_url").message
                log.warning(
                    "validation notice for job %s refused: %s", due.job, message, extra={"job": due.job}
                )
                self._journal.notice_failed(due.job, message, retry_at=None)
                return
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.info("validator of job %s unreachable: %s: %s", due.job, type(exc).__name__, exc)
                error = UNREACHABLE_ERROR
        retry_at = self._retry_at(due.attempts + 1, "validation notice", due.job, error)
        self._journal.notice_failed(due.job, error, retry_at=retry_at)

    def _notice(self, due: NoticeDue) -> str | None:
        """The signed notice for ``due``'s job (None while the node has no endpoint to name)."""
        endpoint = self._endpoint()
        job = self._journal.get(due.job)
        if endpoint is None or job is None:
            return None
        payment = job.envelope.get("payment")
        validator = payment.get("validator") if isinstance(payment, dict) else None
        if isinstance(validator, str):
            with contextlib.suppress(HearthError):  # admitted envelopes name a valid DID
                validator = canonical_did(validator)  # the one spelling the validator knows itself by
        now = int(self._now())
        claims: dict[str, Any] = {
            "iss": self._signer.did,
            "aud": validator,
            "iat": now,
            "exp": now + TOKEN_LIFETIME_SECONDS,
            # fresh per send: the validator refuses a jti it has seen
            "jti": f"{notice_id(job.id)}:{secrets.token_hex(8)}",
            "job": job.id,
            "node": endpoint,
        }
        return sign_jwt(self._signer, claims)

    def _body(self, due: WebhookDue) -> str:
        event = due.event
        job = self._journal.get(due.job)
        claims: dict[str, Any] = {
            "iss": self._signer.did,
            "aud": job.iss if job is not None else None,
            "iat": int(self._now()),
            "exp": int(self._now()) + TOKEN_LIFETIME_SECONDS,  # each resend is signed afresh
            "jti": event_id(event),
            "event": {"id": event_id(event), **event.as_dict()},
        }
        if job is not None:
            claims["job"] = {"id": job.id, "job_id": job.job_id, "kind": job.kind, "state": job.state}
        return sign_jwt(self._signer, claims)
