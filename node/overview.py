"""The operator's view of a running node: one JSON document, and the dashboard that draws it.

:func:`add_routes` mounts ``GET /v1/overview`` (the document), ``GET /ui`` (the dashboard page) and its
assets under ``/ui/``. The same document feeds the dashboard, ``hearth status`` and any script.

The document (see :meth:`Overview.document`)::

    node       did, name, ready, started_at, paused, payments, market (the registry listing, or null)
    capacity   resources (the ledger: total/used/free, holds, utilisation), machine, kinds, models
    jobs       by_state, queued, running [{id, kind, stage, percent, started_at, ...}], recent [...]
    failures   total, by_domain {domain: {count, codes}}, recent [...]
    earnings   currency, earned, earned_units, gas_wei, series {period, period_seconds, points [...]}
    cluster    null on a node that runs its jobs itself; with a [cluster]: engine, address, alive,
               lost_runs, workers [{node_id, name, address, alive, cpus, memory_mb, gpus, models,
               running, lost}]

It is read-only and holds nothing secret: no key, no envelope, no quote or receipt token. It is polled
every second or two, so it is built from indexed reads of a few rows; the parts that read more (state
counts, failures, earnings: the earnings scan every settled job) are kept until the journal records a
change to them (see :class:`Overview`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Hashable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from aiohttp import web

from core.errors import NotFoundError, RequestError
from core.journal import Event, JobRecord, Journal

if TYPE_CHECKING:
    from cluster import RayCluster
    from node.daemon import Node

__all__ = [
    "DEFAULT_RECENT",
    "MAX_RECENT",
    "PERIODS",
    "UI_SECURITY_HEADERS",
    "Overview",
    "add_routes",
]

log = logging.getLogger("hearth.overview")
_T = TypeVar("_T")

DEFAULT_RECENT: Final = 20
"""Recent jobs listed when the request names no ``recent``."""
MAX_RECENT: Final = 100
RECENT_FAILURES: Final = 5
DEFAULT_PERIOD: Final = "hour"
PERIODS: Final[Mapping[str, tuple[int, int]]] = {"hour": (3600, 48), "day": (86400, 30)}
"""Earnings series: period name -> (seconds per period, periods shown, the current one last)."""
CURRENCY: Final = "usdc"
_MAX_RUNNING: Final = 1000

UI_PACKAGE: Final = "node"
UI_DIR: Final = "ui"
UI_FILES: Final[Mapping[str, str]] = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
}
UI_SECURITY_HEADERS: Final[Mapping[str, str]] = {
    # Everything the page loads or fetches comes from this node; no inline script or style, no frames.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class Overview:
    """Builds the overview document of one node, keeping the costly parts until the journal changes them.

    State counts, failures and earnings are read again only after a journal event that can change them: a
    transition (counts), a move into or out of ``failed`` (failures), a settlement or a payment note
    (earnings). Progress reports, the bulk of the events, change none of them, so a dashboard polling while
    jobs run costs a few indexed reads. Created with the HTTP app, before the node opens its journal; it
    attaches to the journal on first use (and again should the node open another).
    """

    def __init__(self, node: Node) -> None:
        self._node = node
        self._journal: Journal | None = None
        # what changed, counted by the journal listener; a cached part remembers the count it was built at
        self._changes: dict[str, int] = dict.fromkeys(("states", "failures", "earnings"), 0)
        self._cache: dict[str, tuple[Hashable, Any]] = {}

    def _attach(self) -> Journal:
        journal = self._node.journal
        if journal is not self._journal:
            journal.add_listener(self._on_event)
            self._journal = journal
            self._cache.clear()
        return journal

    def _on_event(self, event: Event) -> None:
        if event.type == "transition":
            self._changes["states"] += 1
            if "failed" in (event.from_state, event.to_state):
                self._changes["failures"] += 1
            if event.to_state == "settled":
                self._changes["earnings"] += 1
        elif event.type == "note":  # funding decisions and transactions (gas)
            self._changes["earnings"] += 1

    def _cached(self, name: str, key: Hashable, build: Callable[[], _T]) -> _T:
        hit = self._cache.get(name)
        if hit is not None and hit[0] == key:
            return cast(_T, hit[1])
        value = build()
        self._cache[name] = (key, value)
        return value

    def document(self, *, recent: int = DEFAULT_RECENT, period: str = DEFAULT_PERIOD) -> dict[str, Any]:
        """The overview as JSON data; ``recent`` jobs listed, earnings per ``period`` (a key of PERIODS)."""
        if period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")
        node = self._node
        journal = self._attach()
        now = node.now()
        seconds, count = PERIODS[period]
        current = float(math.floor(now / seconds) * seconds)  # the series moves on with the clock, too
        by_state = self._cached("states", self._changes["states"], journal.count_by_state)
        failures = self._cached("failures", self._changes["failures"], lambda: _failures(journal))
        earnings = self._cached(
            f"earnings-{period}",
            (self._changes["earnings"], current),
            lambda: _earnings(journal, period, current - (count - 1) * seconds),
        )
        scheduler = node.scheduler
        queued = by_state["accepted"] if scheduler is None else scheduler.queue_depth
        running = journal.list_jobs(state="running", limit=_MAX_RUNNING)
        running.sort(key=lambda job: job.updated_at)
        pricing = node.cfg.pricing
        return {
            "generated_at": now,
            "node": {
                "did": node.did,
                "name": node.cfg.node.name,
                "ready": node.ready,
                "started_at": node.started_at,
                "paused": node.cfg.scheduler.paused,
                "payments": node.settlement is not None,
                "market": None if node.listing is None else node.listing.view(),
            },
            "capacity": {
                "resources": node.ledger.snapshot(),
                "machine": node.machine.to_dict(),
                "kinds": list(node.cfg.policy.kinds),
                "models": node.models.offers(
                    {"input_1k_tokens": pricing.input_1k_tokens, "output_1k_tokens": pricing.output_1k_tokens}
                ),
            },
            "jobs": {
                "by_state": by_state,
                "queued": queued,
                "running": [_running_view(job, journal.attempt_progress(job.id)) for job in running],
                "recent": [_recent_view(job) for job in journal.recent_jobs(recent)] if recent else [],
            },
            "failures": failures,
            "earnings": earnings,
            "cluster": _cluster_view(node.cluster),
        }


def _cluster_view(cluster: RayCluster | None) -> dict[str, Any] | None:
    """The cluster the node runs its jobs on, its workers by name; None for a node that runs them itself.

    The worker list is the cluster's cached one (refreshed in the background), so a poll costs no call
    to the cluster.
    """
    if cluster is None:
        return None
    workers = sorted(cluster.workers(), key=lambda w: (w.name, w.node_id))
    return {
        "engine": "ray",
        "address": cluster.address,
        "alive": sum(1 for w in workers if w.alive),
        "lost_runs": cluster.lost_total,
        "workers": [w.to_dict() for w in workers],
    }


def _recent_view(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id,
        "job_id": job.job_id,
        "kind": job.kind,
        "state": job.state,
        "price": job.price,
        "requester": job.iss,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "failure": job.failure,
    }


def _running_view(job: JobRecord, progress: Event | None) -> dict[str, Any]:
    data = (progress.data if progress is not None else None) or {}
    percent = data.get("percent")
    return {
        "id": job.id,
        "job_id": job.job_id,
        "kind": job.kind,
        "requester": job.iss,
        "price": job.price,
        "attempt": job.attempts + 1,
        # a running job's row changes only when it starts; progress lives in events
        "started_at": job.updated_at,
        "resources": {"cpus": job.cpus, "memory_mb": job.memory_mb, "gpus": job.gpus},
        "stage": str(data.get("stage") or "starting"),
        "percent": float(percent) if isinstance(percent, int | float) else None,
        "progress_at": None if progress is None else progress.at,
        "progress": {k: v for k, v in data.items() if k not in ("stage", "percent")},
    }


def _failures(journal: Journal) -> dict[str, Any]:
    by_domain: dict[str, dict[str, Any]] = {}
    for (domain, code), n in sorted(journal.failure_counts().items()):
        entry = by_domain.setdefault(domain, {"count": 0, "codes": {}})
        entry["count"] += n
        entry["codes"][code] = n
    recent = [
        {"id": job.id, "kind": job.kind, "at": job.updated_at, **(job.failure or {})}
        for job in journal.recent_jobs(RECENT_FAILURES, state="failed")
    ]
    return {"total": sum(e["count"] for e in by_domain.values()), "by_domain": by_domain, "recent": recent}


def _earnings(journal: Journal, period: str, since: float) -> dict[str, Any]:
    # Here, not at the top: `hearth status` imports this module, and web3 would slow every command; the
    # daemon has loaded it anyway.
    from payments.receipts import USDC_DECIMALS, usdc_str

    seconds, count = PERIODS[period]
    totals = journal.payment_totals()
    settled = journal.settled_earnings(since, seconds)
    points = []
    for i in range(count):
        start = since + i * seconds
        units, jobs = settled.get(start, (0, 0))
        points.append({"start": start, "earned": usdc_str(units), "earned_units": units, "jobs": jobs})
    return {
        "currency": CURRENCY,
        "decimals": USDC_DECIMALS,
        "earned": usdc_str(totals["earned"]),
        "earned_units": totals["earned"],
        "gas_wei": {p: totals[f"gas_{p}"] for p in ("fund", "release", "refund")},
        "series": {"period": period, "period_seconds": seconds, "since": since, "points": points},
    }


# -- HTTP ---------------------------------------------------------------------------------------------


def _recent_param(request: web.Request) -> int:
    raw = request.query.get("recent")
    if raw is None:
        return DEFAULT_RECENT
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_RECENT:
        raise RequestError(
            "invalid_query", f"'recent' must be an integer from 0 to {MAX_RECENT}", details={"recent": raw}
        )
    return value


def _period_param(request: web.Request) -> str:
    period = request.query.get("period", DEFAULT_PERIOD)
    if period not in PERIODS:
        raise RequestError(
            "invalid_query", f"'period' must be one of {', '.join(PERIODS)}", details={"period": period}
        )
    return period


def _load_ui() -> dict[str, bytes]:
    """The dashboard's files from the installed package; one missing is logged and answered with 404."""
    folder = resources.files(UI_PACKAGE) / UI_DIR
    files: dict[str, bytes] = {}
    for name in UI_FILES:
        try:
            files[name] = (folder / name).read_bytes()
        except OSError as exc:
            log.error("dashboard file %s is missing from the installation: %s", name, exc)
    return files


