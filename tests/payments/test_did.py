"""did:key (Ed25519) and did:pkh (eip155): encoding, parsing, refusals, and a cross-check with didkit."""

from __future__ import annotations

import json

import base58
import didkit
import pytest

from core.errors import AuthError
from node.http_errors import status_of
from payments import (
    Ed25519Signer,
    EthSigner,
    b64url_encode,
    canonical_did,
    did_key_from_ed25519,
    did_method,
    did_pkh,
    ed25519_public_from_did_key,
    new_ed25519,
    new_eth,
    parse_did_pkh,
    to_checksum_address,
    verification_fragment,
)

# The did:key spec's Ed25519 example: publicKeyBase58 and the DID it names.
SPEC_PUBLIC_KEY_B58 = "B12NYF8RrR3h41TDCTJojY59usg3mbtbjnFs7Eud1Y6u"
SPEC_DID_KEY = "did:key:z6MkpTHR8VNsBxYAAWHut2Geadd9jSwuBV8xRoAnwWsdvktH"
# A secp256k1 did:key (multicodec 0xe7), from key-did-resolver's documentation.
SECP256K1_DID_KEY = "did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme"
# EIP-55's own test vectors.
EIP55_ADDRESSES = [
    "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
    "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
    "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
    "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
]


def _auth_error(excinfo: pytest.ExceptionInfo[AuthError], code: str, http_status: int) -> AuthError:
    error = excinfo.value
    assert (error.code, status_of(error), error.domain) == (code, http_status, "auth")
    return error


# ---------------------------------------------------------------------------------------------- did:key


def test_did_key_matches_the_spec_example() -> None:
    public_key = base58.b58decode(SPEC_PUBLIC_KEY_B58)
    assert did_key_from_ed25519(public_key) == SPEC_DID_KEY
    assert ed25519_public_from_did_key(SPEC_DID_KEY) == public_key


def test_did_key_round_trips_a_fresh_key() -> None:
    signer = new_ed25519()
    assert signer.did.startswith("did:key:z6Mk")
    assert ed25519_public_from_did_key(signer.did) == signer.public_key


def test_did_key_refuses_a_public_key_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        did_key_from_ed25519(b"\x01" * 33)


def test_secp256k1_did_key_is_an_unsupported_key_type() -> None:
    with pytest.raises(AuthError) as excinfo:
        ed25519_public_from_did_key(SECP256K1_DID_KEY)
    error = _auth_error(excinfo, "unsupported_key_type", 400)
    assert error.details["got"] == "secp256k1"
    assert error.details["expected"] == "ed25519"


@pytest.mark.parametrize(
    ("did", "reason"),
    [
        ("did:key:6MkpTHR8VNsBxYAAWHut2Geadd9jSwuBV8xRoAnwWsdvktH", "base58btc multibase"),
        ("did:key:z6MkpTHR8VNsBxYAAWHut2Geadd9jSwuBV8xRoAnwWsdvk0O", "not valid base58btc"),
        ("did:key:z" + base58.b58encode(b"\xed\x01" + b"\x07" * 31).decode(), "holds 32 bytes"),
        ("did:key:", "expected did:<method>"),
        (SPEC_DID_KEY + "#z6Mk", "expected did:<method>"),
    ],
)
def test_malformed_did_key_is_invalid_did(did: str, reason: str) -> None:
    with pytest.raises(AuthError) as excinfo:
        ed25519_public_from_did_key(did)
    error = _auth_error(excinfo, "invalid_did", 400)
    assert reason in error.details["reason"]


def test_verification_fragment_of_did_key_is_its_multibase_key() -> None:
    assert verification_fragment(SPEC_DID_KEY) == "z6MkpTHR8VNsBxYAAWHut2Geadd9jSwuBV8xRoAnwWsdvktH"


# ---------------------------------------------------------------------------------------------- did:pkh


@pytest.mark.parametrize("address", EIP55_ADDRESSES)
def test_to_checksum_address_matches_eip55(address: str) -> None:
    assert to_checksum_address(address.lower()) == address
    assert to_checksum_address("0x" + address[2:].upper()) == address


def test_did_pkh_is_checksummed_and_parses_back() -> None:
    did = did_pkh(137, EIP55_ADDRESSES[0].lower())
    assert did == f"did:pkh:eip155:137:{EIP55_ADDRESSES[0]}"
    assert parse_did_pkh(did) == (137, EIP55_ADDRESSES[0])


def test_did_pkh_accepts_a_single_case_address_and_canonicalizes_it() -> None:
    lower = f"did:pkh:eip155:1:{EIP55_ADDRESSES[1].lower()}"
    assert parse_did_pkh(lower) == (1, EIP55_ADDRESSES[1])
    assert canonical_did(lower) == f"did:pkh:eip155:1:{EIP55_ADDRESSES[1]}"


