"""A long escrow history built fast on a fresh anvil, for ``market.py``'s reputation scan.

Private to ``bench/``, not a benchmark itself; ``market.py`` imports it after ``_common`` (which puts the
repository on ``sys.path``).

The chain is real: anvil from ``node_modules``, the committed ``TestUSDC`` and ``HearthEscrow``, every job
funded by its payer (``fund`` after an ``approve``) and settled by the escrow's own rules — ``release``
against the validator's passing EIP-712 receipt, ``refund`` against a failing one before the deadline, and
``refund`` by anyone after the deadline (anvil's clock moved on with ``evm_increaseTime``). What makes it
fast: anvil's automine is off and every sender impersonated (``anvil_autoImpersonateAccount``), so the
transactions of a block go out as one JSON-RPC batch of ``eth_sendTransaction`` with explicit nonces and
gas, nothing waits for a receipt, and one ``anvil_mine`` seals the block and the empty blocks after it.
Receipts are signed with the validators' keys over the escrow's EIP-712 digest computed here (checked once
against the contract's ``receiptDigest``).

Each block's number is known when it is mined, so :class:`History` knows exactly what every provider's
record must be (:meth:`History.expected`), block numbers included.
"""

from __future__ import annotations

import random
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
from coincurve import PrivateKey
from eth_abi.abi import encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from payments.devnet import DEVNET_CHAIN_ID, TOKEN_NAME, USDC, connect, spawn_anvil
from payments.escrow_build import load_artifact
from requester.escrow_events import escrow_events
from requester.reputation import REFUNDED_EXPIRED, REFUNDED_FAILED, RELEASED, Reputation

GAS = 400_000  # per transaction, declared: anvil packs blocks by declared gas (30M: 75 a block)
GAS_PRICE = 2 * 10**9  # above anvil's base fee, which only falls on these mostly empty blocks
PAYER_WEI = 10**20
NORMAL_DEADLINE_SECONDS = 30 * 86_400  # past the jobs due to expire, and anything the build's blocks add
SHORT_DEADLINE_SLACK_SECONDS = 3600  # beyond the seconds the build's blocks can add (one or more each)
RPC_TIMEOUT_SECONDS = 60
MAX_UINT = 2**256 - 1


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


MINT = _selector("mint(address,uint256)")
APPROVE = _selector("approve(address,uint256)")
FUND = _selector("fund(bytes32,address,address,uint256,uint64)")
# HearthEscrow.Terms: payer, provider, validator, amount, deadline
TERMS = "(address,address,address,uint256,uint64)"
RELEASE = _selector(f"release(bytes32,{TERMS},uint256,bytes32,bytes)")
REFUND = _selector(f"refund(bytes32,{TERMS},bytes32,bytes)")
RECEIPT_DIGEST = _selector("receiptDigest(bytes32,bytes32,bool,uint256,address)")
RECEIPT_TYPEHASH = _selector("RECEIPT_TYPEHASH()")
DOMAIN_SEPARATOR = _selector("domainSeparator()")


