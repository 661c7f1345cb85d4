"""Hearth provider: capacity discovery, policy, work estimation, pricing, and the node's offer.

The order a bid takes (the README's Bidding): :func:`screen` the job against policy,
:meth:`WorkEstimator.estimate` its work (batches with the :class:`ModelCatalog`'s tokenizers),
:meth:`CapacityLedger.reserve` what it needs, then :meth:`Pricer.ask` and :func:`check_max_price`.

What the node sells is advertised as a signed offer (:class:`OfferIssuer`, :func:`offer_document`), served
at ``GET /v1/capacity`` and pushed to the ``[registry]`` URLs by an :class:`OfferPusher`; the node lists
its DID and endpoint in the on-chain registry (``[market]``) through a :class:`MarketListing`.
"""

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