def test_did_pkh_with_a_wrong_mixed_case_checksum_is_invalid() -> None:
    good = EIP55_ADDRESSES[0]
    first_letter = next(i for i, c in enumerate(good) if i >= 2 and c.isalpha())
    flipped = good[:first_letter] + good[first_letter].swapcase() + good[first_letter + 1 :]
    with pytest.raises(AuthError) as excinfo:
        parse_did_pkh(f"did:pkh:eip155:1:{flipped}")
    assert "checksum" in _auth_error(excinfo, "invalid_did", 400).details["reason"]


@pytest.mark.parametrize(
    "did",
    [
        f"did:pkh:eip155:0:{EIP55_ADDRESSES[0]}",
        f"did:pkh:eip155:01:{EIP55_ADDRESSES[0]}",
        f"did:pkh:eip155:main:{EIP55_ADDRESSES[0]}",
        "did:pkh:eip155:1:0x1234",
        f"did:pkh:eip155:1:{EIP55_ADDRESSES[0]}:extra",
        "did:pkh:eip155:1",
    ],
)
def test_malformed_did_pkh_is_invalid_did(did: str) -> None:
    with pytest.raises(AuthError) as excinfo:
        parse_did_pkh(did)
    _auth_error(excinfo, "invalid_did", 400)


def test_did_pkh_of_another_namespace_is_an_unsupported_method() -> None:
    with pytest.raises(AuthError) as excinfo:
        did_method(
            "did:pkh:solana:4sGjMW1sUnHzSxGspuhpqLDx6wiyjNtZ:CKg5d12Jhpej1JqtmxLJgaFqqeYjxgPqToJ4LBdvG9Ev"
        )
    assert _auth_error(excinfo, "unsupported_did_method", 400).details["got"] == "did:pkh:solana"


def test_did_pkh_refuses_a_nonpositive_chain_id() -> None:
    with pytest.raises(ValueError, match="chain_id"):
        did_pkh(0, EIP55_ADDRESSES[0])


def test_verification_fragment_of_did_pkh_is_blockchain_account_id() -> None:
    assert verification_fragment(did_pkh(1, EIP55_ADDRESSES[0])) == "blockchainAccountId"


# ---------------------------------------------------------------------------------------------- methods


def test_did_method_names_the_two_supported_methods() -> None:
    assert did_method(SPEC_DID_KEY) == "key"
    assert did_method(did_pkh(1, EIP55_ADDRESSES[0])) == "pkh"


def test_did_web_is_an_unsupported_method() -> None:
    with pytest.raises(AuthError) as excinfo:
        did_method("did:web:example.com")
    error = _auth_error(excinfo, "unsupported_did_method", 400)
    assert error.details["got"] == "did:web"
    assert error.details["expected"] == ["did:key", "did:pkh:eip155"]


@pytest.mark.parametrize(
    "did", ["", "not-a-did", "DID:key:z6Mk", "did::abc", "did:key", "did:key:a b", "x" * 600]
)
def test_non_dids_are_invalid_did(did: str) -> None:
    with pytest.raises(AuthError) as excinfo:
        did_method(did)
    _auth_error(excinfo, "invalid_did", 400)


def test_a_non_string_did_is_invalid_did() -> None:
    with pytest.raises(AuthError) as excinfo:
        ed25519_public_from_did_key(["did:key:z6Mk"])  # type: ignore[arg-type]
    _auth_error(excinfo, "invalid_did", 400)


# ---------------------------------------------------------------------------------------------- didkit


def _ed25519_jwk(signer: Ed25519Signer) -> str:
    return json.dumps(
        {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64url_encode(signer.public_key),
            "d": b64url_encode(signer.seed_bytes()),
        }
    )


def test_didkit_derives_the_same_did_key() -> None:
    signer = new_ed25519()
    assert didkit.key_to_did("key", _ed25519_jwk(signer)) == signer.did


async def test_didkit_verification_method_is_our_kid() -> None:
    signer = new_ed25519()
    assert await didkit.key_to_verification_method("key", _ed25519_jwk(signer)) == signer.kid


async def test_didkit_resolves_our_did_key_to_the_same_public_key() -> None:
    signer = new_ed25519()
    document = json.loads(await didkit.resolve_did(signer.did, "{}"))
    assert document["id"] == signer.did
    [method] = document["verificationMethod"]
    assert method["id"] == signer.kid
    assert method["publicKeyJwk"] == {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(signer.public_key)}
    assert signer.kid in document["authentication"]


async def test_didkit_resolves_our_did_pkh_to_the_same_account() -> None:
    signer: EthSigner = new_eth(1)
    document = json.loads(await didkit.resolve_did(signer.did, "{}"))
    ids = {method["id"]: method for method in document["verificationMethod"]}
    assert signer.kid in ids
    account = ids[signer.kid]["blockchainAccountId"]
    assert account.lower() == f"eip155:1:{signer.address}".lower()
    assert signer.kid in document["authentication"]
