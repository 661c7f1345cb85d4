"""The node's offer: what it sells, at what prices, where, and who is paid, as one signed document.

:func:`offer_document` builds the offer from the node's state alone (no I/O); :class:`OfferIssuer` reads
the disk, stamps each offer with ``issued_at`` and a ``sequence`` and signs it with the node DID. The one
issuer serves both ``GET /v1/capacity`` and the pushes to registries (:mod:`provider.registry`), so what
a registry receives is exactly what anyone can fetch from the node.

A registry keeps, per node DID, the offer with the highest ``sequence``: sequences only grow, across
restarts too (they are milliseconds since the epoch, bumped by one where two offers share one).
:func:`offer_fingerprint` tells whether two offers differ in anything but their stamps and readings that
drift by themselves (free disk), which is what makes an offer worth pushing before its heartbeat.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from core.config import NodeConfig
from core.envelope import canonical_json
from payments.keys import Signer
from payments.signing import signed_document
from provider.capacity import CapacityLedger, DiskInfo, MachineInfo, read_disk
from provider.catalog import ModelCatalog

OFFER_CLAIM: Final = "offer"
"""The claim of the node's JWT that carries the offer (``{"offer": {...}}``)."""

VOLATILE_FIELDS: Final = frozenset({"issued_at", "sequence", "jwt", "disk"})
"""Top-level fields left out of :func:`offer_fingerprint`: the stamps, the signature, and the free disk
(which moves with every upload; heartbeats carry it)."""


class OfferSource(Protocol):
    """The node state an offer is made of; :class:`node.daemon.Node` is one."""

    @property
    def did(self) -> str: ...
    @property
    def cfg(self) -> NodeConfig: ...
    @property
    def ledger(self) -> CapacityLedger: ...
    @property
    def machine(self) -> MachineInfo: ...
    @property
    def models(self) -> ModelCatalog: ...
    @property
    def payout_address(self) -> str | None: ...
    @property
    def state_dir(self) -> Path: ...


def offer_document(source: OfferSource, *, disk: DiskInfo) -> dict[str, Any]:
    """The offer of ``source`` as plain JSON data, without stamps or signature.

    ``resources`` is the capacity ledger now (total, used by quotes and jobs, free); ``machine`` is what
    discovery found at start (GPUs with driver and CUDA versions); ``disk`` is the state directory's
    filesystem as read by the caller. ``payout_address`` and ``payment`` are None on a node without
    ``[chain]``, which takes no payments.
    """
    cfg = source.cfg
    pricing = cfg.pricing
    machine = source.machine.to_dict()
    del machine["disk"]  # the disk at start; the offer carries the current reading in "disk"
    chain = cfg.chain
    return {
        "node": source.did,
        "name": cfg.node.name,
        "endpoint": cfg.endpoint,  # [market] endpoint, else [node] public_url: what the registry lists
        "payout_address": source.payout_address,
        "payment": None
        if chain is None
        else {
            "currency": pricing.currency,
            "chain_id": chain.chain_id,
            "escrow": chain.escrow,
            "token": chain.token,
        },
        "kinds": list(cfg.policy.kinds),
        "models": source.models.offers(
            {"input_1k_tokens": pricing.input_1k_tokens, "output_1k_tokens": pricing.output_1k_tokens}
        ),
        "resources": source.ledger.snapshot(),
        # Sizes only: where the node keeps its state is the operator's business, not the market's.
        "disk": {"total_mb": disk.total_mb, "free_mb": disk.free_mb},
        "machine": machine,
        "limits": {
            "max_timeout_seconds": cfg.policy.max_timeout_seconds,
            "max_output_mb": cfg.policy.max_output_mb,
            "max_cpus": cfg.policy.max_cpus,
            "max_memory_mb": cfg.policy.max_memory_mb,
            "max_gpus": cfg.policy.max_gpus,
            "max_body_bytes": cfg.api.max_body_bytes,
            "quote_ttl_seconds": cfg.api.quote_ttl_seconds,
        },
        "prices": {
            "currency": pricing.currency,
            "cpu_second": pricing.cpu_second,
            "gpu_second": pricing.gpu_second,
            "gpu_second_by_model": dict(pricing.gpu_second_by_model),
            "output_mb": pricing.output_mb,
            "input_1k_tokens": pricing.input_1k_tokens,
            "output_1k_tokens": pricing.output_1k_tokens,
            "minimum_per_job": pricing.minimum_per_job,
            "surge": {"threshold": pricing.surge.threshold, "max_factor": pricing.surge.max_factor},
        },
    }


def offer_fingerprint(document: dict[str, Any]) -> str:
    """sha256 (hex) of the offer's JCS bytes without :data:`VOLATILE_FIELDS`.

    Equal for an offer and its signed, stamped copy; different as soon as capacity, prices, models,
    limits, kinds, endpoint or payout differ.
    """
    stable = {key: value for key, value in document.items() if key not in VOLATILE_FIELDS}
    return hashlib.sha256(canonical_json(stable)).hexdigest()


class OfferIssuer:
    """Makes the node's signed offers: the current document, stamped with ``issued_at`` and ``sequence``.

    One per node, shared by ``GET /v1/capacity`` and the registry pushes so that both draw from the same
    sequence. Not thread-safe: it lives on the event loop.
    """

    def __init__(self, source: OfferSource, signer: Signer, *, now: Callable[[], float]) -> None:
        self._source = source
        self._signer = signer
        self._now = now
        self._sequence = 0

    def document(self) -> dict[str, Any]:
        """The offer as it stands, unsigned and unstamped (reads the free disk)."""
        return offer_document(self._source, disk=read_disk(self._source.state_dir))

    def issue(self) -> dict[str, Any]:
        """A new signed offer: :meth:`document` plus ``issued_at`` (Unix seconds), ``sequence``, ``jwt``."""
        now = self._now()
        self._sequence = max(self._sequence + 1, int(now * 1000))
        stamped = {**self.document(), "issued_at": int(now), "sequence": self._sequence}
        return signed_document(self._signer, OFFER_CLAIM, self._source.did, stamped, now=now)
