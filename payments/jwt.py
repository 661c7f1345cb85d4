"""DID-JWTs: compact JWS tokens signed by a did:key (EdDSA) or did:pkh (ES256K) issuer.

Tokens are the ones standard DID-JWT tooling (``did-jwt`` with a did:key resolver) makes and checks:
header ``{"alg", "kid": "<did>#<fragment>", "typ": "JWT"}``, base64url without padding. The verifier here
resolves the two DID methods itself, without network or DID documents: a did:key carries its public key,
and a did:pkh names the address an ES256K signature must recover to.

:class:`RequestVerifier` admits signed job requests. It runs the cheap checks first and records the
``jti`` in the replay cache only once the request has been handled, so a token refused by any check,
its own or the caller's, leaves no trace. Every refusal is an
:class:`~core.errors.AuthError`; its ``details`` say what was expected and what came.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Final, Protocol

import coincurve
import orjson
from eth_hash.auto import keccak
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from core.defaults import DEFAULT_CLOCK_SKEW_SECONDS, DEFAULT_MAX_TOKEN_LIFETIME_SECONDS
from core.errors import AuthError
from core.untrusted import UntrustedJSONError, parse_json
from payments.did import (
    DID_CACHE_SIZE,
    DidMethod,
    canonical_did,
    did_method,
    ed25519_public_from_did_key,
    parse_did_pkh,
    verification_fragment,
)
from payments.keys import Alg, Signer

SUPPORTED_ALGS: Final[tuple[Alg, ...]] = ("EdDSA", "ES256K")
ALG_FOR_METHOD: Final[dict[DidMethod, Alg]] = {"key": "EdDSA", "pkh": "ES256K"}
JTI_MIN_LENGTH = 8
JTI_MAX_LENGTH = 128
SIGNATURE_LENGTH = 64
# The largest iat/exp/nbf accepted: 9999-12-31T23:59:59Z. Larger times are no real time, and beyond 64 bits
# they would not even fit the journal.
MAX_TIME_CLAIM = 253_402_300_799
DEFAULT_REQUEST_LIFETIME_SECONDS = 300
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_SECP256K1_HALF_ORDER = SECP256K1_ORDER // 2
_SHOWN_MAX = 200  # attacker-chosen strings echoed in error details are cut to this length

# ---------------------------------------------------------------------------------------------- base64url

_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL_INDEX = {c: i for i, c in enumerate(_B64URL_ALPHABET)}
_B64URL_BYTES = _B64URL_ALPHABET.encode("ascii")
# bytes.translate with a 256-byte table is one C loop; str.translate with a mapping looks up every character
_TO_STANDARD_B64 = bytes.maketrans(b"-_", b"+/")


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict inverse of :func:`b64url_encode`.

    Raises ``ValueError`` for padding, characters outside the url-safe alphabet, an impossible length,
    or non-zero unused trailing bits (so each byte string has exactly one accepted encoding).
    """
    # ASCII, and nothing left once the alphabet is deleted: only A-Z a-z 0-9 - _
    raw = text.encode("ascii") if text.isascii() else b"\x00"
    if raw.translate(None, _B64URL_BYTES):
        raise ValueError("base64url text may only contain A-Z a-z 0-9 - _ (and no padding)")
    tail = len(raw) % 4
    if tail == 1:
        raise ValueError("impossible base64url length")
    if (tail == 2 and _B64URL_INDEX[text[-1]] & 0x0F) or (tail == 3 and _B64URL_INDEX[text[-1]] & 0x03):
        raise ValueError("non-canonical base64url: unused trailing bits are set")
    # Only canonical text reaches here; binascii.Error would still be a ValueError, as documented.
    return binascii.a2b_base64(raw.translate(_TO_STANDARD_B64) + b"=" * (-len(raw) % 4), strict_mode=True)


# ---------------------------------------------------------------------------------------------- errors


