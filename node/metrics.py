"""Prometheus metrics for one node, on a registry of its own (tests build many nodes in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from provider.listing import LISTING_STATES

if TYPE_CHECKING:
    from cluster import WorkerInfo
    from provider.gpu_health import GpuReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_CLUSTER_WORKER_SERIES: Final = 256
"""Workers given per-worker series (``worker`` label); past it only the alive/dead counts grow, so a
cluster whose workers come and go under new names cannot grow a scrape without bound."""


class _JobStates(Collector):
    """Jobs by state, read from the journal at scrape time so the figure can never drift."""

    def __init__(self, count_by_state: Callable[[], dict[str, int]]) -> None:
        self._count = count_by_state

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily("hearth_jobs", "Jobs in the journal by lifecycle state", labels=["state"])
        for state, n in sorted(self._count().items()):
            family.add_metric([state], n)
        return [family]


class _JobFailures(Collector):
    """Jobs that ended failed (no retry left), by failure domain, read from the journal at scrape time."""

    def __init__(self, failed_by_domain: Callable[[], dict[str, int]]) -> None:
        self._count = failed_by_domain

    def collect(self) -> list[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "hearth_jobs_failed", "Jobs resting in state failed, by failure domain", labels=["domain"]
        )
        for domain, n in sorted(self._count().items()):
            family.add_metric([domain], n)
        return [family]


class _Payments(Collector):
    """Earnings and gas, summed from the journal at scrape time: totals that survive restarts."""

    def __init__(self, totals: Callable[[], dict[str, int]], chain_up: Callable[[], bool]) -> None:
        self._totals = totals
        self._chain_up = chain_up

    def collect(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        totals = self._totals()
        earned = CounterMetricFamily(
            "hearth_earnings_usdc", "USDC paid to this node by settled jobs (validator receipt amounts)"
        )
        earned.add_metric([], totals.get("earned", 0) / 1_000_000)
        gas = CounterMetricFamily(
            "hearth_gas_spent_wei", "Gas the node's wallet paid, by transaction purpose", labels=["purpose"]
        )
        for purpose in ("fund", "release", "refund", "register", "leave"):
            gas.add_metric([purpose], totals.get(f"gas_{purpose}", 0))
        up = GaugeMetricFamily("hearth_chain_up", "1 while the settlement chain's RPC answers")
        up.add_metric([], 1 if self._chain_up() else 0)
        return [earned, gas, up]


class _Cluster(Collector):
    """The workers of the node's cluster, read at scrape time from the cluster's cached list.

    Built afresh on every scrape, so a worker that left the list leaves the metrics with it: no label set
    outlives its worker. Per-worker series are kept to :data:`MAX_CLUSTER_WORKER_SERIES` workers (alive
    ones first, then by name); the counts by state always cover them all.
    """

    def __init__(self, workers: Callable[[], list[WorkerInfo]], lost_total: Callable[[], int]) -> None:
        self._workers = workers
        self._lost_total = lost_total

    def collect(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        workers = self._workers()
        states = GaugeMetricFamily(
            "hearth_cluster_workers", "The cluster's workers, by state (alive, dead)", labels=["state"]
        )
        alive = sum(1 for w in workers if w.alive)
        states.add_metric(["alive"], alive)
        states.add_metric(["dead"], len(workers) - alive)
        lost = CounterMetricFamily(
            "hearth_cluster_workers_lost", "Runs lost to a worker that died under them (worker_lost)"
        )
        lost.add_metric([], self._lost_total())
        per_worker = {
            name: GaugeMetricFamily(f"hearth_cluster_worker_{name}", doc, labels=["worker"])
            for name, doc in (
                ("up", "1 while the worker is alive, 0 once the cluster has seen it die"),
                ("running", "Containers this node runs on the worker now"),
                ("cpus", "CPUs the worker offers the cluster"),
                ("memory_mb", "Memory the worker offers the cluster, in MiB"),
                ("gpus", "GPUs the worker offers the cluster"),
            )
        }
        for label, w in _worker_labels(workers):
            per_worker["up"].add_metric([label], 1 if w.alive else 0)
            per_worker["running"].add_metric([label], w.running)
            per_worker["cpus"].add_metric([label], w.cpus)
            per_worker["memory_mb"].add_metric([label], w.memory_mb)
            per_worker["gpus"].add_metric([label], w.gpus)
        return [states, lost, *per_worker.values()]


class _Engines(Collector):
    """The warm engines (node.warm), read at scrape time: 1 for the state each model's engine is in, and
    how often each was started (a count that climbs: engines dying and coming back)."""

    STATES = ("stopped", "starting", "ready", "failed")

    def __init__(self, states: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._states = states

    def collect(self) -> list[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily(
            "hearth_warm_engine", "1 for the state each warm model's engine is in", labels=["model", "state"]
        )
        starts = CounterMetricFamily(
            "hearth_warm_engine_starts",
            "Engines started per warm model since the node started",
            labels=["model"],
        )
        for model, engine in sorted(self._states().items()):
            for name in self.STATES:
                state.add_metric([model, name], 1.0 if engine["state"] == name else 0.0)
            starts.add_metric([model], float(engine["starts"]))
        return [state, starts]


class _Gpus(Collector):
    """The last GPU self-test, per GPU (``gpu`` label: its index), read at scrape time from the node.

    A figure the self-test has not measured (yet, or its run failed) has no series; ``hearth_gpu_healthy``
    is there for every GPU from the first health reading on.
    """

    def __init__(self, reports: Callable[[], tuple[GpuReport, ...]]) -> None:
        self._reports = reports

    def collect(self) -> list[GaugeMetricFamily]:
        tflops = GaugeMetricFamily(
            "hearth_gpu_tflops",
            "Matmul throughput the GPU self-test measured (bf16, else fp16)",
            labels=["gpu"],
        )
        bandwidth = GaugeMetricFamily(
            "hearth_gpu_memory_bandwidth_gbs",
            "Device memory bandwidth the GPU self-test measured, GB/s",
            labels=["gpu"],
        )
        healthy = GaugeMetricFamily(
            "hearth_gpu_healthy",
            "1 while the GPU passes its health checks; 0: withheld from capacity",
            labels=["gpu"],
        )
        temperature = GaugeMetricFamily(
            "hearth_gpu_temperature_celsius", "GPU temperature at the last self-test", labels=["gpu"]
        )
        for report in self._reports():
            label = [str(report.index)]
            if report.figures.tflops is not None:
                tflops.add_metric(label, report.figures.tflops)
            if report.figures.memory_bandwidth_gbs is not None:
                bandwidth.add_metric(label, report.figures.memory_bandwidth_gbs)
            healthy.add_metric(label, 1 if report.healthy else 0)
            if report.health is not None and report.health.temperature_c is not None:
                temperature.add_metric(label, report.health.temperature_c)
        return [tflops, bandwidth, healthy, temperature]


def _worker_labels(workers: Iterable[WorkerInfo]) -> list[tuple[str, WorkerInfo]]:
    """The workers given series, each with a ``worker`` label of its own.

    Names are chosen by the workers' operators, so two can share one; the one ranked later (dead after
    alive, then by node id) is told apart by its node id, as a scrape with two samples of one label set
    is refused whole.
    """
    ranked = sorted(workers, key=lambda w: (not w.alive, w.name, w.node_id))[:MAX_CLUSTER_WORKER_SERIES]
    labelled: list[tuple[str, WorkerInfo]] = []
    seen: set[str] = set()
    for w in ranked:
        label = w.name if w.name not in seen else f"{w.name}/{w.node_id[:8]}"
        seen.add(label)
        labelled.append((label, w))
    return labelled


class Metrics:
    """The node's counters and histograms; methods name the events the rest of the code reports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # labelled children of the per-request metrics, looked up once: ``labels()`` takes a lock and checks
        # its arguments on every call (the label sets are bounded: routes, statuses, error codes)
        self._http_children: dict[tuple[str, int], Counter] = {}
        self._admission_children: dict[str, Histogram] = {}
        self._quote_children: dict[tuple[str, str], Counter] = {}
        r = self.registry
        self.http_requests = Counter(
            "hearth_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.quotes = Counter(
            "hearth_quotes",
            "Quote outcomes: won (a new quote signed), reused (a live quote returned again), lost (a quote "
            "that expired unaccepted; reason expired), refused (no bid; reason = the refusal's error code)",
            ["outcome", "reason"],
            registry=r,
        )
        self.auth_rejections = Counter(
            "hearth_auth_rejections", "Signed requests refused, by error code", ["code"], registry=r
        )
        self.errors = Counter(
            "hearth_errors", "Error responses by domain and code", ["domain", "code"], registry=r
        )
        self.jobs_accepted = Counter("hearth_jobs_accepted", "Jobs accepted", registry=r)
        self.admission_seconds = Histogram(
            "hearth_admission_seconds",
            "Time spent in the admission path (verify, policy, price, journal)",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
            registry=r,
        )
        self.capacity_free = Gauge(
            "hearth_capacity_free", "Free capacity by resource", ["resource"], registry=r
        )
        self.ready = Gauge("hearth_ready", "1 when the node accepts work", registry=r)
        self.listing = Gauge(
            "hearth_market_listing",
            "The node's listing in the on-chain registry: 1 for the state it is in (checking, pending, "
            "listed, chain_unavailable, failed); absent when [market] asks for none",
            ["state"],
            registry=r,
        )
        self.job_runs = Counter(
            "hearth_job_runs",
            "Job attempts that ended, by outcome and failure domain",
            ["outcome", "domain"],
            registry=r,
        )
        self.job_run_seconds = Histogram(
            "hearth_job_run_seconds",
            "Wall time of one attempt, fetch to publish",
            buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.queue_depth = Gauge("hearth_queue_depth", "Accepted jobs waiting to run", registry=r)
        self.jobs_running = Gauge("hearth_jobs_running", "Jobs running now", registry=r)
        self.stored = Gauge("hearth_blockstore", "Content in the local blockstore", ["unit"], registry=r)
        self.job_runtime_seconds = Histogram(
            "hearth_job_runtime_seconds",
            "Runtime of completed attempts as their results report it (runtime_seconds), by kind",
            ["kind"],
            buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.job_overhead_seconds = Histogram(
            "hearth_job_overhead_seconds",
            "The node's own time in completed attempts (runtime_seconds - container_seconds: fetch, probe, "
            "checks, import), by kind",
            ["kind"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.container_starts = Counter(
            "hearth_container_starts", "Sandbox containers started (probes and workloads)", registry=r
        )
        self.offer_pushes = Counter(
            "hearth_offer_pushes",
            "Pushes of the signed offer to registries, by registry URL and outcome "
            "(ok, refused, failed, unreachable, timeout, error)",
            ["registry", "outcome"],
            registry=r,
        )

    def watch_journal(self, count_by_state: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_JobStates(count_by_state))

    def watch_failures(self, failed_by_domain: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_JobFailures(failed_by_domain))

    def watch_payments(self, totals: Callable[[], dict[str, int]], chain_up: Callable[[], bool]) -> None:
        self.registry.register(_Payments(totals, chain_up))

    def watch_cluster(self, workers: Callable[[], list[WorkerInfo]], lost_total: Callable[[], int]) -> None:
        """Report the cluster's workers (``RayCluster.workers``) and its lost runs at every scrape."""
        self.registry.register(_Cluster(workers, lost_total))

    def watch_engines(self, states: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Report the warm engines' states (``WarmEngines.states``) at every scrape."""
        self.registry.register(_Engines(states))

    def watch_gpus(self, reports: Callable[[], tuple[GpuReport, ...]]) -> None:
        """Report the last GPU self-test (figures and health per GPU) at every scrape."""
        self.registry.register(_Gpus(reports))

    def http_request(self, route: str, status: int) -> None:
        """One answered HTTP request, by route (its canonical path) and status."""
        key = (route, status)
        child = self._http_children.get(key)
        if child is None:
            child = self._http_children[key] = self.http_requests.labels(route, str(status))
        child.inc()

    def admission_timer(self, route: str) -> Histogram:
        """The admission histogram of ``route`` (quote or submit), to time with its ``time()``."""
        child = self._admission_children.get(route)
        if child is None:
            child = self._admission_children[route] = self.admission_seconds.labels(route)
        return child

    def quote(self, outcome: str, reason: str) -> None:
        key = (outcome, reason)
        child = self._quote_children.get(key)
        if child is None:
            child = self._quote_children[key] = self.quotes.labels(outcome, reason)
        child.inc()

    def auth_rejected(self, code: str) -> None:
        self.auth_rejections.labels(code).inc()

    def accepted(self) -> None:
        self.jobs_accepted.inc()

    def attempt_ended(
        self, outcome: str, domain: str, seconds: float, *, kind: str, result: Mapping[str, Any] | None
    ) -> None:
        """An attempt ended (the scheduler's ``on_attempt``).

        A completed attempt's ``result`` (docs/protocol.md) adds its runtime, and the part of it spent outside
        the container, to the per-kind histograms; failed and cancelled attempts have no result.
        """
        self.job_runs.labels(outcome, domain).inc()
        self.job_run_seconds.observe(seconds)
        if result is None:
            return
        runtime, in_container = result.get("runtime_seconds"), result.get("container_seconds")
        if isinstance(runtime, int | float):
            self.job_runtime_seconds.labels(kind).observe(runtime)
            if isinstance(in_container, int | float):
                self.job_overhead_seconds.labels(kind).observe(max(runtime - in_container, 0.0))

    def container_started(self) -> None:
        self.container_starts.inc()

    def market_listing(self, state: str) -> None:
        """The registry listing moved to ``state`` (provider.listing's states)."""
        for name in LISTING_STATES:
            self.listing.labels(name).set(1 if name == state else 0)

    def offer_pushed(self, registry: str, outcome: str) -> None:
        self.offer_pushes.labels(registry, outcome).inc()

    def error(self, domain: str, code: str) -> None:
        self.errors.labels(domain, code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
