"""The names a Hearth cluster gives Ray's custom resources: a worker's and a model's.

A worker advertises ``hearth-worker:<name>`` (1 unit) so the head can tell its nodes apart by the name the
operator chose, and ``hearth-model:<cid>`` (:data:`MODEL_RESOURCE_UNITS` units) for each model it holds, so a
task that mounts a model asks for 1 unit of it and lands only where the weights are.
"""

from __future__ import annotations

from typing import Final

MODEL_RESOURCE_UNITS: Final = 1000
WORKER_PREFIX: Final = "hearth-worker:"
MODEL_PREFIX: Final = "hearth-model:"


def worker_resource(name: str) -> str:
    """The custom resource naming worker ``name``."""
    return f"{WORKER_PREFIX}{name}"


def model_resource(cid: str) -> str:
    """The custom resource a worker holding the model ``cid`` advertises."""
    return f"{MODEL_PREFIX}{cid}"