def _shown(value: object) -> object:
    """``value`` as an error may echo it: short strings, JSON-safe numbers, else the type's name."""
    if isinstance(value, str):
        return value if len(value) <= _SHOWN_MAX else value[:_SHOWN_MAX] + "..."
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**53) <= value <= 2**53:
        text = str(value)
        return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"
    if value is None or isinstance(value, bool | int | float):
        return value
    return type(value).__name__


def _malformed(reason: str, **details: Any) -> AuthError:
    return AuthError("malformed_jwt", f"malformed JWT: {reason}", details={"reason": reason, **details})


def _bad_signature(reason: str) -> AuthError:
    return AuthError("bad_signature", f"signature does not verify: {reason}", details={"reason": reason})


# ---------------------------------------------------------------------------------------------- encode


def _json_bytes(value: dict[str, Any]) -> bytes:
    return orjson.dumps(value)  # compact, UTF-8; a dict key that is not a string raises


@lru_cache(maxsize=64)
def _encoded_header(alg: str, kid: str) -> str:
    return b64url_encode(_json_bytes({"alg": alg, "kid": kid, "typ": "JWT"}))


def sign_jwt(signer: Signer, payload: dict[str, Any]) -> str:
    """A compact JWS of ``payload`` with header exactly ``{"alg", "kid", "typ": "JWT"}`` (compact JSON)."""
    signing_input = f"{_encoded_header(signer.alg, signer.kid)}.{b64url_encode(_json_bytes(payload))}"
    return f"{signing_input}.{b64url_encode(signer.sign(signing_input.encode('ascii')))}"


# ---------------------------------------------------------------------------------------------- decode


def _json_object(part: str, name: str) -> dict[str, Any]:
    try:
        value = parse_json(b64url_decode(part))
    except UntrustedJSONError as exc:
        raise _malformed(
            f"the {name} is not JSON within this node's bounds: {exc.message}",
            part=name,
            bound=exc.reason,
        ) from None
    except ValueError as exc:  # base64url
        raise _malformed(f"the {name} is not base64url", part=name, error=str(exc)[:120]) from None
    if not isinstance(value, dict):
        raise _malformed(f"the {name} is not a JSON object", part=name, got=type(value).__name__)
    return value


# Headers already checked, by their exact text: a requester sends the same one every time. Only headers of
# string values are kept, so that each caller can be handed a copy of its own.
_HEADER_CACHE_SIZE = 1024
_headers: dict[str, dict[str, str]] = {}


def _header(encoded: str) -> dict[str, Any]:
    """The checked JOSE header of ``encoded`` (see :func:`decode_unverified`), a copy the caller owns."""
    known = _headers.get(encoded)
    if known is not None:
        return dict(known)
    header = _json_object(encoded, "header")
    alg = header.get("alg")
    if alg not in SUPPORTED_ALGS:
        raise AuthError(
            "unsupported_alg",
            f"JWS alg {_shown(alg)!r} is not supported",
            details={"expected": list(SUPPORTED_ALGS), "got": _shown(alg)},
        )
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _malformed("the header has no kid", expected="kid: <did>#<fragment>", got=_shown(kid))
    if "crit" in header:
        raise _malformed("critical header extensions are not supported", got=_shown(header["crit"]))
    if all(isinstance(value, str) for value in header.values()):
        if len(_headers) >= _HEADER_CACHE_SIZE:
            del _headers[next(iter(_headers))]  # the oldest
        _headers[encoded] = dict(header)
    return header


