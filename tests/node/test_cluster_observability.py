"""How operators see the workers of a node's cluster: metrics, GET /v1/overview and the dashboard.

A real Ray cluster is exercised by the cluster's end-to-end tests; here the node's ``cluster`` is a stub
giving what those views read of a ``cluster.RayCluster`` (its cached ``workers()``, ``address`` and
``lost_total``), so that each view can be checked against exact figures, a dead worker included. The
dashboard is checked in headless Chromium, as the dashboard's own tests do.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from cluster import WorkerInfo
from node.metrics import MAX_CLUSTER_WORKER_SERIES, Metrics
from node.openapi_schemas import OVERVIEW_SCHEMA
from provider.capacity import MachineInfo
from tests.conftest import LiveNode
from tests.node.test_dashboard import browse, chromium
from tests.promtext import sample, samples

MODEL = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
ADDRESS = "127.0.0.1:6379"


def worker(name: str, *, alive: bool = True, **fields: Any) -> WorkerInfo:
    """A worker named ``name`` with small defaults; ``fields`` override them."""
    values: dict[str, Any] = {
        "node_id": (name.encode().hex() * 8)[:56],
        "name": name,
        "address": "127.0.0.1",
        "alive": alive,
        "cpus": 1.0,
        "memory_mb": 1024,
        "gpus": 0,
        "models": (),
        "running": 0,
        "lost": 0,
    }
    values.update(fields)
    return WorkerInfo(**values)


BOX_1 = worker("box-1", cpus=4.0, memory_mb=8192, gpus=1, models=(MODEL,), running=2)
BOX_2 = worker("box-2", alive=False, cpus=2.5, memory_mb=512, running=0, lost=3)


class StubCluster:
    """What the node reads of a ``cluster.RayCluster`` besides running on it; its workers can change."""

    def __init__(self, workers: list[WorkerInfo], lost_total: int) -> None:
        self.listed = workers
        self.lost = lost_total

    def workers(self) -> list[WorkerInfo]:
        return list(self.listed)

    @property
    def address(self) -> str:
        return ADDRESS

    @property
    def lost_total(self) -> int:
        return self.lost

    def machine(self, head: MachineInfo) -> MachineInfo:
        """What the node sells (its housekeeping asks every second): the head's own machine, unchanged."""
        return head


@contextmanager
def attached(ln: LiveNode, cluster: StubCluster) -> Iterator[StubCluster]:
    """``cluster`` as the node's cluster while the block runs; none again after (the node's stop would
    close a real one)."""
    ln.node.cluster = cluster  # type: ignore[assignment]
    try:
        yield cluster
    finally:
        ln.node.cluster = None


def watched(cluster: StubCluster) -> Metrics:
    metrics = Metrics()
    metrics.watch_cluster(cluster.workers, lambda: cluster.lost_total)
    return metrics


# -- metrics ------------------------------------------------------------------------------------------


def test_the_metrics_show_each_worker_and_the_dead_one_and_the_runs_lost() -> None:
    cluster = StubCluster([BOX_2, BOX_1], lost_total=3)
    metrics = watched(cluster)
    text = metrics.render().decode()

    assert sample(text, "hearth_cluster_workers", state="alive") == 1
    assert sample(text, "hearth_cluster_workers", state="dead") == 1
    assert sample(text, "hearth_cluster_workers_lost_total") == 3
    expected = {
        "hearth_cluster_worker_up": {"box-1": 1, "box-2": 0},
        "hearth_cluster_worker_running": {"box-1": 2, "box-2": 0},
        "hearth_cluster_worker_cpus": {"box-1": 4.0, "box-2": 2.5},
        "hearth_cluster_worker_memory_mb": {"box-1": 8192, "box-2": 512},
        "hearth_cluster_worker_gpus": {"box-1": 1, "box-2": 0},
    }
    for name, by_worker in expected.items():
        assert {s.labels["worker"]: s.value for s in samples(text, name)} == by_worker, name
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["hearth_cluster_workers_lost"] == "counter" and types["hearth_cluster_workers"] == "gauge"

    # read at every scrape: a worker that leaves takes its series along; a newcomer brings its own
    cluster.listed = [BOX_1, worker("box-3", running=1)]
    cluster.lost = 4
    text = metrics.render().decode()
    running = {s.labels["worker"]: s.value for s in samples(text, "hearth_cluster_worker_running")}
    assert running == {"box-1": 2, "box-3": 1}
    assert sample(text, "hearth_cluster_workers", state="dead") == 0
    assert sample(text, "hearth_cluster_workers_lost_total") == 4