class Rpc:
    """JSON-RPC over one keep-alive HTTP session; an error in any answer raises."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()
        self._id = 0

    def call(self, method: str, *params: Any) -> Any:
        return self.batch([(method, list(params))])[0]

    def batch(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        if not calls:
            return []
        body: list[dict[str, Any]] = []
        for method, params in calls:
            self._id += 1
            body.append({"jsonrpc": "2.0", "id": self._id, "method": method, "params": params})
        r = self.session.post(self.url, json=body, timeout=RPC_TIMEOUT_SECONDS)
        r.raise_for_status()
        answers = sorted(r.json(), key=lambda a: a["id"])
        errors = [a["error"] for a in answers if "error" in a]
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(calls)} {calls[0][0]} calls failed: {errors[0]}")
        return [a["result"] for a in answers]

    def head(self) -> int:
        return int(self.call("eth_blockNumber"), 16)

    def now(self) -> int:
        return int(self.call("eth_getBlockByNumber", "latest", False)["timestamp"], 16)

    def close(self) -> None:
        self.session.close()


@dataclass
class Job:
    job_id: bytes
    provider: str
    payer: str
    validator: int  # index into History.validators
    amount: int
    deadline: int
    outcome: str  # what the build does to it: released, refunded_failed or refunded_expired
    paid: int = 0
    funded_block: int = 0
    settled_block: int | None = None


@dataclass
class History:
    """The escrow, its token, and every job the build made with the block it landed in."""

    rpc: Rpc
    token: str
    escrow: str
    start_block: int  # the escrow's deployment block: where scans begin
    providers: list[str]
    payers: list[str]
    validators: list[PrivateKey]
    relayer: str  # submits settlements (anyone may)
    deployer: str
    per_block: int
    gap: int
    jobs: list[Job] = field(default_factory=list)
    nonces: dict[str, int] = field(default_factory=dict)
    transactions: int = 0
    domain_separator: bytes = b""
    receipt_typehash: bytes = b""
    rng: random.Random = field(default_factory=lambda: random.Random(2026))

    @property
    def validator_addresses(self) -> list[str]:
        return [_address_of(k) for k in self.validators]

    def logs(self) -> int:
        return sum(1 + (j.settled_block is not None) for j in self.jobs)

    def counts(self) -> dict[str, int]:
        out = {RELEASED: 0, REFUNDED_FAILED: 0, REFUNDED_EXPIRED: 0}
        for j in self.jobs:
            out[j.outcome] += 1
        return out

    def expected(self) -> dict[str, Reputation]:
        """Each provider's record as the build's own transactions make it."""
        vals = self.validator_addresses
        out: dict[str, Reputation] = {}
        by_provider: dict[str, list[Job]] = {}
        for j in self.jobs:
            by_provider.setdefault(j.provider, []).append(j)
        for provider, jobs in by_provider.items():
            blocks = [j.funded_block for j in jobs] + [j.settled_block for j in jobs if j.settled_block]
            out[provider] = Reputation(
                provider=provider,
                jobs_funded=len(jobs),
                jobs_released=sum(j.outcome == RELEASED for j in jobs),
                jobs_refunded_failed=sum(j.outcome == REFUNDED_FAILED for j in jobs),
                jobs_refunded_expired=sum(j.outcome == REFUNDED_EXPIRED for j in jobs),
                earned=sum(j.paid for j in jobs),
                distinct_payers=len({j.payer for j in jobs}),
                distinct_validators=len({vals[j.validator] for j in jobs}),
                first_block=min(blocks),
                last_block=max(blocks),
            )
        return out

    # -- building --------------------------------------------------------------------------------------

    def add_jobs(self, n: int) -> None:
        """Fund ``n`` jobs (60 % to be released, 25 % refunded on a failing receipt, 15 % after their
        deadline) and settle them all: releases and failing refunds, then the clock past the short
        deadlines, then the refunds after the deadline."""
        now = self.rpc.now()
        # anvil steps a block's timestamp at least a second past its parent's: the jobs due to expire must
        # still be open when their last settled sibling lands, whatever the clock
        blocks = (2 * -(-n // self.per_block) + 2 * -(-len(self.payers) // self.per_block)) * (1 + self.gap)
        short = blocks + SHORT_DEADLINE_SLACK_SECONDS
        fresh: list[Job] = []
        for _ in range(n):
            roll = self.rng.random()
            outcome = RELEASED if roll < 0.60 else REFUNDED_FAILED if roll < 0.85 else REFUNDED_EXPIRED
            seconds = short if outcome == REFUNDED_EXPIRED else short + NORMAL_DEADLINE_SECONDS
            fresh.append(
                Job(
                    job_id=secrets.token_bytes(32),
                    provider=self.rng.choice(self.providers),
                    payer=self.rng.choice(self.payers),
                    validator=self.rng.randrange(len(self.validators)),
                    amount=self.rng.randint(1, 20) * USDC + self.rng.randrange(USDC),
                    deadline=now + seconds,
                    outcome=outcome,
                )
            )
        self._fund_payers(fresh)
        self._mine(
            [(j.payer, self.escrow, self._fund_data(j)) for j in fresh],
            lambda i, block: setattr(fresh[i], "funded_block", block),
        )
        self.jobs.extend(fresh)
        before = [j for j in fresh if j.outcome in (RELEASED, REFUNDED_FAILED)]
        for j in before:
            j.paid = (j.amount if self.rng.random() < 0.75 else j.amount // 2) if j.outcome == RELEASED else 0
        self._mine([(self.relayer, self.escrow, self._settle_data(j)) for j in before], _settled(before))
        after = [j for j in fresh if j.outcome == REFUNDED_EXPIRED]
        if after:
            self.rpc.call("evm_increaseTime", max(max(j.deadline for j in after) - self.rpc.now() + 1, 1))
            data = [
                REFUND
                + encode(["bytes32", TERMS, "bytes32", "bytes"], [j.job_id, self._terms(j), bytes(32), b""])
                for j in after
            ]
            self._mine([(self.relayer, self.escrow, d) for d in data], _settled(after))

    def _fund_payers(self, jobs: list[Job]) -> None:
        """Mint each payer what its new jobs cost; a payer's first jobs also bring gas and its approve."""
        owed: dict[str, int] = {}
        for j in jobs:
            owed[j.payer] = owed.get(j.payer, 0) + j.amount
        new = [p for p in owed if p not in self.nonces]
        self.rpc.batch([("anvil_setBalance", [p, hex(PAYER_WEI)]) for p in new])
        txs = [
            (self.deployer, self.token, MINT + encode(["address", "uint256"], [p, a]))
            for p, a in owed.items()
        ]
        txs += [
            (p, self.token, APPROVE + encode(["address", "uint256"], [self.escrow, MAX_UINT])) for p in new
        ]
        self._mine(txs, lambda i, block: None)

    def _fund_data(self, j: Job) -> bytes:
        args = [j.job_id, j.provider, self.validator_addresses[j.validator], j.amount, j.deadline]
        return FUND + encode(["bytes32", "address", "address", "uint256", "uint64"], args)

    def _terms(self, j: Job) -> tuple[str, str, str, int, int]:
        """The job's terms as ``release`` and ``refund`` take them back."""
        return (j.payer, j.provider, self.validator_addresses[j.validator], j.amount, j.deadline)

    def _settle_data(self, j: Job) -> bytes:
        digest = keccak(j.job_id)  # the result digest the receipt names
        passed = j.outcome == RELEASED
        signature = self.sign_receipt(j, digest, passed, j.paid)
        terms = self._terms(j)
        if passed:
            return RELEASE + encode(
                ["bytes32", TERMS, "uint256", "bytes32", "bytes"],
                [j.job_id, terms, j.paid, digest, signature],
            )
        return REFUND + encode(["bytes32", TERMS, "bytes32", "bytes"], [j.job_id, terms, digest, signature])

    def receipt_digest(self, job_id: bytes, digest: bytes, passed: bool, amount: int, provider: str) -> bytes:
        """The escrow's EIP-712 digest of a receipt (``receiptDigest``), computed here."""
        struct = keccak(
            self.receipt_typehash
            + encode(
                ["bytes32", "bytes32", "bool", "uint256", "address"],
                [job_id, digest, passed, amount, provider],
            )
        )
        return keccak(b"\x19\x01" + self.domain_separator + struct)

    def sign_receipt(self, j: Job, digest: bytes, passed: bool, amount: int) -> bytes:
        hashed = self.receipt_digest(j.job_id, digest, passed, amount, j.provider)
        sig = self.validators[j.validator].sign_recoverable(hashed, hasher=None)
        return sig[:64] + bytes([27 + sig[64]])

    def _mine(self, txs: list[tuple[str, str, bytes]], landed: Any) -> None:
        """Send ``txs`` ``per_block`` at a time, each batch sealed in one block followed by ``gap`` empty
        ones; ``landed(i, block)`` is told the block of the i-th transaction."""
        size = self.per_block
        head = self.rpc.head()
        last = 0
        for start in range(0, len(txs), size):
            chunk = txs[start : start + size]
            calls = []
            for sender, to, data in chunk:
                nonce = self.nonces.get(sender, 0)
                self.nonces[sender] = nonce + 1
                tx = {"from": sender, "to": to, "data": "0x" + data.hex(), "gas": hex(GAS)}
                calls.append(
                    ("eth_sendTransaction", [{**tx, "gasPrice": hex(GAS_PRICE), "nonce": hex(nonce)}])
                )
            self.rpc.batch(calls)
            self.rpc.call("anvil_mine", hex(1 + self.gap))
            for i in range(len(chunk)):
                landed(start + i, head + 1)
            head += 1 + self.gap
            last = len(chunk)
            self.transactions += last
        if txs:
            self._check_block(head - self.gap, last)

    def _check_block(self, number: int, count: int) -> None:
        """Every transaction of the block succeeded (the last block of each phase is checked)."""
        block = self.rpc.call("eth_getBlockByNumber", hex(number), False)
        hashes = block["transactions"]
        receipts = self.rpc.batch([("eth_getTransactionReceipt", [h]) for h in hashes])
        failed = [r["transactionHash"] for r in receipts if int(r["status"], 16) != 1]
        if len(hashes) != count or failed:
            raise RuntimeError(
                f"block {number}: {len(hashes)} transactions of {count} sent, failed: {failed}"
            )


