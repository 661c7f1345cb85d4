"""Pushing the node's signed offer to registries (``[registry]`` in node.toml).

Each registry URL gets a loop of its own, so a slow or dead registry never holds up another one (nor the
node: nothing here is awaited by a request). A loop POSTs the signed offer (JSON, exactly the body of
``GET /v1/capacity``) when:

- the node has just started,
- the offer changed: its :func:`~provider.offers.offer_fingerprint` differs from the one the registry last
  took (capacity held or freed, prices or policy reloaded; compared every ``check_seconds``, and at once
  after :meth:`OfferPusher.changed`),
- ``heartbeat_seconds`` passed since the registry last took one, so it knows the node is alive.

A push fails when the registry cannot be reached, does not answer within ``timeout_seconds``, or answers
anything but 2xx (redirects are not followed: offers go only where the operator said). The registry is then
retried after ``backoff_initial_seconds``, doubling per failure up to ``backoff_max_seconds``; a change of
the offer does not cut that wait short. Each registry's outcome is counted in
``hearth_offer_pushes_total{registry,outcome}`` and logged only when it differs from the previous one, so a
registry that is down for a day leaves two log lines, not thousands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import aiohttp

from core.config import RegistrySection
from core.errors import RegistryError
from provider.offers import offer_fingerprint

log = logging.getLogger("hearth.registry")

PushOutcome = Literal["ok", "refused", "failed", "unreachable", "timeout", "error"]
"""``ok`` 2xx; ``refused`` 4xx; ``failed`` any other status; ``unreachable`` no connection; ``timeout`` no
answer in time; ``error`` the node could not build its offer (a bug, logged with its traceback)."""

_OUTCOME_OF_CODE: Final[dict[str, PushOutcome]] = {
    "registry_refused": "refused",
    "registry_failed": "failed",
    "registry_unreachable": "unreachable",
    "registry_timeout": "timeout",
}
# 2**n overflows float long before any real failure count; past this the cap applies anyway.
_MAX_DOUBLINGS: Final = 64


class Offers(Protocol):
    """Where the offers come from: :class:`provider.offers.OfferIssuer`."""

    def document(self) -> dict[str, Any]: ...
    def issue(self) -> dict[str, Any]: ...


PushObserver = Callable[[str, PushOutcome], None]
"""Told of every push: ``(registry URL, outcome)``; e.g. for metrics."""


def backoff_delay(failures: int, *, initial: float, cap: float) -> float:
    """The wait after ``failures`` (>= 1) failures in a row: ``initial``, doubling, at most ``cap``."""
    return min(cap, initial * 2.0 ** min(failures - 1, _MAX_DOUBLINGS))


@dataclass(slots=True)
class _Registry:
    """One registry and where its pushes stand."""

    url: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pushed: str | None = None  # fingerprint of the offer the registry last took
    last_ok: float = -math.inf
    failures: int = 0  # in a row
    retry_at: float = 0.0
    outcome: PushOutcome | None = None


class OfferPusher:
    """Keeps every configured registry holding the node's current offer; owned by the node.

    :meth:`start` once the node is ready, :meth:`stop` when it stops; after :meth:`stop` nothing more
    is sent. Without URLs it starts nothing.
    """

    def __init__(
        self,
        section: RegistrySection,
        offers: Offers,
        *,
        on_push: PushObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._section = section
        self._offers = offers
        self._on_push = on_push
        self._clock = clock
        self._registries = [_Registry(url) for url in section.urls]
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self._registries]

    async def start(self) -> None:
        """Open the HTTP client and start one push loop per registry (the first push goes at once)."""
        if not self._registries:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._section.timeout_seconds),
            headers={"User-Agent": "hearth-node"},
        )
        self._tasks = [
            asyncio.create_task(self._serve(registry), name=f"hearth-registry-{n}")
            for n, registry in enumerate(self._registries)
        ]
        log.info("pushing the offer to registries: %s", ", ".join(self.urls))

    async def stop(self) -> None:
        """Cancel the push loops, wait until they are gone (a push in flight is dropped), close the client."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def changed(self) -> None:
        """Have every loop compare the offer now rather than at its next check (e.g. after a reload)."""
        for registry in self._registries:
            registry.wake.set()

    # -- one registry ---------------------------------------------------------------------------------

    async def _serve(self, registry: _Registry) -> None:
        while True:
            registry.wake.clear()
            try:
                wait = self._wait_before_push(registry)
                if wait <= 0:
                    await self._push(registry)
                    continue
            except Exception as exc:  # building the offer failed: a bug; the node and this loop go on
                self._failed(registry, "error", exc)
                continue
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see node.webhooks (3.11 wait_for)
                async with asyncio.timeout(min(wait, self._section.check_seconds)):
                    await registry.wake.wait()

    def _wait_before_push(self, registry: _Registry) -> float:
        """Seconds until ``registry`` is due a push; 0 or less: now."""
        now = self._clock()
        if registry.failures:
            return registry.retry_at - now  # backing off: a changed offer waits too
        if registry.pushed != offer_fingerprint(self._offers.document()):
            return 0.0
        return registry.last_ok + self._section.heartbeat_seconds - now

    async def _push(self, registry: _Registry) -> None:
        offer = self._offers.issue()
        try:
            await self._post(registry.url, json.dumps(offer, separators=(",", ":")).encode())
        except RegistryError as exc:
            self._failed(registry, _OUTCOME_OF_CODE.get(exc.code, "failed"), exc)
            return
        registry.pushed = offer_fingerprint(offer)
        registry.last_ok = self._clock()
        if registry.outcome != "ok":
            recovered = f" after {registry.failures} failed attempt(s)" if registry.failures else ""
            log.info("offer pushed to registry %s%s", registry.url, recovered)
        registry.failures = 0
        self._observe(registry, "ok")

    async def _post(self, url: str, body: bytes) -> None:
        """POST ``body`` to ``url``; aiohttp's failures leave as :class:`RegistryError` (the boundary)."""
        assert self._session is not None
        details: dict[str, Any] = {"url": url}
        try:
            async with self._session.post(
                url, data=body, headers={"Content-Type": "application/json"}, allow_redirects=False
            ) as response:
                status = response.status
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            raise RegistryError(
                "registry_timeout",
                f"no answer within {self._section.timeout_seconds} s",
                details=details | {"timeout_seconds": self._section.timeout_seconds},
            ) from None
        except aiohttp.ClientError as exc:
            raise RegistryError(
                "registry_unreachable", f"{type(exc).__name__}: {exc}", details=details
            ) from None
        if 200 <= status < 300:
            return
        raise RegistryError(
            "registry_refused" if 400 <= status < 500 else "registry_failed",
            f"the registry answered HTTP {status}",
            details=details | {"status": status},
        )

    def _failed(self, registry: _Registry, outcome: PushOutcome, exc: Exception) -> None:
        registry.failures += 1
        delay = backoff_delay(
            registry.failures,
            initial=self._section.backoff_initial_seconds,
            cap=self._section.backoff_max_seconds,
        )
        registry.retry_at = self._clock() + delay
        if registry.outcome != outcome:
            if outcome == "error":
                log.error("building the offer for registry %s failed", registry.url, exc_info=exc)
            else:
                log.warning(
                    "pushing the offer to registry %s failed (%s): %s; retrying in %g s, backing off "
                    "up to %g s (logged again only when this changes)",
                    registry.url,
                    outcome,
                    exc,
                    delay,
                    self._section.backoff_max_seconds,
                )
        self._observe(registry, outcome)

    def _observe(self, registry: _Registry, outcome: PushOutcome) -> None:
        registry.outcome = outcome
        if self._on_push is not None:
            self._on_push(registry.url, outcome)
