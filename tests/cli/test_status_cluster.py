"""``hearth status`` for a node in front of a cluster: a workers table for people, the overview's
``cluster`` as it is with ``--json``; neither for a node that runs its jobs itself.

The node is a real one behind HTTP; its ``cluster`` is the stub of the node's observability tests (a real
Ray cluster is exercised by the cluster's end-to-end tests).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import LiveNode
from tests.node.test_cluster_observability import ADDRESS, BOX_1, BOX_2, StubCluster, attached
from tests.node.test_overview import hearth


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wide enough that rich draws every column whole (it reads COLUMNS when not on a terminal)."""
    monkeypatch.setenv("COLUMNS", "160")


async def test_status_shows_the_workers_of_the_cluster(
    live_node: LiveNode, capsys: pytest.CaptureFixture[str]
) -> None:
    with attached(live_node, StubCluster([BOX_2, BOX_1], lost_total=3)):
        await show_the_workers(live_node, capsys)


async def show_the_workers(live_node: LiveNode, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = await hearth(capsys, "status", "--node", live_node.url)
    assert code == 0, out
    assert f"Workers (ray at {ADDRESS}: 1 alive, 1 dead; 3 runs lost)" in out, out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("│ box-")}
    # worker, state, CPUs, memory (two words), GPUs, models, running, lost, address, between borders
    assert [c for c in rows["box-1"] if c != "│"] == [
        "box-1", "alive", "4", "8.0", "GiB", "1", "1", "2", "0", "127.0.0.1"
    ]  # fmt: skip
    assert [c for c in rows["box-2"] if c != "│"] == [
        "box-2", "dead", "2.5", "512", "MiB", "0", "0", "0", "3", "127.0.0.1"
    ]  # fmt: skip

    # --watch, not on a terminal: each frame as it comes, the workers in every one
    code, out = await hearth(capsys, "status", "--node", live_node.url, "--watch", "0.2", "--count", "2")
    assert code == 0 and out.count("Workers (ray at") == 2 and out.count("Capacity") == 2, out

    code, out = await hearth(capsys, "status", "--node", live_node.url, "--json")
    assert code == 0
    cluster = json.loads(out)["cluster"]
    assert (cluster["alive"], cluster["lost_runs"]) == (1, 3)
    assert [w["name"] for w in cluster["workers"]] == ["box-1", "box-2"]
    assert cluster["workers"][0] == {**BOX_1.to_dict(), "models": list(BOX_1.models)}


async def test_status_of_a_node_without_a_cluster_has_no_workers(
    live_node: LiveNode, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = await hearth(capsys, "status", "--node", live_node.url)
    assert code == 0 and "Capacity" in out
    assert "Workers" not in out

    code, out = await hearth(capsys, "status", "--node", live_node.url, "--json")
    assert code == 0 and json.loads(out)["cluster"] is None
