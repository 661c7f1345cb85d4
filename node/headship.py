"""A node as the head of a Ray cluster (DESIGN §14): joining it at start, following what it offers, and
noting in the journal where each container of an attempt ran.

With ``[cluster]`` the node joins the cluster as its driver before anything else starts; its workers'
resources become what the node sells (the offer, the ledger, the scheduler's limit) and every container
runs on them through :class:`cluster.RemoteRunner`. Ray is loaded only here, so a node without
``[cluster]`` never imports it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from core.errors import HearthError
from sandbox.runner import RunSpec

if TYPE_CHECKING:
    from node.daemon import Node

log = logging.getLogger("hearth.node")


async def join_cluster(node: Node) -> None:
    """Join the node's cluster (no-op without ``[cluster]``) and put its runs on the workers."""
    section = node.cfg.cluster
    if section is None:
        return
    from cluster import RayCluster, RemoteRunner

    cluster = RayCluster(section)
    await cluster.connect()
    node.cluster = cluster
    node.metrics.watch_cluster(cluster.workers, lambda: cluster.lost_total)
    follow_cluster(node)
    node.runner.close()
    node.runner = RemoteRunner(
        cluster,
        node=node.did,
        sandbox=node.cfg.sandbox,
        storage=node.cfg.storage,
        head_url=lambda: (
            (node.cfg.cluster.head_url if node.cfg.cluster else None) or node.cfg.endpoint or node.listen_url
        ),
        on_placed=lambda spec, worker, node_id: note_placement(node, spec, worker, node_id),
        on_start=lambda _spec: node.metrics.container_started(),
    )
    log.info(
        "joined the Ray cluster at %s: %d worker(s), offering %s",
        section.address,
        sum(1 for w in cluster.workers() if w.alive),
        node.machine.offered.to_dict(),
    )


def follow_cluster(node: Node) -> None:
    """Take the cluster's current resources as what the node offers (the offer, the ledger, the queue)."""
    if node.cluster is None:
        return
    machine = node.cluster.machine(node.machine)
    if machine.offered == node.machine.offered and machine.workers == node.machine.workers:
        return
    node.machine = machine
    node.ledger.resize(node.sold(machine))
    if node.scheduler is not None:
        node.scheduler.grow(machine.offered)


def note_placement(node: Node, spec: RunSpec, worker: str, node_id: str) -> None:
    """The journal says which worker ran each container of an attempt (runs of quotes have no job)."""
    with contextlib.suppress(HearthError, RuntimeError):  # RuntimeError: the node is not started
        journal = node.journal
        if journal.get(spec.job_id) is None:
            return
        journal.append_event(
            spec.job_id,
            "note",
            f"attempt {spec.attempt + 1}: {spec.argv[0]} runs on worker {worker}",
            {"worker": worker, "node_id": node_id, "attempt": spec.attempt + 1, "program": spec.argv[0]},
            actor="cluster",
        )