def _settled(jobs: list[Job]) -> Any:
    def landed(i: int, block: int) -> None:
        jobs[i].settled_block = block

    return landed


def escrow_topics() -> list[str]:
    """topic0 of the three events the reputation scan reads (``Funded``, ``Released``, ``Refunded``)."""
    return ["0x" + topic.hex() for topic in escrow_events()]


def _address_of(key: PrivateKey) -> str:
    return to_checksum_address(keccak(key.public_key.format(compressed=False)[1:])[-20:])


def _deploy(rpc: Rpc, deployer: str, name: str, types: list[str], args: list[Any]) -> str:
    art = load_artifact(name)
    data = art.bytecode + encode(types, args).hex()
    tx = rpc.call(
        "eth_sendTransaction", {"from": deployer, "data": data if data.startswith("0x") else "0x" + data}
    )
    receipt = None
    for _ in range(200):  # automine seals it at once, but answers the send first
        receipt = rpc.call("eth_getTransactionReceipt", tx)
        if receipt is not None:
            break
        time.sleep(0.025)
    if receipt is None or int(receipt["status"], 16) != 1:
        raise RuntimeError(f"deploying {name} failed: {receipt}")
    return to_checksum_address(receipt["contractAddress"])


@contextmanager
def anvil_chain(port: int) -> Iterator[Rpc]:
    """A fresh anvil on ``port`` for the block; killed (this process's child, by its pid) afterwards."""
    proc: subprocess.Popen[bytes] = spawn_anvil(port)
    url = f"http://127.0.0.1:{port}"
    rpc = Rpc(url)
    try:
        connect(url, pid=proc.pid)
        yield rpc
    finally:
        rpc.close()
        proc.kill()
        proc.wait(10)


