"""A real Ray cluster on this machine: a head and two workers joined with ``hearth worker join``, their
resources as the head sees them, the orphans a join removes, a worker lost at its raylet, and a stop that
leaves no process of the cluster behind."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import psutil
import pytest

from cluster.devcluster import DevCluster
from cluster.names import MODEL_RESOURCE_UNITS, model_resource, worker_resource
from sandbox.runner import LABEL_NODE, LABEL_WORKER
from tests.conftest import TinyModel

DEATH_SECONDS = 15.0  # the head's health check declares a silent node dead in ~3 s


def _live(pgid: int) -> list[int]:
    """The pids of process group ``pgid`` that still run (a zombie has ended; its reaper is not ours)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return found


@pytest.fixture(scope="module")
def names() -> dict[str, str]:
    """Worker names unique to this run (container labels are engine-wide)."""
    run = uuid.uuid4().hex[:8]
    return {"w1": f"w1-{run}", "w2": f"w2-{run}", "other": f"other-{run}"}


@pytest.fixture(scope="module")
def orphans(
    docker_client: Any, sandbox_images: dict[str, str], names: dict[str, str]
) -> Iterator[dict[str, str]]:
    """A container left by worker w1 (for some node) and one of another worker, both still running."""
    made = {}
    for key in ("w1", "other"):
        container = docker_client.containers.run(
            sandbox_images["hearth/ffmpeg:latest"],
            entrypoint=["sleep", "600"],
            detach=True,
            network_mode="none",
            labels={LABEL_WORKER: names[key], LABEL_NODE: "x"},
        )
        made[key] = str(container.id)
    try:
        yield made
    finally:
        for container_id in made.values():
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.containers.get(container_id).remove(force=True)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: TinyModel,
    orphans: dict[str, str],
    names: dict[str, str],
) -> Iterator[DevCluster]:
    root = tmp_path_factory.mktemp("cluster")
    # what a run lost with its machine left in the worker's folder (its reaper died too)
    (root / "workers" / names["w1"] / "work" / "hj_lost-0-cafe" / "out").mkdir(parents=True)
    with DevCluster(root) as dev:
        dev.add_worker(names["w1"], cpus=1, memory_mb=1024, models={tiny_model.cid: tiny_model.path})
        dev.add_worker(names["w2"], cpus=1, memory_mb=1024)
        yield dev


def test_workers_join_with_their_name_model_and_limits(
    cluster: DevCluster, tiny_model: TinyModel, names: dict[str, str]
) -> None:
    w1, w2 = names["w1"], names["w2"]
    alive = cluster.alive_workers()
    assert alive == {w1: cluster.workers[w1].node_id, w2: cluster.workers[w2].node_id}
    by_id = {node["node_id"]: node for node in cluster.nodes()}
    first = by_id[alive[w1]]["resources"]
    assert first[worker_resource(w1)] == 1
    assert first[model_resource(tiny_model.cid)] == MODEL_RESOURCE_UNITS
    assert (first["CPU"], first["memory"]) == (1, 1024 * 1024 * 1024)
    assert model_resource(tiny_model.cid) not in by_id[alive[w2]]["resources"]
    head = [node for node in by_id.values() if "node:__internal_head__" in node["resources"]]
    assert len(head) == 1 and "CPU" not in head[0]["resources"]  # every task goes to a worker


# A task pinned to one worker reports the worker home it finds, as the head's task code will.
TASK_DRIVER = r"""
import json, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, configure_logging=False)

@ray.remote(num_cpus=1, resources={sys.argv[2]: 1})
def where():
    import os
    from cluster.worker import WorkerHome
    home = WorkerHome.load()
    return {"env": os.environ["HEARTH_WORKER_HOME"], "name": home.name, "path": str(home.path)}

print(json.dumps(ray.get(where.remote(), timeout=60)))
"""


def test_a_task_on_a_worker_finds_that_workers_home(cluster: DevCluster, names: dict[str, str]) -> None:
    w2 = cluster.workers[names["w2"]]
    proc = subprocess.run(
        [sys.executable, "-c", TASK_DRIVER, cluster.address, worker_resource(w2.name)],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"env": str(w2.home.path), "name": w2.name, "path": str(w2.home.path)}


def test_join_removed_the_workers_orphans_only(
    cluster: DevCluster, docker_client: Any, orphans: dict[str, str], names: dict[str, str]
) -> None:
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(orphans["w1"])
    assert docker_client.containers.get(orphans["other"]).status == "running"
    assert list(cluster.workers[names["w1"]].home.work_dir.iterdir()) == []  # and its attempt folders


def test_a_killed_raylet_makes_that_worker_dead_and_leaves_the_other(
    cluster: DevCluster, names: dict[str, str]
) -> None:
    w1, w2 = names["w1"], names["w2"]
    raylet = cluster.kill_raylet(w1)
    started = time.monotonic()
    cluster.wait_worker_dead(w1, timeout=DEATH_SECONDS)
    assert time.monotonic() - started < DEATH_SECONDS
    assert not psutil.pid_exists(raylet) or psutil.Process(raylet).status() == psutil.STATUS_ZOMBIE
    assert cluster.alive_workers() == {w2: cluster.workers[w2].node_id}
    dead = [n for n in cluster.nodes() if n["node_id"] == cluster.workers[w1].node_id]
    assert [n["alive"] for n in dead] == [False]


def test_stop_leaves_no_process_of_the_cluster(cluster: DevCluster, names: dict[str, str]) -> None:
    w2 = cluster.workers[names["w2"]]
    assert _live(w2.pgid), "worker w2 runs Ray processes in its own group"
    cluster.stop_worker(names["w2"])
    assert _live(w2.pgid) == []
    head = cluster.head_pgid
    assert head is not None and _live(head)
    groups = [w.pgid for w in cluster.workers.values()] + [head]
    cluster.stop()
    assert [pid for pgid in groups for pid in _live(pgid)] == []
    assert not (cluster.root / "ray").exists()


def test_a_worker_needs_the_head(tmp_path: Path) -> None:
    dev = DevCluster(tmp_path)
    with pytest.raises(RuntimeError, match="start the head first"):
        dev.add_worker("w")
    dev.stop()  # nothing started: nothing to end
