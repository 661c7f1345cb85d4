"""A validator's receipt as a W3C Verifiable Credential: issued by the validator, verified by anyone.

:func:`issue_credential` wraps a signed :class:`~payments.receipts.Receipt` and its EIP-712 signature in a
JSON-LD credential proved with ``EcdsaSecp256k1RecoverySignature2020`` by the key behind the validator's
``did:pkh`` (didkit signs it). :func:`verify_credential` checks that proof with didkit and then checks that
the EIP-712 signature inside recovers to the issuer's account, so a credential vouches for exactly one
receipt of its issuer. Every term expands under an inline ``@vocab``: no context document is fetched.

Refusals are :class:`~core.errors.SettlementError`: ``credential_not_issued``, ``credential_invalid`` and
``credential_signer_mismatch``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, cast

import coincurve
import didkit

from core.errors import SettlementError
from payments.did import parse_did_pkh
from payments.jwt import b64url_encode
from payments.keys import EthSigner
from payments.receipts import Receipt, receipt_signer

__all__ = ["RECEIPT_CREDENTIAL_TYPE", "RECEIPT_VOCAB", "issue_credential", "verify_credential"]

RECEIPT_CREDENTIAL_TYPE: Final = "HearthValidationReceipt"
# Every term of the credential expands under this vocabulary, so no context document is ever fetched.
RECEIPT_VOCAB: Final = "https://hearth.dev/ns/receipt#"
VC_CONTEXT: Final = "https://www.w3.org/2018/credentials/v1"
# The stub declares the exception as an instance; it is the class didkit raises.
DIDKIT_ERROR: Final = cast(type[Exception], didkit.DIDKitException)
# did:pkh names a recovery method: didkit signs for it only with a key marked ES256K-R.
VC_KEY_ALG: Final = "ES256K-R"


def _refused(code: str, message: str, **details: Any) -> SettlementError:
    return SettlementError(code, message, details=details)


def _secp256k1_jwk(signer: EthSigner) -> str:
    """The signer's secp256k1 key as the private JWK didkit signs with (marked ES256K-R)."""
    secret = signer.private_key_bytes()
    public = coincurve.PrivateKey(secret).public_key.format(compressed=False)
    return json.dumps(
        {
            "kty": "EC",
            "crv": "secp256k1",
            "alg": VC_KEY_ALG,
            "x": b64url_encode(public[1:33]),
            "y": b64url_encode(public[33:]),
            "d": b64url_encode(secret),
        }
    )


async def issue_credential(
    signer: EthSigner, receipt: Receipt, signature: bytes, *, issued_at: datetime | None = None
) -> dict[str, Any]:
    """The receipt and its EIP-712 signature as a W3C Verifiable Credential issued by the validator.

    JSON-LD with an inline ``@vocab`` (nothing to fetch), proved with
    ``EcdsaSecp256k1RecoverySignature2020`` by the key behind the validator's ``did:pkh``; the subject is
    the provider's account on the receipt's chain.
    """
    when = (issued_at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    credential = {
        "@context": [VC_CONTEXT, {"@vocab": RECEIPT_VOCAB}],
        "type": ["VerifiableCredential", RECEIPT_CREDENTIAL_TYPE],
        "issuer": signer.did,
        "issuanceDate": when,
        "credentialSubject": {
            "id": f"did:pkh:eip155:{receipt.chain_id}:{receipt.provider}",
            "receipt": receipt.to_json(),
            "signature": "0x" + signature.hex(),
        },
    }
    options = {"proofPurpose": "assertionMethod", "verificationMethod": signer.kid}
    try:
        issued = await didkit.issue_credential(
            json.dumps(credential), json.dumps(options), _secp256k1_jwk(signer)
        )
    except DIDKIT_ERROR as exc:
        raise _refused("credential_not_issued", f"didkit could not issue the credential: {exc}") from None
    doc: dict[str, Any] = json.loads(issued)
    return doc


async def verify_credential(credential: Mapping[str, Any]) -> tuple[Receipt, bytes]:
    """The receipt and signature a receipt credential carries, once both proofs hold.

    didkit must verify the credential's proof (``credential_invalid`` otherwise), and the EIP-712
    signature inside must recover to the issuer's account (``credential_signer_mismatch``).
    """
    options = json.dumps({"proofPurpose": "assertionMethod"})
    try:
        answer = json.loads(await didkit.verify_credential(json.dumps(dict(credential)), options))
    except DIDKIT_ERROR as exc:
        raise _refused("credential_invalid", f"didkit refused the credential: {exc}") from None
    if answer.get("errors") or "proof" not in answer.get("checks", []):
        raise _refused(
            "credential_invalid", "the credential's proof does not verify", errors=answer.get("errors")
        )
    subject = credential.get("credentialSubject")
    types = credential.get("type")
    if (
        not isinstance(subject, Mapping)
        or not isinstance(types, list)
        or RECEIPT_CREDENTIAL_TYPE not in types
    ):
        raise _refused("credential_invalid", f"not a {RECEIPT_CREDENTIAL_TYPE} credential")
    receipt = Receipt.from_json(subject.get("receipt"))
    signature = _signature_bytes(subject.get("signature"))
    issuer = str(credential.get("issuer"))
    _, address = parse_did_pkh(issuer)
    if receipt_signer(receipt, signature) != address:
        raise _refused(
            "credential_signer_mismatch",
            "the receipt inside the credential was not signed by its issuer",
            issuer=issuer,
        )
    return receipt, signature


def _signature_bytes(value: object) -> bytes:
    """A ``0x``-hex signature's bytes; empty (recovering to nobody) when it is not one."""
    if not isinstance(value, str) or not value.startswith("0x"):
        return b""
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        return b""
