"""Hearth payments: DIDs, keys and signatures (DID-JWT), the escrow and getting paid through it.

DIDs, keys and DID-JWTs are re-exported here; ``payments.did``, ``payments.keys`` and ``payments.jwt`` hold
the implementations. The escrow side loads web3 and eth-account, so it is imported from its modules, only
by a node with a chain: :class:`payments.settlement.Settlement` is the one object a node holds for it,
composing the terms of quotes (:mod:`payments.terms`), the funding watcher (:mod:`payments.funding`), the
receipts and their verdicts (:mod:`payments.verdicts`) and the transaction outbox (:mod:`payments.outbox`).
"""

from payments.did import (
    DidMethod,
    canonical_did,
    did_key_from_ed25519,
    did_method,
    did_pkh,
    ed25519_public_from_did_key,
    parse_did_pkh,
    to_checksum_address,
    verification_fragment,
)
from payments.jwt import (
    MemoryReplayCache,
    ReplayCache,
    RequestVerifier,
    VerifiedRequest,
    b64url_decode,
    b64url_encode,
    decode_unverified,
    request_claims,
    sign_jwt,
    verify_node_token,
    verify_signature,
)
from payments.keys import (
    Alg,
    Ed25519Signer,
    EthSigner,
    Signer,
    load_key,
    new_ed25519,
    new_eth,
    public_summary,
    save_key,
)

__all__ = [
    "Alg",
    "DidMethod",
    "Ed25519Signer",
    "EthSigner",
    "MemoryReplayCache",
    "ReplayCache",
    "RequestVerifier",
    "Signer",
    "VerifiedRequest",
    "b64url_decode",
    "b64url_encode",
    "canonical_did",
    "decode_unverified",
    "did_key_from_ed25519",
    "did_method",
    "did_pkh",
    "ed25519_public_from_did_key",
    "load_key",
    "new_ed25519",
    "new_eth",
    "parse_did_pkh",
    "public_summary",
    "request_claims",
    "save_key",
    "sign_jwt",
    "to_checksum_address",
    "verification_fragment",
    "verify_node_token",
    "verify_signature",
]
