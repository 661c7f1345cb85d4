"""Signers and the key file: round trips, mode 0600 from the first byte, refusals, no secrets shown."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from eth_keys.datatypes import PrivateKey as EthPrivateKey
from eth_keys.datatypes import Signature as EthSignature
from nacl.signing import VerifyKey

from core.errors import ConfigError
from payments import (
    Ed25519Signer,
    EthSigner,
    Signer,
    did_pkh,
    load_key,
    new_ed25519,
    new_eth,
    public_summary,
    save_key,
)
from payments.jwt import SECP256K1_ORDER


@pytest.fixture(params=["ed25519", "secp256k1"])
def signer(request: pytest.FixtureRequest) -> Signer:
    return new_ed25519() if request.param == "ed25519" else new_eth(8453)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask of 0, the worst case: only the code's own mode keeps the file private."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def _secret_hex(signer: Signer) -> str:
    if isinstance(signer, Ed25519Signer):
        return signer.seed_bytes().hex()
    assert isinstance(signer, EthSigner)
    return signer.private_key_bytes().hex()


def _write(path: Path, content: str, mode: int = 0o600) -> Path:
    path.write_text(content)
    path.chmod(mode)
    return path


def _config_error(excinfo: pytest.ExceptionInfo[ConfigError], code: str) -> ConfigError:
    assert excinfo.value.code == code
    assert excinfo.value.domain == "config"
    return excinfo.value


# ---------------------------------------------------------------------------------------------- signers


def test_ed25519_signer_signs_what_its_public_key_verifies() -> None:
    signer = new_ed25519()
    signature = signer.sign(b"header.payload")
    assert len(signature) == 64
    assert VerifyKey(signer.public_key).verify(b"header.payload", signature) == b"header.payload"
    assert (signer.alg, signer.kid) == ("EdDSA", f"{signer.did}#{signer.did.removeprefix('did:key:')}")


def test_eth_signer_address_matches_eth_account() -> None:
    signer = new_eth(1)
    assert signer.address == Account.from_key(signer.private_key_bytes()).address
    assert signer.did == did_pkh(1, signer.address)
    assert (signer.alg, signer.kid, signer.chain_id) == ("ES256K", f"{signer.did}#blockchainAccountId", 1)


def test_eth_signer_signs_low_s_ecdsa_over_sha256() -> None:
    signer = new_eth(1)
    public_key = EthPrivateKey(signer.private_key_bytes()).public_key
    digest = hashlib.sha256(b"header.payload").digest()
    for _ in range(20):
        signature = signer.sign(b"header.payload")
        assert len(signature) == 64
        assert int.from_bytes(signature[32:], "big") <= SECP256K1_ORDER // 2
        candidates = [EthSignature(signature_bytes=signature + bytes([v])) for v in (0, 1)]
        assert any(c.recover_public_key_from_msg_hash(digest) == public_key for c in candidates)


def test_eth_signer_refuses_an_invalid_private_key() -> None:
    with pytest.raises(ValueError, match="not a valid secp256k1 private key"):
        EthSigner(SECP256K1_ORDER.to_bytes(32, "big"), 1)


def test_repr_and_summary_show_no_secret(signer: Signer) -> None:
    secret = _secret_hex(signer)
    assert repr(signer) == f"{type(signer).__name__}(did={signer.did!r})"
    assert secret not in repr(signer) and secret not in str(signer)
    summary = public_summary(signer)
    assert secret not in json.dumps(summary)
    assert summary["did"] == signer.did and summary["kid"] == signer.kid and summary["alg"] == signer.alg


def test_public_summary_of_an_eth_key_has_its_address() -> None:
    signer = new_eth(1)
    assert public_summary(signer) == {
        "did": signer.did,
        "kid": signer.kid,
        "alg": "ES256K",
        "address": signer.address,
    }


# ---------------------------------------------------------------------------------------------- key file


def test_key_file_round_trips(signer: Signer, tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_key(signer, path)
    loaded = load_key(path)
    assert type(loaded) is type(signer)
    assert (loaded.did, loaded.kid, loaded.alg) == (signer.did, signer.kid, signer.alg)
    assert _secret_hex(loaded) == _secret_hex(signer)


def test_key_file_has_the_documented_shape(tmp_path: Path) -> None:
    ed, eth = new_ed25519(), new_eth(10)
    save_key(ed, tmp_path / "ed.key")
    save_key(eth, tmp_path / "eth.key")
    assert json.loads((tmp_path / "ed.key").read_text()) == {"type": "ed25519", "seed": ed.seed_bytes().hex()}
    assert json.loads((tmp_path / "eth.key").read_text()) == {
        "type": "secp256k1",
        "private_key": eth.private_key_bytes().hex(),
        "chain_id": 10,
    }


@pytest.mark.usefixtures("open_umask")
def test_key_file_is_mode_0600_even_with_an_open_umask(signer: Signer, tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_key(signer, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]  # no temporary file left behind


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = new_ed25519()
    save_key(first, path)
    with pytest.raises(ConfigError) as excinfo:
        save_key(new_ed25519(), path)
    assert _config_error(excinfo, "key_file_exists").details == {"path": str(path)}
    assert load_key(path).did == first.did
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


def test_save_overwrites_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_key(new_ed25519(), path)
    second = new_eth(1)
    save_key(second, path, overwrite=True)
    assert load_key(path).did == second.did
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_into_a_missing_directory_is_unwritable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        save_key(new_ed25519(), tmp_path / "absent" / "node.key")
    _config_error(excinfo, "key_file_unwritable")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_a_key_file_others_can_access(mode: int, tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    signer = new_ed25519()
    save_key(signer, path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as excinfo:
        load_key(path)
    error = _config_error(excinfo, "key_file_permissions")
    assert error.details == {"path": str(path), "expected": "0600", "got": f"{mode:04o}"}
    assert signer.seed_bytes().hex() not in str(error)


def test_load_of_a_missing_file_is_key_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_key(tmp_path / "node.key")
    _config_error(excinfo, "key_file_missing")


def test_load_of_a_directory_is_an_invalid_key_file(tmp_path: Path) -> None:
    directory = tmp_path / "node.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError) as excinfo:
        load_key(directory)
    _config_error(excinfo, "invalid_key_file")


SEED = "ab" * 32


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"type": "rsa", "seed": SEED}), "type must be"),
        (json.dumps({"type": "ed25519"}), "expected exactly the fields"),
        (json.dumps({"type": "ed25519", "seed": SEED, "note": "x"}), "expected exactly the fields"),
        (json.dumps({"type": "ed25519", "seed": SEED[:-2]}), "64 hex digits"),
        (json.dumps({"type": "ed25519", "seed": SEED[:-2] + "zz"}), "64 hex digits"),
        (json.dumps({"type": "secp256k1", "private_key": SEED, "chain_id": 0}), "chain_id"),
        (json.dumps({"type": "secp256k1", "private_key": SEED, "chain_id": True}), "chain_id"),
        (json.dumps({"type": "secp256k1", "private_key": "00" * 32, "chain_id": 1}), "not a valid secp256k1"),
        ("{" + " " * 5000 + "}", "larger than"),
    ],
)
def test_load_refuses_invalid_content_without_echoing_it(content: str, reason: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "node.key", content)
    with pytest.raises(ConfigError) as excinfo:
        load_key(path)
    error = _config_error(excinfo, "invalid_key_file")
    assert reason in error.details["reason"]
    assert SEED not in str(error) and SEED not in json.dumps(error.to_dict())


def test_load_eth_key_returns_an_eth_signer_and_names_the_role_of_a_wrong_key(tmp_path: Path) -> None:
    from payments.keys import load_eth_key

    wallet = new_eth(31337)
    save_key(wallet, tmp_path / "wallet.key")
    assert load_eth_key(tmp_path / "wallet.key").address == wallet.address
    save_key(new_ed25519(), tmp_path / "ed.key")
    for role in ("wallet", "validator"):
        with pytest.raises(ConfigError) as info:
            load_eth_key(tmp_path / "ed.key", role=role)
        assert info.value.code == f"{role}_key_not_ethereum" and info.value.details["key_type"] == "ed25519"
