"""Hearth provider: capacity discovery, policy, work estimation, pricing, and the node's offer.

The order a bid takes (the README's Bidding): :func:`screen` the job against policy,
:meth:`WorkEstimator.estimate` its work (batches with the :class:`ModelCatalog`'s tokenizers),
:meth:`CapacityLedger.reserve` what it needs, then :meth:`Pricer.ask` and :func:`check_max_price`.

What the node sells is advertised as a signed offer (:class:`OfferIssuer`, :func:`offer_document`), served
at ``GET /v1/capacity`` and pushed to the ``[registry]`` URLs by an :class:`OfferPusher`; the node lists
its DID and endpoint in the on-chain registry (``[market]``) through a :class:`MarketListing`.

Nothing is loaded here until a name is asked for (``from provider import Pricer`` imports
:mod:`provider.pricing` then): a tool that needs only :mod:`provider.capacity` on a bare GPU machine
(``make gpu-check``) does not pull in the payment stack through this face.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from provider.capacity import CapacityLedger, DiskInfo, GpuInfo, Hold, MachineInfo, Resources, discover
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
    from provider.listing import MarketListing, listing_wanted
    from provider.offers import OfferIssuer, offer_document, offer_fingerprint
    from provider.policy import screen
    from provider.pricing import Bid, PriceBreakdown, Pricer, check_max_price
    from provider.registry import OfferPusher

_HOMES = {
    "BatchEstimator": "provider.estimate",
    "BatchModels": "provider.estimate",
    "Bid": "provider.pricing",
    "CapacityLedger": "provider.capacity",
    "CatalogModel": "provider.catalog",
    "DiskInfo": "provider.capacity",
    "GpuInfo": "provider.capacity",
    "Hold": "provider.capacity",
    "InputProbe": "provider.estimate",
    "MachineInfo": "provider.capacity",
    "MarketListing": "provider.listing",
    "MediaEstimator": "provider.estimate",
    "ModelCatalog": "provider.catalog",
    "OfferIssuer": "provider.offers",
    "OfferPusher": "provider.registry",
    "PriceBreakdown": "provider.pricing",
    "Pricer": "provider.pricing",
    "Resources": "provider.capacity",
    "WorkEstimate": "provider.estimate",
    "WorkEstimator": "provider.estimate",
    "check_max_price": "provider.pricing",
    "discover": "provider.capacity",
    "estimator_for": "provider.estimate",
    "listing_wanted": "provider.listing",
    "offer_document": "provider.offers",
    "offer_fingerprint": "provider.offers",
    "screen": "provider.policy",
}
"""Each public name and the module that defines it."""

__all__ = [
    "BatchEstimator",
    "BatchModels",
    "Bid",
    "CapacityLedger",
    "CatalogModel",
    "DiskInfo",
    "GpuInfo",
    "Hold",
    "InputProbe",
    "MachineInfo",
    "MarketListing",
    "MediaEstimator",
    "ModelCatalog",
    "OfferIssuer",
    "OfferPusher",
    "PriceBreakdown",
    "Pricer",
    "Resources",
    "WorkEstimate",
    "WorkEstimator",
    "check_max_price",
    "discover",
    "estimator_for",
    "listing_wanted",
    "offer_document",
    "offer_fingerprint",
    "screen",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'provider' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
