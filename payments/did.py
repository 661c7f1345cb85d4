"""The two DID methods Hearth speaks: ``did:key`` (Ed25519) and ``did:pkh:eip155`` (Ethereum accounts).

Parsing is strict and cached: a request's ``iss`` is parsed on every admission, so the decoded public key
(or address) of a DID is kept in a small LRU. Every failure is an :class:`~core.errors.AuthError` with
HTTP status 400 and one of the codes ``invalid_did``, ``unsupported_did_method`` or
``unsupported_key_type``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

import base58
from eth_hash.auto import keccak

from core.errors import AuthError

DidMethod = Literal["key", "pkh"]

ED25519_MULTICODEC_PREFIX = b"\xed\x01"
ED25519_PUBLIC_KEY_LENGTH = 32
PKH_FRAGMENT = "blockchainAccountId"
DID_CACHE_SIZE = 4096
MAX_DID_LENGTH = 512

# Multicodec varint prefixes of other did:key key types, so the error can name what was sent.
_OTHER_KEY_TYPES: dict[bytes, str] = {
    b"\xe7\x01": "secp256k1",
    b"\x80\x24": "p256",
    b"\x81\x24": "p384",
    b"\x82\x24": "p521",
    b"\xec\x01": "x25519",
    b"\xeb\x01": "bls12_381-g2",
    b"\x85\x24": "rsa",
}

_DID_RE = re.compile(r"did:([a-z0-9]+):([A-Za-z0-9._:%-]+)")
_HEX_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")
_CHAIN_ID_RE = re.compile(r"[1-9][0-9]{0,31}")


def _invalid(did: object, reason: str) -> AuthError:
    shown = did[:MAX_DID_LENGTH] if isinstance(did, str) else type(did).__name__
    return AuthError("invalid_did", f"not a valid DID: {reason}", details={"did": shown, "reason": reason})


def _split(did: str) -> tuple[str, str]:
    if not isinstance(did, str):
        raise _invalid(did, "a DID must be a string")
    if len(did) > MAX_DID_LENGTH:
        raise _invalid(did, f"longer than {MAX_DID_LENGTH} characters")
    match = _DID_RE.fullmatch(did)
    if match is None:
        raise _invalid(did, "expected did:<method>:<method-specific-id>")
    return match.group(1), match.group(2)


def did_method(did: str) -> DidMethod:
    """The method of a DID Hearth supports (``"key"`` or ``"pkh"``).

    Raises ``invalid_did`` for a string that is not a DID and ``unsupported_did_method`` for any other
    method (``did:web``, ``did:ethr``, ...) or a did:pkh namespace other than ``eip155``.
    """
    method, specific = _split(did)
    if method == "key":
        return "key"
    if method == "pkh":
        namespace = specific.split(":", 1)[0]
        if namespace != "eip155":
            raise AuthError(
                "unsupported_did_method",
                f"did:pkh namespace {namespace!r} is not supported",
                details={"did": did, "expected": "did:pkh:eip155", "got": f"did:pkh:{namespace}"},
            )
        return "pkh"
    raise AuthError(
        "unsupported_did_method",
        f"DID method {method!r} is not supported",
        details={"did": did, "expected": ["did:key", "did:pkh:eip155"], "got": f"did:{method}"},
    )


# ---------------------------------------------------------------------------------------------- did:key


def did_key_from_ed25519(public_key: bytes) -> str:
    """The ``did:key:z6Mk...`` of a raw 32-byte Ed25519 public key."""
    if len(public_key) != ED25519_PUBLIC_KEY_LENGTH:
        raise ValueError(f"an Ed25519 public key is {ED25519_PUBLIC_KEY_LENGTH} bytes, got {len(public_key)}")
    return "did:key:z" + base58.b58encode(ED25519_MULTICODEC_PREFIX + bytes(public_key)).decode("ascii")


def ed25519_public_from_did_key(did: str) -> bytes:
    """The raw Ed25519 public key a ``did:key`` names.

    Raises ``unsupported_key_type`` for a well-formed did:key of another key type (secp256k1 ``zQ3s...``,
    P-256, ...) and ``invalid_did`` for anything that does not decode.
    """
    if not isinstance(did, str):
        raise _invalid(did, "a DID must be a string")
    return _ed25519_public_cached(did)


@lru_cache(maxsize=DID_CACHE_SIZE)
def _ed25519_public_cached(did: str) -> bytes:
    method, multibase = _split(did)
    if method != "key":
        raise _invalid(did, "not a did:key")
    if not multibase.startswith("z"):
        raise _invalid(did, "did:key must be base58btc multibase (starting with 'z')")
    try:
        raw = base58.b58decode(multibase[1:])
    except ValueError:
        raise _invalid(did, "did:key is not valid base58btc") from None
    prefix = raw[:2]
    if prefix != ED25519_MULTICODEC_PREFIX:
        key_type = _OTHER_KEY_TYPES.get(prefix, f"multicodec 0x{prefix.hex()}")
        raise AuthError(
            "unsupported_key_type",
            f"did:key of key type {key_type} is not supported",
            details={"did": did, "expected": "ed25519", "got": key_type},
        )
    public_key = raw[2:]
    if len(public_key) != ED25519_PUBLIC_KEY_LENGTH:
        raise _invalid(
            did, f"an Ed25519 did:key holds {ED25519_PUBLIC_KEY_LENGTH} bytes, got {len(public_key)}"
        )
    return public_key


# ---------------------------------------------------------------------------------------------- did:pkh


def to_checksum_address(address: str) -> str:
    """The EIP-55 mixed-case form of a ``0x`` hex address (any case accepted)."""
    if not isinstance(address, str) or _HEX_ADDRESS_RE.fullmatch(address) is None:
        raise ValueError("an Ethereum address is 0x followed by 40 hex digits")
    lower = address[2:].lower()
    digest = keccak(lower.encode("ascii")).hex()
    return "0x" + "".join(c.upper() if int(d, 16) >= 8 else c for c, d in zip(lower, digest, strict=False))


def did_pkh(chain_id: int, address: str) -> str:
    """``did:pkh:eip155:<chain_id>:<EIP-55 address>`` for an Ethereum account."""
    if isinstance(chain_id, bool) or not isinstance(chain_id, int) or chain_id <= 0:
        raise ValueError("chain_id must be a positive integer")
    return f"did:pkh:eip155:{chain_id}:{to_checksum_address(address)}"


def parse_did_pkh(did: str) -> tuple[int, str]:
    """``(chain_id, EIP-55 address)`` of a ``did:pkh:eip155`` DID.

    The address may be sent in any single case; a mixed-case address must carry a valid EIP-55
    checksum (a typo guard), else ``invalid_did``.
    """
    if not isinstance(did, str):
        raise _invalid(did, "a DID must be a string")
    return _parse_did_pkh_cached(did)


@lru_cache(maxsize=DID_CACHE_SIZE)
def _parse_did_pkh_cached(did: str) -> tuple[int, str]:
    if did_method(did) != "pkh":
        raise _invalid(did, "not a did:pkh")
    parts = did.split(":")
    if len(parts) != 5:
        raise _invalid(did, "expected did:pkh:eip155:<chainId>:<address>")
    chain, address = parts[3], parts[4]
    if _CHAIN_ID_RE.fullmatch(chain) is None:
        raise _invalid(did, "the eip155 chain id must be a positive decimal integer")
    if _HEX_ADDRESS_RE.fullmatch(address) is None:
        raise _invalid(did, "the account must be 0x followed by 40 hex digits")
    checksummed = to_checksum_address(address)
    body = address[2:]
    if body not in (body.lower(), body.upper()) and address != checksummed:
        raise _invalid(did, "the address is mixed-case but its EIP-55 checksum is wrong")
    return int(chain), checksummed


# ---------------------------------------------------------------------------------------------- both


def verification_fragment(did: str) -> str:
    """The fragment of the DID's signing key: the multibase key for did:key, ``blockchainAccountId`` for
    did:pkh. A JWS ``kid`` from this DID must be ``did + "#" + fragment``, as standard resolvers name it.
    """
    if did_method(did) == "key":
        ed25519_public_from_did_key(did)
        return did[len("did:key:") :]
    parse_did_pkh(did)
    return PKH_FRAGMENT


def canonical_did(did: str) -> str:
    """The one spelling of a supported DID: did:pkh addresses EIP-55 checksummed, did:key unchanged.

    Policies (allow/deny lists, per-DID limits) should key on this so a change of case is not a new
    identity.
    """
    if did_method(did) == "key":
        ed25519_public_from_did_key(did)
        return did
    chain_id, address = parse_did_pkh(did)
    return f"did:pkh:eip155:{chain_id}:{address}"
