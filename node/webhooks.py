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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from core.config import WebhooksSection
from core.errors import PolicyError
from core.journal import Event, Journal, WebhookDue
from core.netpolicy import AddressNotAllowed, AddressPolicy, Lookup
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


def _refused(url: str, exc: AddressNotAllowed) -> PolicyError:
    if exc.resolved:
        message = f"callback host {exc.host} resolves to a private address ({exc.address})"
    else:
        message = (
            f"callback_url points at a private or loopback address ({exc.host}); the node does not call it"
        )
    return PolicyError("callback_not_allowed", message, details={"callback_url": url, "reason": exc.reason})


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
    ) -> None:
        self.cfg = cfg
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
        due = self._journal.webhooks_due(self._now(), MAX_CONCURRENT_DELIVERIES)
        await asyncio.gather(*(self._deliver(d) for d in due))
        return len(due)

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
        attempts = due.attempts + 1
        give_up = attempts >= self.cfg.max_attempts
        delay = min(self.cfg.backoff_base_seconds * 2 ** (attempts - 1), self.cfg.backoff_max_seconds)
        retry_at = None if give_up else self._now() + delay
        if give_up or attempts == 1:
            log.warning(
                "webhook %s for job %s failed (%s)%s",
                event_id(event),
                due.job,
                error,
                "; giving up" if give_up else "; retrying with backoff",
                extra={"job": due.job},
            )
        self._journal.webhook_failed(due.job, error, retry_at=retry_at)

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