def decode_unverified(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """``(header, payload, signing_input, signature)`` of a compact JWS, checked for shape only.

    Raises ``malformed_jwt`` (400) for anything but three base64url parts with JSON-object header and
    payload, a header without a string ``kid``, or one with ``crit``; ``unsupported_alg`` (400) for an
    ``alg`` other than EdDSA and ES256K (``none`` and ``HS256`` included).
    """
    if not isinstance(token, str):
        raise _malformed("a JWT is a string", got=type(token).__name__)
    parts = token.split(".")
    if len(parts) != 3:
        raise _malformed("expected 3 dot-separated parts", expected=3, got=len(parts))
    encoded_header, encoded_payload, encoded_signature = parts
    header = _header(encoded_header)
    payload = _json_object(encoded_payload, "payload")
    try:
        signature = b64url_decode(encoded_signature)
    except ValueError as exc:
        raise _malformed("the signature is not base64url", part="signature", error=str(exc)) from None
    if not signature:
        raise _malformed("the signature is empty", part="signature")
    signing_input = f"{encoded_header}.{encoded_payload}".encode("ascii")
    return header, payload, signing_input, signature


# ---------------------------------------------------------------------------------------------- signatures


@dataclass(frozen=True, slots=True)
class _Issuer:
    """What verifying a signature from one DID needs, resolved once and kept in an LRU."""

    method: DidMethod
    kid: str
    check: Callable[[bytes, bytes], None]  # (signing_input, signature) -> None, or raises bad_signature


@lru_cache(maxsize=DID_CACHE_SIZE)
def _resolve_issuer(iss: str) -> _Issuer:
    method = did_method(iss)
    kid = f"{iss}#{verification_fragment(iss)}"
    if method == "key":
        return _Issuer(method, kid, partial(_verify_ed25519, VerifyKey(ed25519_public_from_did_key(iss))))
    _, address = parse_did_pkh(iss)
    # The 20 raw address bytes, so the comparison ignores the hex case the DID was written in.
    return _Issuer(method, kid, partial(_verify_es256k, bytes.fromhex(address[2:])))


def _verify_ed25519(verify_key: VerifyKey, signing_input: bytes, signature: bytes) -> None:
    try:
        verify_key.verify(signing_input, signature)
    except BadSignatureError:
        raise _bad_signature("Ed25519 verification failed") from None


def _verify_es256k(address: bytes, signing_input: bytes, signature: bytes) -> None:
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < SECP256K1_ORDER and 0 < s < SECP256K1_ORDER):
        raise _bad_signature("r or s is out of range")
    if s > _SECP256K1_HALF_ORDER:
        raise _bad_signature("high-S signature (not normalized)")
    digest = hashlib.sha256(signing_input).digest()
    # A JOSE ES256K signature has no recovery id; did-jwt tries both against blockchainAccountId.
    for recovery_id in (b"\x00", b"\x01"):
        try:
            public_key = coincurve.PublicKey.from_signature_and_message(
                signature + recovery_id, digest, hasher=None
            )
        except ValueError:
            continue
        if keccak(public_key.format(compressed=False)[1:])[-20:] == address:
            return
    raise _bad_signature("the signature does not recover to the did:pkh address")


def verify_signature(header: dict[str, Any], signing_input: bytes, signature: bytes, iss: str) -> None:
    """Check that ``iss`` signed ``signing_input`` with the key ``header["kid"]`` names.

    Raises ``invalid_did`` / ``unsupported_did_method`` / ``unsupported_key_type`` (400) for an issuer
    that cannot be resolved, ``kid_mismatch`` (401) if ``kid`` is not ``iss#<fragment>``,
    ``alg_mismatch`` (401) if ``alg`` does not fit the DID's key type (EdDSA for did:key, ES256K for
    did:pkh), and ``bad_signature`` (401) otherwise. ES256K signatures must be low-S.
    """
    issuer = _resolve_issuer(iss)
    kid = header.get("kid")
    if kid != issuer.kid:
        raise AuthError(
            "kid_mismatch",
            "the JWS kid is not the issuer's verification method",
            details={"expected": issuer.kid, "got": _shown(kid)},
        )
    alg = header.get("alg")
    expected_alg = ALG_FOR_METHOD[issuer.method]
    if alg != expected_alg:
        raise AuthError(
            "alg_mismatch",
            f"alg {_shown(alg)!r} does not fit a did:{issuer.method} issuer",
            details={"expected": expected_alg, "got": _shown(alg), "did_method": issuer.method},
        )
    if len(signature) != SIGNATURE_LENGTH:
        raise _bad_signature(f"a {expected_alg} signature is {SIGNATURE_LENGTH} bytes, got {len(signature)}")
    issuer.check(signing_input, signature)