def test_worker_series_are_capped_and_keep_the_alive_workers_first() -> None:
    many = [worker(f"w{n:04d}", alive=n % 2 == 0) for n in range(MAX_CLUSTER_WORKER_SERIES + 100)]
    text = watched(StubCluster(many, lost_total=0)).render().decode()

    labels = [s.labels["worker"] for s in samples(text, "hearth_cluster_worker_up")]
    assert len(labels) == MAX_CLUSTER_WORKER_SERIES
    alive = {w.name for w in many if w.alive}
    assert alive <= set(labels)  # the 178 alive ones all fit; the dead fill what is left
    # the counts still cover every worker
    assert sample(text, "hearth_cluster_workers", state="alive") == len(alive)
    assert sample(text, "hearth_cluster_workers", state="dead") == len(many) - len(alive)


def test_two_workers_of_one_name_get_a_series_each() -> None:
    twin = dataclasses.replace(BOX_1, node_id="ff" * 28, running=5)
    text = watched(StubCluster([BOX_1, twin], lost_total=0)).render().decode()

    running = {s.labels["worker"]: s.value for s in samples(text, "hearth_cluster_worker_running")}
    assert running == {"box-1": 2, "box-1/ffffffff": 5}


def test_a_node_without_a_cluster_has_no_cluster_metrics() -> None:
    text = Metrics().render().decode()
    assert "hearth_cluster" not in text


# -- GET /v1/overview ---------------------------------------------------------------------------------


async def overview(ln: LiveNode) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{ln.url}/v1/overview") as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
    jsonschema.Draft202012Validator(OVERVIEW_SCHEMA).validate(body)
    return body


BOX_1_JSON = {
    "node_id": BOX_1.node_id,
    "name": "box-1",
    "address": "127.0.0.1",
    "alive": True,
    "cpus": 4.0,
    "memory_mb": 8192,
    "gpus": 1,
    "models": [MODEL],
    "running": 2,
    "lost": 0,
}


async def test_the_overview_lists_the_workers_of_the_cluster(live_node: LiveNode) -> None:
    doc = await overview(live_node)
    assert doc["cluster"] is None  # a node that runs its jobs itself

    with attached(live_node, StubCluster([BOX_2, BOX_1], lost_total=3)) as cluster:
        doc = await overview(live_node)
        assert doc["cluster"] == {
            "engine": "ray",
            "address": ADDRESS,
            "alive": 1,
            "lost_runs": 3,
            "workers": [  # by name
                BOX_1_JSON,
                {
                    **BOX_1_JSON,
                    "node_id": BOX_2.node_id,
                    "name": "box-2",
                    "alive": False,
                    "cpus": 2.5,
                    "memory_mb": 512,
                    "gpus": 0,
                    "models": [],
                    "running": 0,
                    "lost": 3,
                },
            ],
        }

        # every poll reads the cluster's list anew: a worker that died is shown dead at once
        cluster.listed = [dataclasses.replace(BOX_1, alive=False, running=0, lost=2)]
        cluster.lost = 5
        doc = await overview(live_node)
        assert doc["cluster"]["alive"] == 0 and doc["cluster"]["lost_runs"] == 5
        assert doc["cluster"]["workers"] == [{**BOX_1_JSON, "alive": False, "running": 0, "lost": 2}]


# -- the dashboard ------------------------------------------------------------------------------------


class _Workers(HTMLParser):
    """The rows of the dashboard's workers table (their cells' text), and whether its card is hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: bool | None = None
        self.rows: list[list[str]] = []
        self._in_table = False
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if named.get("id") == "workers-card":
            self.hidden = "hidden" in named
        elif named.get("id") == "workers":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self.rows.append([])
        elif self._in_table and tag in ("td", "th"):
            self._in_cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        elif tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.rows[-1][-1] += data


async def dashboard(ln: LiveNode, profile: Path) -> _Workers:
    """The dashboard's DOM after two polls, as headless Chromium drew it."""
    dom = await asyncio.to_thread(browse, chromium(), f"{ln.url}/ui", profile, "--dump-dom")
    found = _Workers()
    found.feed(dom.decode())
    assert found.hidden is not None, "the page has no workers card"
    return found


async def test_the_dashboard_draws_a_workers_table_only_for_a_node_with_a_cluster(
    live_node: LiveNode, tmp_path: Path
) -> None:
    page = await dashboard(live_node, tmp_path / "profile-1")
    assert page.hidden is True and page.rows == []

    with attached(live_node, StubCluster([BOX_2, BOX_1], lost_total=3)):
        page = await dashboard(live_node, tmp_path / "profile-2")
    assert page.hidden is False
    assert page.rows == [
        ["name", "alive", "CPUs", "memory", "GPUs", "models", "running", "lost"],
        ["box-1", "alive", "4", "8.0 GiB", "1", "1", "2", "0"],
        ["box-2", "dead", "2.50", "512 MiB", "0", "0", "0", "3"],
    ]
