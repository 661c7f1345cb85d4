"""Documents the node signs: a JSON document plus ``jwt``, that document as a claim signed by the node DID.

Statuses, results and the capacity offer all leave the node this way (docs/protocol.md: everything others rely
on is signed by the node DID), whether they answer an HTTP request or are pushed to a registry; one function
makes them so a document reads the same wherever it is seen.
"""

from __future__ import annotations

import secrets
from typing import Any

from payments.jwt import sign_jwt
from payments.keys import Signer

SIGNED_DOCUMENT_TTL_SECONDS = 3600


def signed_document(
    signer: Signer,
    kind: str,
    subject: str,
    document: dict[str, Any],
    *,
    now: float,
    ttl_seconds: int = SIGNED_DOCUMENT_TTL_SECONDS,
) -> dict[str, Any]:
    """``document`` plus ``jwt``: the same document signed by ``signer`` under the claim ``kind``.

    The token's claims are ``iss`` (the signer's DID), ``sub`` (what it is about: a job id, or the node
    DID for an offer), ``iat``, ``exp`` (``ttl_seconds`` later), a random ``jti`` and ``kind: document``.
    Anyone can check it with the DID alone (e.g. :func:`payments.jwt.verify_node_token`).
    """
    iat = int(now)
    claims = {
        "iss": signer.did,
        "sub": subject,
        "iat": iat,
        "exp": iat + ttl_seconds,
        "jti": f"{kind}-{secrets.token_hex(8)}",
        kind: document,
    }
    return {**document, "jwt": sign_jwt(signer, claims)}