# ---------------------------------------------------------------------------------------------- replay


class ReplayCache(Protocol):
    """Remembers which ``(iss, jti)`` pairs have been admitted, until the token could no longer be.

    ``exp`` is the unix time until which the entry must be kept: the verifier passes the token's ``exp``
    plus its clock skew, since the token stays acceptable that long. The durable implementation lives
    in the journal.
    """

    def nonce_seen(self, iss: str, jti: str) -> bool:
        """True if ``(iss, jti)`` is recorded (and not yet forgotten)."""
        ...

    def check_and_record(self, iss: str, jti: str, exp: int) -> bool:
        """True if ``(iss, jti)`` was not seen before (and is now recorded); False if it was."""
        ...


class MemoryReplayCache:
    """An in-memory :class:`ReplayCache` for tests and tools; forgets entries once ``exp`` has passed."""

    def __init__(self, *, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._expiry: dict[tuple[str, str], int] = {}
        self._by_expiry: list[tuple[int, str, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def nonce_seen(self, iss: str, jti: str) -> bool:
        self._prune(self._now())
        return (iss, jti) in self._expiry

    def check_and_record(self, iss: str, jti: str, exp: int) -> bool:
        self._prune(self._now())
        key = (iss, jti)
        if key in self._expiry:
            return False
        self._expiry[key] = exp
        heapq.heappush(self._by_expiry, (exp, iss, jti))
        return True

    def _prune(self, now: float) -> None:
        while self._by_expiry and self._by_expiry[0][0] < now:
            _, iss, jti = heapq.heappop(self._by_expiry)
            del self._expiry[(iss, jti)]


# ---------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    """A job request token that passed every check, its ``jti`` now recorded.

    ``iss`` is the issuer's canonical DID (:func:`~payments.did.canonical_did`); ``aud`` is this node's
    DID, which the token was addressed to; ``token_sha256`` is the hex SHA-256 of the compact token.
    """

    iss: str
    kid: str
    alg: Alg
    jti: str
    iat: int
    exp: int
    aud: str
    payload: dict[str, Any]
    token_sha256: str


def _claim(payload: dict[str, Any], name: str) -> Any:
    if name not in payload:
        raise AuthError("missing_claim", f"the JWT has no {name!r} claim", details={"claim": name})
    return payload[name]


def _int_claim(payload: dict[str, Any], name: str) -> int:
    value = _claim(payload, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _malformed(
            f"{name} must be an integer (seconds since the epoch)", claim=name, got=_shown(value)
        )
    if not 0 <= value <= MAX_TIME_CLAIM:
        raise _malformed(
            f"{name} must lie between 0 and {MAX_TIME_CLAIM} (seconds since the epoch)",
            claim=name,
            expected=[0, MAX_TIME_CLAIM],
            got=_shown(value),
        )
    return value


def _str_claim(payload: dict[str, Any], name: str) -> str:
    value = _claim(payload, name)
    if not isinstance(value, str):
        raise _malformed(f"{name} must be a string", claim=name, got=_shown(value))
    return value


def _replayed(request: VerifiedRequest) -> AuthError:
    return AuthError(
        "replayed_jti",
        "this token's jti has already been used",
        details={"iss": request.iss, "jti": request.jti},
    )


def _audiences(payload: dict[str, Any]) -> list[str]:
    aud = _claim(payload, "aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or not audiences or not all(isinstance(a, str) for a in audiences):
        raise _malformed("aud must be a DID or a non-empty list of DIDs", claim="aud", got=_shown(aud))
    return audiences


class RequestVerifier:
    """Admits signed job requests addressed to ``node_did``; see :meth:`verify` for the checks.

    Keyword-only limits come from ``[api]`` in node.toml. ``now`` is injectable for tests.
    """

    def __init__(
        self,
        node_did: str,
        replay: ReplayCache,
        *,
        clock_skew_seconds: int = DEFAULT_CLOCK_SKEW_SECONDS,
        max_lifetime_seconds: int = DEFAULT_MAX_TOKEN_LIFETIME_SECONDS,
        now: Callable[[], float] = time.time,
    ) -> None:
        did_method(node_did)
        if clock_skew_seconds < 0 or max_lifetime_seconds <= 0:
            raise ValueError("clock_skew_seconds must be >= 0 and max_lifetime_seconds > 0")
        self.node_did = node_did
        self._replay = replay
        self._skew = clock_skew_seconds
        self._max_lifetime = max_lifetime_seconds
        self._now = now
        self._in_flight: set[tuple[str, str]] = set()  # tokens being handled now (see admit)

    def verify(
        self, token: str, *, before_record: Callable[[dict[str, Any]], None] | None = None
    ) -> VerifiedRequest:
        """Verify ``token`` and record its ``jti`` at once: :meth:`admit` for a caller with nothing to do
        between the checks and the record."""
        with self.admit(token, before_record=before_record) as request:
            return request

    @contextmanager
    def admit(
        self, token: str, *, before_record: Callable[[dict[str, Any]], None] | None = None
    ) -> Iterator[VerifiedRequest]:
        """Verify ``token``; record its ``jti`` only if the block the request is handled in succeeds.

        A request refused anywhere, here or by the caller's own checks inside the block (a malformed
        envelope, a price above ``max_price``, a cancel by someone who does not own the job), leaves no
        trace: its token may be sent again and is judged again. While the block runs, the same token
        sent again is refused as a replay, so a request is never handled twice at once.

        ``before_record(payload)`` runs after every signature and claim check, before the block.

        Checks, in order: shape (``malformed_jwt``/``unsupported_alg``, 400); claims iss, aud, iat, exp,
        jti (``missing_claim``/``malformed_jwt``, 400; times between 0 and :data:`MAX_TIME_CLAIM`); the
        issuer's DID method (400); ``kid_mismatch``, ``alg_mismatch``, ``bad_signature`` (401);
        ``wrong_audience`` (403); ``expired``, ``not_yet_valid`` (``nbf``), ``issued_in_future``,
        ``lifetime_too_long`` (401); last, ``replayed_jti`` (409).
        """
        request = self._check(token, before_record)
        key = (request.iss, request.jti)
        if key in self._in_flight or self._replay.nonce_seen(*key):
            raise _replayed(request)
        self._in_flight.add(key)
        try:
            yield request
            if not self._replay.check_and_record(request.iss, request.jti, request.exp + self._skew):
                raise _replayed(request)
        finally:
            self._in_flight.discard(key)

    def _check(self, token: str, before_record: Callable[[dict[str, Any]], None] | None) -> VerifiedRequest:
        header, payload, signing_input, signature = decode_unverified(token)
        iss = _str_claim(payload, "iss")
        audiences = _audiences(payload)
        iat = _int_claim(payload, "iat")
        exp = _int_claim(payload, "exp")
        jti = _str_claim(payload, "jti")
        if not JTI_MIN_LENGTH <= len(jti) <= JTI_MAX_LENGTH:
            raise _malformed(
                f"jti must be {JTI_MIN_LENGTH} to {JTI_MAX_LENGTH} characters",
                claim="jti",
                expected=[JTI_MIN_LENGTH, JTI_MAX_LENGTH],
                got=len(jti),
            )
        nbf = _int_claim(payload, "nbf") if "nbf" in payload else None
        if exp <= iat:
            raise _malformed("exp must be after iat", claim="exp", iat=iat, exp=exp)

        verify_signature(header, signing_input, signature, iss)

        if self.node_did not in audiences:
            raise AuthError(
                "wrong_audience",
                "the token is not addressed to this node",
                details={"expected": self.node_did, "got": [_shown(a) for a in audiences[:8]]},
            )
        self._check_times(iat, exp, nbf)
        if before_record is not None:
            before_record(payload)
        return VerifiedRequest(
            iss=canonical_did(iss),
            kid=header["kid"],
            alg=header["alg"],
            jti=jti,
            iat=iat,
            exp=exp,
            aud=self.node_did,
            payload=payload,
            token_sha256=hashlib.sha256(token.encode("ascii")).hexdigest(),
        )

    def _check_times(self, iat: int, exp: int, nbf: int | None) -> None:
        now = self._now()
        if exp <= now - self._skew:
            raise AuthError(
                "expired",
                "the token has expired",
                details={"exp": exp, "now": int(now), "clock_skew_seconds": self._skew},
            )
        if nbf is not None and nbf > now + self._skew:
            raise AuthError(
                "not_yet_valid",
                "the token's nbf is in the future",
                details={"nbf": nbf, "now": int(now), "clock_skew_seconds": self._skew},
            )
        if iat > now + self._skew:
            raise AuthError(
                "issued_in_future",
                "the token's iat is in the future beyond the allowed clock skew",
                details={"iat": iat, "now": int(now), "clock_skew_seconds": self._skew},
            )
        if exp - iat > self._max_lifetime:
            raise AuthError(
                "lifetime_too_long",
                "exp - iat exceeds the longest lifetime this node accepts",
                details={"expected_max": self._max_lifetime, "got": exp - iat},
            )


def verify_node_token(
    token: str,
    expected_iss: str,
    *,
    audience: str | None = None,
    clock_skew_seconds: int = DEFAULT_CLOCK_SKEW_SECONDS,
    now: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """The payload of a token a node issued (a quote, a result), after checking it is genuine and current.

    Checks shape, ``iss == expected_iss`` (``wrong_issuer``, 401), kid/alg/signature, ``exp`` (required;
    ``expired``) and, if ``audience`` is given, ``aud`` (``wrong_audience``, 403). No replay check: such
    tokens are presented more than once by design.
    """
    header, payload, signing_input, signature = decode_unverified(token)
    iss = _str_claim(payload, "iss")
    if iss != expected_iss:
        raise AuthError(
            "wrong_issuer",
            "the token was not issued by the expected DID",
            details={"expected": expected_iss, "got": _shown(iss)},
        )
    exp = _int_claim(payload, "exp")
    verify_signature(header, signing_input, signature, iss)
    if audience is not None and audience not in _audiences(payload):
        raise AuthError(
            "wrong_audience",
            "the token is not addressed to the expected audience",
            details={"expected": audience, "got": _shown(payload.get("aud"))},
        )
    current = now()
    if exp <= current - clock_skew_seconds:
        raise AuthError(
            "expired",
            "the token has expired",
            details={"exp": exp, "now": int(current), "clock_skew_seconds": clock_skew_seconds},
        )
    return payload


def request_claims(
    signer: Signer,
    audience: str,
    *,
    extra: dict[str, Any] | None = None,
    lifetime_seconds: int = DEFAULT_REQUEST_LIFETIME_SECONDS,
    jti: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """``extra`` (e.g. ``{"job": envelope}``) plus the registered claims of a request from ``signer`` to
    ``audience``: iss, aud, iat, exp and a random jti. For clients, tools and tests.
    """
    iat = int(time.time() if now is None else now)
    return {
        **(extra or {}),
        "iss": signer.did,
        "aud": audience,
        "iat": iat,
        "exp": iat + lifetime_seconds,
        "jti": secrets.token_urlsafe(16) if jti is None else jti,
    }