def build(
    rpc: Rpc, *, jobs: int, providers: int, payers: int, validators: int, per_block: int, gap: int
) -> tuple[History, float]:
    """Deploy the token and the escrow, then ``jobs`` settled jobs; the history and the build's seconds."""
    t0 = time.perf_counter()
    accounts = rpc.call("eth_accounts")
    deployer, relayer = to_checksum_address(accounts[0]), to_checksum_address(accounts[5])
    token = _deploy(rpc, deployer, "TestUSDC", ["string", "address"], [TOKEN_NAME, deployer])
    escrow = _deploy(rpc, deployer, "HearthEscrow", ["address"], [token])
    start = rpc.head()
    if int(rpc.call("eth_chainId"), 16) != DEVNET_CHAIN_ID:
        raise RuntimeError("anvil serves another chain than the devnet's")
    rpc.call("evm_setAutomine", False)
    rpc.call("anvil_autoImpersonateAccount", True)
    rng = random.Random(7)
    h = History(
        rpc=rpc,
        token=token,
        escrow=escrow,
        start_block=start,
        providers=[to_checksum_address(rng.randbytes(20)) for _ in range(providers)],
        payers=[to_checksum_address(rng.randbytes(20)) for _ in range(payers)],
        validators=[PrivateKey(rng.randbytes(32)) for _ in range(validators)],
        relayer=relayer,
        deployer=deployer,
        per_block=per_block,
        gap=gap,
        nonces={a: int(rpc.call("eth_getTransactionCount", a, "latest"), 16) for a in (deployer, relayer)},
    )
    h.receipt_typehash = bytes.fromhex(
        rpc.call("eth_call", {"to": escrow, "data": "0x" + RECEIPT_TYPEHASH.hex()}, "latest")[2:]
    )
    h.domain_separator = bytes.fromhex(
        rpc.call("eth_call", {"to": escrow, "data": "0x" + DOMAIN_SEPARATOR.hex()}, "latest")[2:]
    )
    probe = (b"\x01" * 32, b"\x02" * 32, True, 5, h.providers[0])
    args = encode(["bytes32", "bytes32", "bool", "uint256", "address"], list(probe))
    on_chain = rpc.call("eth_call", {"to": escrow, "data": "0x" + (RECEIPT_DIGEST + args).hex()}, "latest")
    if bytes.fromhex(on_chain[2:]) != h.receipt_digest(*probe):
        raise RuntimeError("the receipt digest computed here differs from the escrow's receiptDigest")
    h.add_jobs(jobs)
    return h, time.perf_counter() - t0
