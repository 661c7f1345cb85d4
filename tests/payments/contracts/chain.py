"""A real local chain for contract tests: anvil as a subprocess, web3.py on top, signing with eth-account."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from eth_abi.abi import decode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import ContractCustomError, ContractLogicError
from web3.logs import DISCARD
from web3.types import TxReceipt

from payments.devnet import DEVNET_CHAIN_ID, TOKEN_NAME, connect, spawn_anvil
from payments.escrow_build import (
    ARTIFACTS_DIR,
    authorization_nonce,
    load_artifact,
    receipt_typed_data,
    receive_authorization_typed_data,
)
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[3]
COMPILE_SCRIPT = ROOT / "payments" / "contracts" / "compile.mjs"
TEST_SOURCES = Path(__file__).resolve().parent
CHAIN_ID = DEVNET_CHAIN_ID
COMPILE_TIMEOUT_SECONDS = 120
SEND_GAS = 1_000_000


def compile_contracts(out: Path, *source_dirs: Path) -> None:
    """Runs ``compile.mjs`` into ``out``; fails the test with solc's messages if it does not compile."""
    proc = subprocess.run(
        ["node", str(COMPILE_SCRIPT), "--out", str(out), *map(str, source_dirs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_SECONDS,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"compile.mjs failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


class Chain:
    """A web3 connection to a running anvil, with deploy/transact helpers and clock control."""

    def __init__(self, url: str) -> None:
        self.w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
        self.accounts: list[str] = []  # anvil's unlocked, funded accounts, once it answers
        self.deployer = ""

    def deploy(self, name: str, *args: Any, artifacts_dir: Path = ARTIFACTS_DIR) -> Contract:
        art = load_artifact(name, artifacts_dir)
        factory = self.w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
        tx = factory.constructor(*args).transact({"from": self.deployer})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx)
        assert receipt["status"] == 1, f"deploying {name} failed"
        return cast(Contract, self.w3.eth.contract(address=receipt["contractAddress"], abi=art.abi))

    def transact(self, call: Any, sender: str) -> TxReceipt:
        """Sends a contract call from an unlocked anvil account and waits for a successful receipt."""
        tx = call.transact({"from": sender})
        receipt = self.w3.eth.wait_for_transaction_receipt(tx)
        assert receipt["status"] == 1
        return receipt

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def advance(self, seconds: int) -> None:
        self.w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
        self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]

    def rpc(self, method: str, *params: Any) -> Any:
        """A raw JSON-RPC call (anvil's ``evm_*``/``anvil_*`` methods); fails the test on an error answer."""
        answer = self.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
        assert "error" not in answer, f"{method} failed: {answer['error']}"
        return answer.get("result")

    def next_block_at(self, timestamp: int) -> None:
        """The next block (and so the next transaction mined) carries exactly ``timestamp``."""
        self.rpc("evm_setNextBlockTimestamp", timestamp)

    def send(self, call: Any, sender: str, **tx: Any) -> TxReceipt:
        """Sends a contract call without estimating gas first, so a failing one is mined (status 0) too."""
        tx_hash = call.transact({"from": sender, "gas": SEND_GAS, **tx})
        return self.w3.eth.wait_for_transaction_receipt(tx_hash)

    def block_time(self, receipt: TxReceipt) -> int:
        return int(self.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


@contextmanager
def anvil() -> Iterator[Chain]:
    """A fresh anvil on a free port for the duration of the block; killed afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = spawn_anvil(port)
    try:
        connect(url, pid=proc.pid)  # waits for the RPC; raises if anvil exits or never answers
        chain = Chain(url)
        chain.accounts = list(chain.w3.eth.accounts)
        chain.deployer = chain.accounts[0]
        yield chain
    finally:
        proc.kill()
        proc.wait(10)


def selector(signature: str) -> str:
    """The 4-byte selector of a custom error such as ``JobNotOpen(bytes32)``, as 0x-hex."""
    return "0x" + keccak(text=signature)[:4].hex()


@contextmanager
def reverts(error_signature: str, *args: Any) -> Iterator[None]:
    """Asserts the block raises a revert carrying the custom error ``error_signature``; with ``args``, also
    that the error carries exactly these arguments (ABI-decoded by the types in the signature)."""
    with pytest.raises((ContractCustomError, ContractLogicError)) as info:
        yield
    data = info.value.data
    data_hex = data if isinstance(data, str) else repr(data)
    assert data_hex.startswith(selector(error_signature)), f"expected {error_signature}, got {data_hex!r}"
    if args:
        types = error_signature[error_signature.index("(") + 1 : -1].split(",")
        decoded = decode(types, bytes.fromhex(data_hex[10:]))
        assert tuple(_plain(v) for v in decoded) == tuple(_plain(v) for v in args), (
            f"{error_signature} carried {decoded}, expected {args}"
        )


def _plain(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def sign_receipt(
    validator: LocalAccount,
    *,
    escrow: str,
    job_id: bytes,
    result_digest: bytes,
    passed: bool,
    amount: int,
    provider: str,
    chain_id: int = CHAIN_ID,
) -> bytes:
    data = receipt_typed_data(
        chain_id=chain_id,
        escrow=escrow,
        job_id=job_id,
        result_digest=result_digest,
        passed=passed,
        amount=amount,
        provider=provider,
    )
    return bytes(validator.sign_typed_data(full_message=data).signature)


def sign_funding_authorization(
    payer: LocalAccount,
    *,
    token: str,
    escrow: str,
    job_id: bytes,
    provider: str,
    validator: str,
    amount: int,
    deadline: int,
    valid_after: int,
    valid_before: int,
) -> tuple[int, bytes, bytes]:
    """The payer's ReceiveWithAuthorization for one job's terms, as (v, r, s)."""
    data = receive_authorization_typed_data(
        chain_id=CHAIN_ID,
        token=token,
        token_name=TOKEN_NAME,
        payer=payer.address,
        escrow=escrow,
        amount=amount,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=authorization_nonce(job_id, provider, validator, amount, deadline),
    )
    signed = payer.sign_typed_data(full_message=data)
    return signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")


def new_account() -> LocalAccount:
    account: LocalAccount = Account.create()
    return account


def events(contract: Contract, name: str, receipt: TxReceipt) -> list[dict[str, Any]]:
    """The ``name`` events ``contract`` emitted in ``receipt``; other contracts' logs are skipped."""
    return [
        dict(e["args"]) for e in getattr(contract.events, name)().process_receipt(receipt, errors=DISCARD)
    ]
