"""Executing attempts on a Ray cluster: one Hearth node in front of many machines (DESIGN §14).

The node stays the head: API, journal, pricing, settlement and its scheduler. What changes is where each
container runs: :class:`RemoteRunner` (the sandbox runner of a node with ``[cluster]``) places every run
on a worker of the :class:`RayCluster` as a Ray task with the run's CPUs, memory, GPUs and, for a model,
that model's resource; the worker fetches the inputs by CID from the head's gateway, runs the same
hardened container on its own Docker engine and streams the output back as a verified CAR.

- :class:`RayCluster` — joining the cluster, its workers (:class:`WorkerInfo`), the capacity it sells.
- :class:`RemoteRunner` — a run on a worker, as :class:`sandbox.runner.SandboxRunner` runs one here.
- :mod:`cluster.worker` — a worker's home and the ``hearth worker prepare|join`` steps.
- :mod:`cluster.devcluster` — a real local cluster (head and workers on this machine) for tests and demos.
- :mod:`cluster.names` — the names of Hearth's custom resources.
"""

from __future__ import annotations

from cluster._ray import RayCluster, WorkerInfo
from cluster._runner import RemoteRunner
from cluster.names import MODEL_RESOURCE_UNITS, model_resource, worker_resource

__all__ = [
    "MODEL_RESOURCE_UNITS",
    "RayCluster",
    "RemoteRunner",
    "WorkerInfo",
    "model_resource",
    "worker_resource",
]
