"""TestUSDC, the dev chains' stand-in for USDC, on a real local chain (anvil): it speaks USDC's interface
(6 decimals, EIP-2612 permit, EIP-3009 authorizations with FiatToken v2's type hashes), so what the escrow and
Hearth's signers do with it holds for USDC."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from web3.contract import Contract

from payments.devnet import TOKEN_NAME, USDC
from tests.payments.contracts.chain import CHAIN_ID, Chain, anvil, new_account, reverts

# USDC's (FiatToken v2) published type hashes: tooling written for USDC signs exactly these.
USDC_TYPEHASHES = {
    "PERMIT_TYPEHASH": "6e71edae12b1b97f4d1f60370fef10105fa2faae0126114a169c64845d6126c9",
    "TRANSFER_WITH_AUTHORIZATION_TYPEHASH": (
        "7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267"
    ),
    "RECEIVE_WITH_AUTHORIZATION_TYPEHASH": "d099cc98ef71107a616c4f0f941f04c322d8e254fe26b3c6668db87aae413de8",
    "CANCEL_AUTHORIZATION_TYPEHASH": "158b0a9edf7a828aad02f63cd515c68ef2f50ba807396f6d12842833a1597429",
}


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with anvil() as c:
        yield c


@pytest.fixture(scope="module")
def usdc(chain: Chain) -> Contract:
    return chain.deploy("TestUSDC", TOKEN_NAME, chain.deployer)


def test_test_usdc_speaks_usdc(chain: Chain, usdc: Contract) -> None:
    assert usdc.functions.decimals().call() == 6
    assert usdc.functions.symbol().call() == "USDC"
    for name, expected in USDC_TYPEHASHES.items():
        assert getattr(usdc.functions, name)().call().hex() == expected, name
    _fields, name, version, chain_id, contract, *_ = usdc.functions.eip712Domain().call()
    assert (name, version, chain_id, contract) == (TOKEN_NAME, "2", CHAIN_ID, usdc.address)
    with reverts("OwnableUnauthorizedAccount(address)"):
        usdc.functions.mint(chain.accounts[3], 1).transact({"from": chain.accounts[3]})


def test_test_usdc_permit_and_authorizations(chain: Chain, usdc: Contract) -> None:
    owner, relayer, payee = new_account(), chain.accounts[3], chain.accounts[4]
    chain.transact(usdc.functions.mint(owner.address, 10 * USDC), chain.deployer)
    domain = {"name": TOKEN_NAME, "version": "2", "chainId": CHAIN_ID, "verifyingContract": usdc.address}
    deadline = chain.now() + 600

    permit = owner.sign_typed_data(
        domain,
        {"Permit": [{"name": n, "type": t} for n, t in (
            ("owner", "address"), ("spender", "address"), ("value", "uint256"), ("nonce", "uint256"),
            ("deadline", "uint256"))]},
        {"owner": owner.address, "spender": payee, "value": USDC, "nonce": 0, "deadline": deadline},
    )  # fmt: skip
    chain.transact(
        usdc.functions.permit(
            owner.address,
            payee,
            USDC,
            deadline,
            permit.v,
            permit.r.to_bytes(32, "big"),
            permit.s.to_bytes(32, "big"),
        ),
        relayer,
    )
    assert usdc.functions.allowance(owner.address, payee).call() == USDC
    assert usdc.functions.nonces(owner.address).call() == 1

    transfer_types = {"TransferWithAuthorization": [{"name": n, "type": t} for n, t in (
        ("from", "address"), ("to", "address"), ("value", "uint256"), ("validAfter", "uint256"),
        ("validBefore", "uint256"), ("nonce", "bytes32"))]}  # fmt: skip
    nonce = secrets.token_bytes(32)
    message = {"from": owner.address, "to": payee, "value": 2 * USDC, "validAfter": 0,
               "validBefore": deadline, "nonce": nonce}  # fmt: skip
    signed = owner.sign_typed_data(domain, transfer_types, message)
    args = (owner.address, payee, 2 * USDC, 0, deadline, nonce, signed.v,
            signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big"))  # fmt: skip
    with reverts("CallerMustBePayee(address,address)"):  # receive* only by the payee
        usdc.functions.receiveWithAuthorization(*args).transact({"from": relayer})
    chain.transact(usdc.functions.transferWithAuthorization(*args), relayer)
    assert usdc.functions.balanceOf(payee).call() == 2 * USDC
    assert usdc.functions.authorizationState(owner.address, nonce).call() is True
    with reverts("AuthorizationUsedOrCanceled(address,bytes32)"):
        usdc.functions.transferWithAuthorization(*args).transact({"from": relayer})

    cancelled = secrets.token_bytes(32)
    cancel = owner.sign_typed_data(
        domain,
        {
            "CancelAuthorization": [
                {"name": "authorizer", "type": "address"},
                {"name": "nonce", "type": "bytes32"},
            ]
        },
        {"authorizer": owner.address, "nonce": cancelled},
    )
    chain.transact(
        usdc.functions.cancelAuthorization(
            owner.address, cancelled, cancel.v, cancel.r.to_bytes(32, "big"), cancel.s.to_bytes(32, "big")
        ),
        relayer,
    )
    assert usdc.functions.authorizationState(owner.address, cancelled).call() is True
