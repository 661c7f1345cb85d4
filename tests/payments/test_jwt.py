"""DID-JWT signing and request admission: what is accepted, and one test per refusal with its exact code."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from typing import Any

import pytest

import payments.jwt as jwt_module
from core.errors import AuthError
from node.http_errors import status_of
from payments import (
    Ed25519Signer,
    EthSigner,
    MemoryReplayCache,
    RequestVerifier,
    Signer,
    b64url_decode,
    b64url_encode,
    canonical_did,
    decode_unverified,
    new_ed25519,
    new_eth,
    request_claims,
    sign_jwt,
    verify_node_token,
)
from payments.jwt import SECP256K1_ORDER

NOW = 1_800_000_000
SKEW = 60
MAX_LIFETIME = 3600
# Fixed keys keep the tests deterministic (e.g. ETH's address is mixed-case, so lower-casing changes it).
NODE = Ed25519Signer(hashlib.sha256(b"hearth test node").digest())
ED = Ed25519Signer(hashlib.sha256(b"hearth test requester").digest())
ETH = EthSigner(hashlib.sha256(b"hearth test wallet").digest(), 8453)
SECP256K1_DID_KEY = "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme"
DROP = object()  # a claim value meaning "leave this claim out"


def _part(value: object) -> str:
    return b64url_encode(json.dumps(value, separators=(",", ":")).encode("utf-8"))


def _claims(signer: Signer, **changes: object) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": signer.did,
        "aud": NODE.did,
        "iat": NOW,
        "exp": NOW + 300,
        "jti": secrets.token_urlsafe(12),
        "job": {"kind": "ffmpeg_transcode", "inputs": ["blob:1"]},
    }
    for name, value in changes.items():
        if value is DROP:
            del claims[name]
        else:
            claims[name] = value
    return claims


def _forge(signer: Signer, payload: object, **header_changes: object) -> str:
    """A token signed by ``signer`` with any header and payload, as an attacker could make one."""
    header: dict[str, object] = {"alg": signer.alg, "kid": signer.kid, "typ": "JWT"}
    header.update(header_changes)
    signing_input = f"{_part(header)}.{_part(payload)}"
    return f"{signing_input}.{b64url_encode(signer.sign(signing_input.encode('ascii')))}"


def _verifier(replay: MemoryReplayCache | None = None, now: float = NOW) -> RequestVerifier:
    return RequestVerifier(
        NODE.did,
        replay if replay is not None else MemoryReplayCache(now=lambda: now),
        clock_skew_seconds=SKEW,
        max_lifetime_seconds=MAX_LIFETIME,
        now=lambda: now,
    )


def _refused(
    token: object, code: str, http_status: int, verifier: RequestVerifier | None = None
) -> AuthError:
    with pytest.raises(AuthError) as excinfo:
        (verifier or _verifier()).verify(token)  # type: ignore[arg-type]
    error = excinfo.value
    assert (error.code, status_of(error), error.domain) == (code, http_status, "auth"), error.details
    return error


@pytest.fixture(params=["EdDSA", "ES256K"])
def requester(request: pytest.FixtureRequest) -> Signer:
    return ED if request.param == "EdDSA" else ETH


# ---------------------------------------------------------------------------------------------- base64url


@pytest.mark.parametrize("length", range(0, 34))
def test_b64url_round_trips(length: int) -> None:
    data = secrets.token_bytes(length)
    encoded = b64url_encode(data)
    assert "=" not in encoded and "+" not in encoded and "/" not in encoded
    assert b64url_decode(encoded) == data


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("QQ==", "no padding"),
        ("QQ=", "no padding"),
        ("a+b/", "no padding"),
        ("ab cd", "no padding"),
        ("abcde", "impossible base64url length"),
        ("QR", "trailing bits"),
        ("QUJ", "trailing bits"),
    ],
)
def test_b64url_decode_refuses_non_canonical_text(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        b64url_decode(text)


# ---------------------------------------------------------------------------------------------- signing


def test_sign_jwt_header_is_exactly_alg_kid_typ_in_compact_json(requester: Signer) -> None:
    token = sign_jwt(requester, {"a": 1, "b": [1, 2]})
    encoded_header, encoded_payload, _ = token.split(".")
    assert b64url_decode(encoded_header) == json.dumps(
        {"alg": requester.alg, "kid": requester.kid, "typ": "JWT"}, separators=(",", ":")
    ).encode("ascii")
    assert b64url_decode(encoded_payload) == b'{"a":1,"b":[1,2]}'


def test_decode_unverified_returns_header_payload_signing_input_and_signature() -> None:
    token = sign_jwt(ED, {"x": "é"})
    header, payload, signing_input, signature = decode_unverified(token)
    assert header == {"alg": "EdDSA", "kid": ED.kid, "typ": "JWT"}
    assert payload == {"x": "é"}
    assert signing_input == token.rsplit(".", 1)[0].encode("ascii")
    assert signature == ED.sign(signing_input)


def test_request_claims_fill_the_registered_claims() -> None:
    claims = request_claims(ED, NODE.did, extra={"job": {"k": 1}}, lifetime_seconds=120, now=NOW + 0.9)
    assert claims["iss"] == ED.did and claims["aud"] == NODE.did
    assert (claims["iat"], claims["exp"]) == (NOW, NOW + 120)
    assert 16 <= len(claims["jti"]) <= 128 and claims["job"] == {"k": 1}


# ---------------------------------------------------------------------------------------------- accepted


def test_accepts_a_request_and_reports_what_it_verified(requester: Signer) -> None:
    claims = _claims(requester)
    token = sign_jwt(requester, claims)
    verified = _verifier().verify(token)
    assert verified.iss == requester.did
    assert (verified.kid, verified.alg) == (requester.kid, requester.alg)
    assert (verified.jti, verified.iat, verified.exp, verified.aud) == (
        claims["jti"],
        NOW,
        NOW + 300,
        NODE.did,
    )
    assert verified.payload == claims
    assert verified.token_sha256 == hashlib.sha256(token.encode()).hexdigest()


def test_accepts_an_audience_list_that_contains_the_node() -> None:
    token = sign_jwt(ED, _claims(ED, aud=["did:key:z6MkOther", NODE.did]))
    assert _verifier().verify(token).aud == NODE.did


def test_accepts_a_lowercase_did_pkh_issuer_and_reports_it_canonically() -> None:
    lower = ETH.did.lower()
    assert lower != ETH.did
    token = _forge(ETH, _claims(ETH, iss=lower), kid=f"{lower}#blockchainAccountId")
    verified = _verifier().verify(token)
    assert verified.iss == ETH.did
    assert verified.kid == f"{lower}#blockchainAccountId"


def test_accepts_times_within_the_clock_skew() -> None:
    token = sign_jwt(ED, _claims(ED, iat=NOW + SKEW, exp=NOW + SKEW + 10, nbf=NOW + SKEW))
    assert _verifier().verify(token).iat == NOW + SKEW
    late = sign_jwt(ED, _claims(ED, iat=NOW - 100, exp=NOW - SKEW + 1))
    assert _verifier().verify(late).exp == NOW - SKEW + 1


# ---------------------------------------------------------------------------------------------- signature


def test_tampered_payload_is_bad_signature(requester: Signer) -> None:
    header, _, signature = sign_jwt(requester, _claims(requester)).split(".")
    tampered = f"{header}.{_part(_claims(requester, job={'kind': 'vllm_batch'}))}.{signature}"
    _refused(tampered, "bad_signature", 401)


def test_a_different_key_claiming_the_kid_is_bad_signature(requester: Signer) -> None:
    impostor = new_ed25519() if requester.alg == "EdDSA" else new_eth(8453)
    token = _forge(impostor, _claims(requester), kid=requester.kid)
    _refused(token, "bad_signature", 401)


def test_high_s_es256k_signature_is_bad_signature() -> None:
    header, payload, signature = sign_jwt(ETH, _claims(ETH)).split(".")
    raw = b64url_decode(signature)
    high_s = SECP256K1_ORDER - int.from_bytes(raw[32:], "big")  # the same signature, malleated
    error = _refused(
        f"{header}.{payload}.{b64url_encode(raw[:32] + high_s.to_bytes(32, 'big'))}", "bad_signature", 401
    )
    assert "high-S" in error.details["reason"]


def test_signature_of_the_wrong_length_is_bad_signature(requester: Signer) -> None:
    header, payload, signature = sign_jwt(requester, _claims(requester)).split(".")
    short = b64url_encode(b64url_decode(signature)[:63])
    _refused(f"{header}.{payload}.{short}", "bad_signature", 401)


def test_es256k_header_with_a_did_key_issuer_is_alg_mismatch() -> None:
    token = _forge(ED, _claims(ED), alg="ES256K")
    error = _refused(token, "alg_mismatch", 401)
    assert (error.details["expected"], error.details["got"]) == ("EdDSA", "ES256K")


def test_eddsa_header_with_a_did_pkh_issuer_is_alg_mismatch() -> None:
    token = _forge(ED, _claims(ETH), kid=ETH.kid)
    error = _refused(token, "alg_mismatch", 401)
    assert (error.details["expected"], error.details["got"]) == ("ES256K", "EdDSA")


# ---------------------------------------------------------------------------------------------- issuer, kid


def test_did_web_issuer_is_an_unsupported_did_method() -> None:
    token = _forge(ED, _claims(ED, iss="did:web:example.com"), kid="did:web:example.com#key-1")
    error = _refused(token, "unsupported_did_method", 400)
    assert error.details["got"] == "did:web"


def test_non_did_issuer_is_invalid_did() -> None:
    _refused(_forge(ED, _claims(ED, iss="alice")), "invalid_did", 400)


def test_secp256k1_did_key_issuer_is_an_unsupported_key_type() -> None:
    token = _forge(ED, _claims(ED, iss=SECP256K1_DID_KEY), kid=SECP256K1_DID_KEY + "#x")
    _refused(token, "unsupported_key_type", 400)


def test_kid_of_another_did_is_kid_mismatch() -> None:
    other = new_ed25519()
    token = _forge(other, _claims(ED))
    error = _refused(token, "kid_mismatch", 401)
    assert (error.details["expected"], error.details["got"]) == (ED.kid, other.kid)


def test_kid_with_a_wrong_fragment_is_kid_mismatch() -> None:
    token = _forge(ETH, _claims(ETH), kid=f"{ETH.did}#controller")
    error = _refused(token, "kid_mismatch", 401)
    assert error.details["expected"] == f"{ETH.did}#blockchainAccountId"


# ------------------------------------------------------------------------------------------ audience, time


def test_token_for_another_node_is_wrong_audience() -> None:
    other_node = new_ed25519().did
    error = _refused(sign_jwt(ED, _claims(ED, aud=other_node)), "wrong_audience", 403)
    assert (error.details["expected"], error.details["got"]) == (NODE.did, [other_node])


def test_audience_list_without_the_node_is_wrong_audience() -> None:
    _refused(sign_jwt(ED, _claims(ED, aud=[new_ed25519().did, ETH.did])), "wrong_audience", 403)


def test_expired_token_is_expired() -> None:
    error = _refused(sign_jwt(ED, _claims(ED, iat=NOW - 400, exp=NOW - SKEW)), "expired", 401)
    assert (error.details["exp"], error.details["now"]) == (NOW - SKEW, NOW)


def test_iat_beyond_the_skew_is_issued_in_future() -> None:
    error = _refused(sign_jwt(ED, _claims(ED, iat=NOW + SKEW + 1, exp=NOW + 600)), "issued_in_future", 401)
    assert error.details["iat"] == NOW + SKEW + 1


def test_nbf_beyond_the_skew_is_not_yet_valid() -> None:
    _refused(sign_jwt(ED, _claims(ED, nbf=NOW + SKEW + 1)), "not_yet_valid", 401)


def test_lifetime_over_the_maximum_is_lifetime_too_long() -> None:
    error = _refused(sign_jwt(ED, _claims(ED, exp=NOW + MAX_LIFETIME + 1)), "lifetime_too_long", 401)
    assert (error.details["expected_max"], error.details["got"]) == (MAX_LIFETIME, MAX_LIFETIME + 1)


# ---------------------------------------------------------------------------------------------- replay


def test_second_use_of_a_jti_is_replayed_jti() -> None:
    verifier = _verifier()
    token = sign_jwt(ED, _claims(ED))
    verifier.verify(token)
    error = _refused(token, "replayed_jti", 409, verifier)
    assert error.details["iss"] == ED.did


def test_a_new_token_reusing_a_jti_is_replayed_jti() -> None:
    verifier = _verifier()
    verifier.verify(sign_jwt(ED, _claims(ED, jti="same-jti-0001")))
    _refused(sign_jwt(ED, _claims(ED, jti="same-jti-0001", exp=NOW + 301)), "replayed_jti", 409, verifier)


def test_the_same_jti_from_two_issuers_is_not_a_replay() -> None:
    verifier = _verifier()
    verifier.verify(sign_jwt(ED, _claims(ED, jti="shared-jti-01")))
    assert verifier.verify(sign_jwt(ETH, _claims(ETH, jti="shared-jti-01"))).iss == ETH.did


def test_a_lowercase_did_pkh_cannot_replay_a_checksummed_one() -> None:
    verifier = _verifier()
    verifier.verify(sign_jwt(ETH, _claims(ETH, jti="pkh-jti-0001")))
    lower = ETH.did.lower()
    token = _forge(ETH, _claims(ETH, iss=lower, jti="pkh-jti-0001"), kid=f"{lower}#blockchainAccountId")
    _refused(token, "replayed_jti", 409, verifier)


def test_rejected_tokens_leave_no_replay_record() -> None:
    replay = MemoryReplayCache(now=lambda: NOW)
    verifier = _verifier(replay)
    jti = "first-try-0001"
    header, _, signature = sign_jwt(ED, _claims(ED, jti=jti)).split(".")
    rejected = [
        f"{header}.{_part(_claims(ED, jti=jti, job={}))}.{signature}",  # bad signature
        sign_jwt(ED, _claims(ED, jti=jti, aud=ETH.did)),  # wrong audience
        sign_jwt(ED, _claims(ED, jti=jti, iat=NOW - 500, exp=NOW - 100)),  # expired
        sign_jwt(ED, _claims(ED, jti=jti, exp=NOW + 10 * MAX_LIFETIME)),  # lifetime too long
    ]
    for token in rejected:
        with pytest.raises(AuthError):
            verifier.verify(token)
    assert len(replay) == 0
    assert verifier.verify(sign_jwt(ED, _claims(ED, jti=jti))).jti == jti


def test_replay_is_refused_until_exp_plus_skew() -> None:
    clock = [float(NOW)]
    replay = MemoryReplayCache(now=lambda: clock[0])
    verifier = RequestVerifier(NODE.did, replay, clock_skew_seconds=SKEW, now=lambda: clock[0])
    token = sign_jwt(ED, _claims(ED, exp=NOW + 100))
    verifier.verify(token)
    clock[0] = NOW + 100 + SKEW - 1  # past exp, yet the token is still acceptable within the skew
    _refused(token, "replayed_jti", 409, verifier)


def test_replay_cache_is_told_to_keep_the_entry_until_exp_plus_skew() -> None:
    calls: list[tuple[str, str, int]] = []

    class Recording:
        def nonce_seen(self, iss: str, jti: str) -> bool:
            return False

        def check_and_record(self, iss: str, jti: str, exp: int) -> bool:
            calls.append((iss, jti, exp))
            return True

    verifier = RequestVerifier(NODE.did, Recording(), clock_skew_seconds=SKEW, now=lambda: NOW)
    claims = _claims(ED)
    verifier.verify(sign_jwt(ED, claims))
    assert calls == [(ED.did, claims["jti"], NOW + 300 + SKEW)]


def test_memory_replay_cache_forgets_entries_once_expired() -> None:
    clock = [100.0]
    cache = MemoryReplayCache(now=lambda: clock[0])
    assert cache.check_and_record("did:key:a", "jti-00001", 150) is True
    assert cache.check_and_record("did:key:a", "jti-00001", 150) is False
    assert cache.check_and_record("did:key:a", "jti-00002", 300) is True
    clock[0] = 151.0
    assert cache.check_and_record("did:key:b", "jti-00003", 400) is True
    assert len(cache) == 2
    assert cache.check_and_record("did:key:a", "jti-00001", 500) is True


# ---------------------------------------------------------------------------------------------- claims


@pytest.mark.parametrize("claim", ["iss", "aud", "iat", "exp", "jti"])
def test_each_required_claim_missing_is_missing_claim(claim: str) -> None:
    error = _refused(_forge(ED, _claims(ED, **{claim: DROP})), "missing_claim", 400)
    assert error.details == {"claim": claim}


@pytest.mark.parametrize(
    ("changes", "claim"),
    [
        ({"iat": float(NOW)}, "iat"),
        ({"exp": True}, "exp"),
        ({"exp": str(NOW + 300)}, "exp"),
        ({"nbf": "soon"}, "nbf"),
        ({"jti": 12345678}, "jti"),
        ({"jti": "short"}, "jti"),
        ({"jti": "x" * 129}, "jti"),
        ({"iss": ["did:key:a"]}, "iss"),
        ({"aud": []}, "aud"),
        ({"aud": [NODE.did, 1]}, "aud"),
        ({"exp": NOW}, "exp"),
    ],
)
def test_ill_typed_claims_are_malformed(changes: dict[str, object], claim: str) -> None:
    error = _refused(_forge(ED, _claims(ED, **changes)), "malformed_jwt", 400)
    assert error.details["claim"] == claim


# ---------------------------------------------------------------------------------------------- shape


def test_two_part_token_is_malformed() -> None:
    header, payload, _ = sign_jwt(ED, _claims(ED)).split(".")
    error = _refused(f"{header}.{payload}", "malformed_jwt", 400)
    assert (error.details["expected"], error.details["got"]) == (3, 2)


def test_four_part_token_is_malformed() -> None:
    _refused(sign_jwt(ED, _claims(ED)) + ".e30", "malformed_jwt", 400)


def test_bad_base64_is_malformed() -> None:
    header, payload, signature = sign_jwt(ED, _claims(ED)).split(".")
    error = _refused(f"{header}=.{payload}.{signature}", "malformed_jwt", 400)
    assert error.details["part"] == "header"


def test_bad_base64_signature_is_malformed() -> None:
    header, payload, signature = sign_jwt(ED, _claims(ED)).split(".")
    error = _refused(f"{header}.{payload}.{signature[:-1]}+", "malformed_jwt", 400)
    assert error.details["part"] == "signature"


def test_non_json_header_is_malformed() -> None:
    _, payload, signature = sign_jwt(ED, _claims(ED)).split(".")
    _refused(f"{b64url_encode(b'{alg: EdDSA}')}.{payload}.{signature}", "malformed_jwt", 400)


def test_non_json_payload_is_malformed() -> None:
    header, _, signature = sign_jwt(ED, _claims(ED)).split(".")
    error = _refused(f"{header}.{b64url_encode(b'not json')}.{signature}", "malformed_jwt", 400)
    assert error.details["part"] == "payload"


def test_non_utf8_payload_is_malformed() -> None:
    header, _, signature = sign_jwt(ED, _claims(ED)).split(".")
    latin1 = b64url_encode('{"a":"\xff"}'.encode("latin-1"))
    _refused(f"{header}.{latin1}.{signature}", "malformed_jwt", 400)


def test_json_array_payload_is_malformed() -> None:
    error = _refused(_forge(ED, [_claims(ED)]), "malformed_jwt", 400)
    assert (error.details["part"], error.details["got"]) == ("payload", "list")


def test_json_array_header_is_malformed() -> None:
    _, payload, signature = sign_jwt(ED, _claims(ED)).split(".")
    _refused(f"{_part(['EdDSA'])}.{payload}.{signature}", "malformed_jwt", 400)


def test_duplicate_claim_names_are_malformed() -> None:
    header = _part({"alg": "EdDSA", "kid": ED.kid, "typ": "JWT"})
    body = json.dumps(_claims(ED))[:-1] + f', "aud": "{ETH.did}"}}'
    signing_input = f"{header}.{b64url_encode(body.encode())}"
    token = f"{signing_input}.{b64url_encode(ED.sign(signing_input.encode()))}"
    _refused(token, "malformed_jwt", 400)


def test_nan_in_payload_is_malformed() -> None:
    header = _part({"alg": "EdDSA", "kid": ED.kid, "typ": "JWT"})
    body = json.dumps(_claims(ED))[:-1] + ', "price": NaN}'
    signing_input = f"{header}.{b64url_encode(body.encode())}"
    _refused(f"{signing_input}.{b64url_encode(ED.sign(signing_input.encode()))}", "malformed_jwt", 400)


def test_header_without_kid_is_malformed() -> None:
    _refused(_forge(ED, _claims(ED), kid=None), "malformed_jwt", 400)


def test_header_with_crit_is_malformed() -> None:
    _refused(_forge(ED, _claims(ED), crit=["b64"], b64=False), "malformed_jwt", 400)


def test_empty_signature_is_malformed() -> None:
    header, payload, _ = sign_jwt(ED, _claims(ED)).split(".")
    _refused(f"{header}.{payload}.", "malformed_jwt", 400)


def test_non_string_token_is_malformed() -> None:
    _refused(b"a.b.c", "malformed_jwt", 400)


def test_hs256_is_an_unsupported_alg() -> None:
    error = _refused(_forge(ED, _claims(ED), alg="HS256"), "unsupported_alg", 400)
    assert (error.details["expected"], error.details["got"]) == (["EdDSA", "ES256K"], "HS256")


def test_alg_none_is_an_unsupported_alg() -> None:
    unsecured = f"{_part({'alg': 'none', 'typ': 'JWT'})}.{_part(_claims(ED))}."
    _refused(unsecured, "unsupported_alg", 400)


def test_missing_alg_is_an_unsupported_alg() -> None:
    _refused(_forge(ED, _claims(ED), alg=None), "unsupported_alg", 400)


# ---------------------------------------------------------------------------------------------- order


def test_signature_is_checked_before_audience_and_time() -> None:
    impostor = new_ed25519()
    token = _forge(impostor, _claims(ED, aud=ETH.did, iat=NOW - 900, exp=NOW - 800), kid=ED.kid)
    _refused(token, "bad_signature", 401)


def test_claims_are_checked_before_the_signature() -> None:
    impostor = new_ed25519()
    _refused(_forge(impostor, _claims(ED, jti=DROP), kid=ED.kid), "missing_claim", 400)


# ---------------------------------------------------------------------------------------------- node tokens


def _quote(**changes: object) -> dict[str, Any]:
    quote: dict[str, Any] = {"iss": NODE.did, "aud": ED.did, "iat": NOW, "exp": NOW + 300, "price": "1.5"}
    quote.update(changes)
    return quote


def test_verify_node_token_accepts_the_same_token_repeatedly() -> None:
    token = sign_jwt(NODE, _quote())
    for _ in range(2):
        assert verify_node_token(token, NODE.did, audience=ED.did, now=lambda: NOW)["price"] == "1.5"


def test_node_token_from_another_issuer_is_wrong_issuer() -> None:
    with pytest.raises(AuthError) as excinfo:
        verify_node_token(sign_jwt(ED, _quote(iss=ED.did)), NODE.did, now=lambda: NOW)
    assert (excinfo.value.code, status_of(excinfo.value)) == ("wrong_issuer", 401)


def test_expired_node_token_is_expired() -> None:
    with pytest.raises(AuthError) as excinfo:
        verify_node_token(sign_jwt(NODE, _quote(exp=NOW - SKEW)), NODE.did, now=lambda: NOW)
    assert (excinfo.value.code, status_of(excinfo.value)) == ("expired", 401)


def test_node_token_for_another_audience_is_wrong_audience() -> None:
    with pytest.raises(AuthError) as excinfo:
        verify_node_token(sign_jwt(NODE, _quote()), NODE.did, audience=ETH.did, now=lambda: NOW)
    assert (excinfo.value.code, status_of(excinfo.value)) == ("wrong_audience", 403)


def test_tampered_node_token_is_bad_signature() -> None:
    header, _, signature = sign_jwt(NODE, _quote()).split(".")
    with pytest.raises(AuthError) as excinfo:
        verify_node_token(f"{header}.{_part(_quote(price='0.1'))}.{signature}", NODE.did, now=lambda: NOW)
    assert (excinfo.value.code, status_of(excinfo.value)) == ("bad_signature", 401)


# ----------------------------------------------------------------------------------- setup, the issuer cache


def test_verifier_refuses_an_unsupported_node_did() -> None:
    with pytest.raises(AuthError) as excinfo:
        RequestVerifier("did:web:node.example", MemoryReplayCache())
    assert excinfo.value.code == "unsupported_did_method"


def test_verifier_refuses_a_negative_skew() -> None:
    with pytest.raises(ValueError, match="clock_skew_seconds"):
        RequestVerifier(NODE.did, MemoryReplayCache(), clock_skew_seconds=-1)


@pytest.mark.parametrize("signer_factory", [new_ed25519, lambda: new_eth(1)], ids=["EdDSA", "ES256K"])
def test_an_issuer_is_resolved_once_however_many_tokens(signer_factory: Callable[[], Signer]) -> None:
    """What keeps verification cheap per token, counted rather than timed (the rate itself is part of
    bench/admission.py's signed requests/s): the DID's key is decoded once, then every later token
    from that issuer only checks its signature."""
    signers = [signer_factory() for _ in range(20)]
    issuers = [s for s in signers for _ in range(100)]
    tokens = [sign_jwt(s, _claims(s)) for s in issuers]
    verifier = _verifier()
    jwt_module._resolve_issuer.cache_clear()
    assert [verifier.verify(token).iss for token in tokens] == [canonical_did(s.did) for s in issuers]
    resolved = jwt_module._resolve_issuer.cache_info()
    assert (resolved.misses, resolved.hits) == (len(signers), len(tokens) - len(signers))