def add_routes(app: web.Application, node: Node) -> Overview:
    """Mount ``GET /v1/overview``, ``GET /ui`` and ``GET /ui/{asset}`` for ``node`` on ``app``."""
    overview = Overview(node)
    ui = _load_ui()
    dumps = functools.partial(json.dumps, separators=(",", ":"))

    async def get_overview(request: web.Request) -> web.Response:
        doc = overview.document(recent=_recent_param(request), period=_period_param(request))
        return web.json_response(doc, dumps=dumps, headers={"Cache-Control": "no-store"})

    def asset(name: str) -> web.Response:
        body = ui.get(name)
        if body is None:
            raise NotFoundError("ui_asset_not_found", f"the dashboard has no file {name!r}")
        return web.Response(
            body=body, content_type=UI_FILES[name], charset="utf-8", headers=dict(UI_SECURITY_HEADERS)
        )

    async def get_ui(request: web.Request) -> web.Response:
        return asset("index.html")

    async def get_ui_asset(request: web.Request) -> web.Response:
        return asset(request.match_info["name"] or "index.html")

    app.router.add_get("/v1/overview", get_overview)
    app.router.add_get("/ui", get_ui)
    app.router.add_get("/ui/{name:[A-Za-z0-9._-]*}", get_ui_asset)
    return overview
