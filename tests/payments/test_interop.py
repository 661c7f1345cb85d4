"""Interop with did-jwt (JavaScript): tokens made by either side verify on the other.

The node scripts in ``tests/interop/`` use did-jwt's own signers and ``verifyJWT`` with key-did-resolver,
so these tests prove docs/protocol.md's promise that requests verify with standard DID-JWT tooling, not
only ours.
Without node or node_modules they skip with the reason, except under CI, where they fail.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from payments import (
    Ed25519Signer,
    EthSigner,
    MemoryReplayCache,
    RequestVerifier,
    b64url_encode,
    did_key_from_ed25519,
    new_ed25519,
    request_claims,
    sign_jwt,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "interop"
REQUIRED_PACKAGES = ("did-jwt", "did-resolver", "key-did-resolver")
NODE_TIMEOUT_SECONDS = 60


def _missing_tooling() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    absent = [p for p in REQUIRED_PACKAGES if not (ROOT / "node_modules" / p / "package.json").is_file()]
    if absent:
        return f"node_modules lacks {', '.join(absent)} (run npm ci in {ROOT})"
    return None


@pytest.fixture(scope="module", autouse=True)
def _node_tooling() -> None:
    reason = _missing_tooling()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"interop tests need node and did-jwt under CI: {reason}")
    pytest.skip(f"interop with did-jwt not checked: {reason}")


def _node(script: str, request: dict[str, Any]) -> dict[str, Any]:
    completed = subprocess.run(
        ["node", str(SCRIPTS / script)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=NODE_TIMEOUT_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, f"{script} failed:\n{completed.stderr}"
    result: dict[str, Any] = json.loads(completed.stdout)
    return result


def _verifier(node_did: str) -> RequestVerifier:
    return RequestVerifier(node_did, MemoryReplayCache())


def _job_claims(audience: str) -> dict[str, Any]:
    now = int(time.time())
    return {
        "aud": audience,
        "iat": now,
        "exp": now + 300,
        "jti": secrets.token_urlsafe(12),
        "job": {"kind": "ffmpeg_transcode", "inputs": ["blob:é"]},
    }


# --------------------------------------------------------------------------------------------- did-jwt signs


def test_did_jwt_eddsa_token_for_a_did_key_is_accepted() -> None:
    node = new_ed25519()
    seed = secrets.token_bytes(32)
    claims = _job_claims(node.did)
    made = _node("sign_eddsa.mjs", {"seed_hex": seed.hex(), "payload": claims})
    ours = Ed25519Signer(seed)
    assert made["did"] == ours.did == did_key_from_ed25519(ours.public_key)
    verified = _verifier(node.did).verify(made["token"])
    assert (verified.iss, verified.kid, verified.alg) == (ours.did, ours.kid, "EdDSA")
    assert verified.payload["job"] == claims["job"]


def test_did_jwt_es256k_token_for_a_did_pkh_is_accepted() -> None:
    node = new_ed25519()
    private_key = EthSigner.generate(1).private_key_bytes()
    made = _node(
        "sign_es256k.mjs",
        {"private_key_hex": private_key.hex(), "chain_id": 1, "payload": _job_claims(node.did)},
    )
    ours = EthSigner(private_key, 1)
    assert made["did"] == ours.did.lower()  # did-jwt's side writes the address in lower case
    verified = _verifier(node.did).verify(made["token"])
    assert (verified.iss, verified.alg) == (ours.did, "ES256K")
    assert verified.kid == f"{made['did']}#blockchainAccountId"


# ------------------------------------------------------------------------------------------ did-jwt verifies


def test_our_eddsa_token_verifies_with_did_jwt_and_key_did_resolver() -> None:
    requester, node = new_ed25519(), new_ed25519()
    token = sign_jwt(requester, request_claims(requester, node.did, extra={"job": {"kind": "vllm_batch"}}))
    result = _node("verify.mjs", {"token": token, "audience": node.did})
    assert result["verified"] is True, result
    assert (result["issuer"], result["kid"]) == (requester.did, requester.kid)
    assert result["payload"]["job"] == {"kind": "vllm_batch"}


def test_our_es256k_token_verifies_with_did_jwt() -> None:
    requester, node = EthSigner.generate(8453), new_ed25519()
    token = sign_jwt(requester, request_claims(requester, node.did))
    result = _node("verify.mjs", {"token": token, "audience": node.did})
    assert result["verified"] is True, result
    assert (result["issuer"], result["kid"]) == (requester.did, requester.kid)


def test_did_jwt_refuses_our_token_once_tampered() -> None:
    requester, node = new_ed25519(), new_ed25519()
    header, _, signature = sign_jwt(requester, request_claims(requester, node.did)).split(".")
    forged_claims = request_claims(requester, node.did, extra={"job": {"kind": "free"}})
    forged = f"{header}.{b64url_encode(json.dumps(forged_claims).encode())}.{signature}"
    result = _node("verify.mjs", {"token": forged, "audience": node.did})
    assert result["verified"] is False
    assert "invalid_signature" in result["error"]


def test_did_jwt_refuses_our_token_for_another_audience() -> None:
    requester, node = new_ed25519(), new_ed25519()
    token = sign_jwt(requester, request_claims(requester, node.did))
    result = _node("verify.mjs", {"token": token, "audience": new_ed25519().did})
    assert result["verified"] is False
    assert "audience does not match" in result["error"]
