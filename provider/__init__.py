"""Hearth provider: capacity discovery, policy, work estimation and pricing.

The order a bid takes (DESIGN §5): :func:`screen` the job against policy, :meth:`WorkEstimator.estimate`
its work (batches with the :class:`ModelCatalog`'s tokenizers), :meth:`CapacityLedger.reserve` what
it needs, then :meth:`Pricer.ask` and :func:`check_max_price`.
"""

from provider.capacity import CapacityLedger, GpuInfo, Hold, MachineInfo, Resources, discover
from provider.catalog import CatalogModel, ModelCatalog
from provider.estimate import (
    BatchEstimator,
    BatchModels,
    InputProbe,
    MediaEstimator,
    WorkEstimate,
    WorkEstimator,
    estimator_for,
)
from provider.policy import screen
from provider.pricing import Bid, PriceBreakdown, Pricer, check_max_price

__all__ = [
    "BatchEstimator",
    "BatchModels",
    "Bid",
    "CapacityLedger",
    "CatalogModel",
    "GpuInfo",
    "Hold",
    "InputProbe",
    "MachineInfo",
    "MediaEstimator",
    "ModelCatalog",
    "PriceBreakdown",
    "Pricer",
    "Resources",
    "WorkEstimate",
    "WorkEstimator",
    "check_max_price",
    "discover",
    "estimator_for",
    "screen",
]
