"""Rows: a chain reorg during funding, and during release. Every job still settles exactly once.

One real ``hearth run`` daemon works against a devnet anvil with ``confirmations = 3``. Each iteration
runs one paid job end to end (gasless funding, a Docker transcode, a validator's receipt, the release)
and reorganises the chain (``anvil_reorg``) at one moment of it, rotating through these variants:

- ``reorged_out``: the node's transaction was mined but is not yet final, and the new branch drops it.
  Mining is paused meanwhile, so the node must notice, re-broadcast the same bytes and wait: the job is
  not funded (or not settled) while its transaction is out of the chain, and becomes so once it is
  mined again and three blocks deep.
- ``moved``: the new branch mines the same transaction in another block before it is final.
- ``replaced``: the new branch holds someone else's transaction doing the same thing: the payer funds
  the escrow itself (``fund``), or the validator submits the release with the same receipt. The node's
  own transaction, sent again, reverts; the node must take the escrow's state for what it is.
- ``moved_after_confirmation``: the node had already counted its transaction final; a deeper reorg
  mines it again in another block (as a real chain re-mines what a reorg returned to the mempool).
- ``dropped_after_confirmation``: a reorg deeper than ``confirmations`` drops a transaction the node had
  counted final (anvil, unlike a real mempool, does not re-mine it). The node must notice that its
  wallet's nonce went back, send the same bytes again, and not leave later transactions behind a gap.

After each iteration the node's records and the chain must agree: one ``running`` and one ``settled``
transition in the journal, no transaction of the job left unresolved, one ``Released`` event, the escrow
entry released, the provider paid exactly the receipt's amount and the payer charged exactly that, and
the node's wallet nonce equal to the transactions its journal says were mined (nothing else is live).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_utils.address import to_checksum_address as _addr
from web3.exceptions import TransactionNotFound

from payments import devnet
from payments.escrow_build import load_artifact
from payments.keys import EthSigner, Signer, new_ed25519
from payments.receipts import FundingTerms, Receipt
from requester.client import NodeClient, NodeError
from sandbox.ffmpeg import make_test_clip
from tests.chaos.harness import journal_path, node_did, read_journal, start
from tests.chaos.scoreboard import Row, scenario
from tests.conftest import DaemonProcess, free_port
from tests.payments.paid import PaidHome, paid_envelope, paid_home, quote_and_fund, receipt_for, set_chain

FUNDING = "chain reorg during funding"
RELEASE = "chain reorg during release"
VARIANTS = ("reorged_out", "moved", "replaced", "moved_after_confirmation", "dropped_after_confirmation")
CONFIRMATIONS = 3
CHAIN_POLL_SECONDS = 0.1  # the node's settlement loop: a reorg is noticed within a few of these
HOLD_SECONDS = 1.5  # how long a reorged-out transaction is kept out while the node is watched
STEP_TIMEOUT_SECONDS = 90.0  # one step of one job (a transcode on a loaded 2-core machine included)
STEP_POLL_SECONDS = 0.1
MINE_EVERY_SECONDS = 0.3  # while waiting for finality, a block this often
SMALL = {"timeout_seconds": 120, "max_output_mb": 20, "cpus": 0.5, "memory_mb": 256, "gpus": 0}
REPLACEMENT_GAS = 300_000
OPEN_TX_STATES = ("signed", "sent", "mined")


class Stuck(Exception):
    """A step did not reach its state in time: the iteration is counted bad and abandoned."""


@dataclass
class _World:
    """The devnet, the daemon and the parties of every iteration."""

    ph: PaidHome
    daemon: DaemonProcess
    client: NodeClient
    requester: Signer
    did: str
    cid: str

    # -- anvil ----------------------------------------------------------------------------------------

    def rpc(self, method: str, *params: Any) -> Any:
        reply = self.ph.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
        if "error" in reply:
            raise RuntimeError(f"anvil refused {method}: {reply['error']}")
        return reply.get("result")

    def mine(self, blocks: int = 1) -> None:
        self.rpc("anvil_mine", hex(blocks))

    def head(self) -> int:
        return int(self.ph.w3.eth.block_number)

    def reorg(self, depth: int, txs: list[tuple[bytes, int]] | None = None) -> None:
        """Replace the last ``depth`` blocks by as many new ones holding ``txs`` (raw, block offset)."""
        self.rpc("anvil_reorg", depth, [["0x" + raw.hex(), offset] for raw, offset in txs or []])

    def raw_tx(self, tx_hash: str) -> bytes:
        return bytes(self.ph.w3.eth.get_raw_transaction(tx_hash))  # type: ignore[arg-type]

    def signed(self, signer: EthSigner, call: Any, nonce: int) -> bytes:
        """``call`` from ``signer`` at ``nonce``, signed (gas fixed: it may not run at the current head)."""
        tx = call.build_transaction({"from": signer.address, "nonce": nonce, "gas": REPLACEMENT_GAS})
        return bytes(Account.sign_transaction(tx, signer.private_key_bytes()).raw_transaction)

    def block_of(self, tx_hash: str) -> int | None:
        """The block holding ``tx_hash`` on the canonical chain, or None."""
        try:
            return int(self.ph.w3.eth.get_transaction_receipt(tx_hash)["blockNumber"])  # type: ignore[arg-type]
        except TransactionNotFound:
            return None

    async def mined_again(self, tx_hash: str) -> None:
        """Mine now and then until ``tx_hash`` is back in the chain (the node must send it again)."""
        deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
        while self.block_of(tx_hash) is None:
            if time.monotonic() > deadline:
                raise Stuck(f"{tx_hash} was never sent again after a reorg dropped it")
            self.mine()
            await asyncio.sleep(MINE_EVERY_SECONDS)

    def escrow_status(self, terms: FundingTerms) -> int:
        return self.ph.escrow_job(terms.to_json()["escrow_job_id"])[0]

    # -- the node -------------------------------------------------------------------------------------

    async def view(self, job: str) -> dict[str, Any]:
        return (await self.client.status(job))["job"]  # type: ignore[no-any-return]

    async def until(
        self, job: str, what: str, done: Callable[[dict[str, Any]], bool], *, mine: bool = False
    ) -> dict[str, Any]:
        """Poll the job until ``done(view)``; mine a block now and then when ``mine`` (finality)."""
        deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
        mined_at = time.monotonic()
        while True:
            view = await self.view(job)
            if done(view):
                return view
            if view["state"] in ("failed", "expired", "cancelled", "rejected"):
                raise Stuck(f"{what}: the job ended {view['state']}: {view.get('failure')}")
            if time.monotonic() > deadline:
                raise Stuck(
                    f"{what}: still {view['state']} after {STEP_TIMEOUT_SECONDS:.0f}s: {view['payment']}"
                )
            if mine and time.monotonic() - mined_at > MINE_EVERY_SECONDS:
                self.mine()
                mined_at = time.monotonic()
            await asyncio.sleep(STEP_POLL_SECONDS)


def _txs(view: dict[str, Any], purpose: str) -> list[dict[str, Any]]:
    return [t for t in view["payment"]["txs"] if t["purpose"] == purpose]


def _tx_in(purpose: str, *states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda view: any(t["state"] in states for t in _txs(view, purpose))


def _state_is(*states: str) -> Callable[[dict[str, Any]], bool]:
    return lambda view: view["state"] in states


# -- one reorg ----------------------------------------------------------------------------------------


async def _reorg(
    w: _World,
    row: Row,
    job: str,
    purpose: str,
    variant: str,
    replacement: Callable[[], list[bytes]],
    final: Callable[[dict[str, Any]], bool],
    held: Callable[[dict[str, Any]], str | None],
) -> None:
    """Reorganise the chain under ``job``'s ``purpose`` transaction as ``variant`` says, then mine until
    ``final``. ``held(view)`` names what is wrong if the job moved on while its transaction was out."""
    view = await w.until(job, f"{purpose} mined", _tx_in(purpose, "mined", "confirmed"))
    if variant.endswith("_after_confirmation"):
        view = await w.until(job, f"{purpose} final", final, mine=True)
    tx = next(t for t in _txs(view, purpose) if t["state"] in ("mined", "confirmed"))
    mined_in = int(tx["block_number"])
    depth = w.head() - mined_in + 1
    if variant == "reorged_out":
        w.rpc("evm_setAutomine", False)
        try:
            w.reorg(depth)
            await w.until(job, f"{purpose} seen reorged out", lambda v: not _tx_in(purpose, "mined")(v))
            hold_until = time.monotonic() + HOLD_SECONDS
            while time.monotonic() < hold_until:
                problem = held(await w.view(job))
                if problem is not None:
                    row.fail(f"{purpose}_counted_while_reorged_out", f"{job}: {problem}")
                    break
                await asyncio.sleep(STEP_POLL_SECONDS)
        finally:
            w.rpc("evm_setAutomine", True)
    elif variant == "replaced":
        w.reorg(depth, [(raw, 0) for raw in replacement()])
    elif variant == "dropped_after_confirmation":
        w.reorg(depth)
        await w.mined_again(tx["hash"])
    else:  # moved, moved_after_confirmation: the same bytes one block lower on the new branch
        w.reorg(depth + 1, [(w.raw_tx(tx["hash"]), 0)])
    row.good[f"{purpose}_reorgs"] = row.good.get(f"{purpose}_reorgs", 0) + 1
    await w.until(job, f"{purpose} final after the reorg", final, mine=True)
    resolved = await w.until(
        job, f"{purpose} resolved", lambda v: not _tx_in(purpose, *OPEN_TX_STATES)(v), mine=True
    )
    mine = _txs(resolved, purpose)
    # what the node must have recorded of its own transaction, so the row cannot pass without the reorg
    # having hit it: the same bytes (one record) re-sent or followed, or, when replaced, its resend reverted
    expected = {
        "reorged_out": (tx["hash"], "confirmed", None),
        "moved": (tx["hash"], "confirmed", mined_in - 1),
        "replaced": (tx["hash"], "reverted", None),
        "moved_after_confirmation": (tx["hash"], "confirmed", None),
        "dropped_after_confirmation": (tx["hash"], "confirmed", w.block_of(tx["hash"])),
    }[variant]
    got = [(t["hash"], t["state"], t["block_number"]) for t in mine]
    want_hash, want_state, want_block = expected
    if len(got) != 1 or got[0][:2] != (want_hash, want_state) or want_block not in (None, got[0][2]):
        row.fail(f"{purpose}_tx_record_wrong", f"{job} {variant}: {got}, expected {expected}")


def _payer_funds_itself(w: _World, terms: FundingTerms) -> list[bytes]:
    """The payer's own ``approve`` + ``fund`` for the same escrow entry, as raw transactions."""
    token = w.ph.w3.eth.contract(address=_addr(w.ph.net.token), abi=load_artifact("TestUSDC").abi)
    escrow = w.ph.w3.eth.contract(address=_addr(w.ph.net.escrow), abi=load_artifact("HearthEscrow").abi)
    payer = w.ph.payer
    nonce = w.ph.w3.eth.get_transaction_count(_addr(payer.address))
    fund = escrow.functions.fund(terms.job_id, terms.provider, terms.validator, terms.amount, terms.deadline)
    return [
        w.signed(payer, token.functions.approve(w.ph.net.escrow, terms.amount), nonce),
        w.signed(payer, fund, nonce + 1),
    ]


def _validator_releases(w: _World, terms: FundingTerms, body: dict[str, Any]) -> list[bytes]:
    """The validator submitting the same receipt's ``release`` itself (anyone may), as a raw transaction."""
    escrow = w.ph.w3.eth.contract(address=_addr(w.ph.net.escrow), abi=load_artifact("HearthEscrow").abi)
    receipt = Receipt.from_json(body["receipt"])
    call = escrow.functions.release(
        terms.job_id, terms.entry, receipt.amount, receipt.result_digest, bytes.fromhex(body["signature"][2:])
    )
    nonce = w.ph.w3.eth.get_transaction_count(_addr(w.ph.validator.address))
    return [w.signed(w.ph.validator, call, nonce)]


# -- one job ------------------------------------------------------------------------------------------


async def _one_job(w: _World, row: Row, n: int, funding: str | None, release: str | None) -> None:
    before = w.ph.balances()
    env = paid_envelope(w.ph, f"reorg-{funding or 'none'}-{release or 'none'}-{n}", w.cid, limits=SMALL)
    job, terms = await quote_and_fund(w.client, w.did, w.requester, w.ph, env)

    def not_funded(view: dict[str, Any]) -> str | None:
        funding_state = view["payment"]["funding"]["state"]
        if view["state"] != "accepted" or funding_state != "awaiting":
            return f"job {view['state']}, funding {funding_state}"
        if w.escrow_status(terms) != 0:
            return "the escrow entry exists on the canonical chain"
        return None

    funded = _state_is("running", "completed")
    if funding is None:
        await w.until(job, "funded", funded, mine=True)
    else:
        await _reorg(w, row, job, "fund", funding, lambda: _payer_funds_itself(w, terms), funded, not_funded)
    await w.until(job, "completed", _state_is("completed"))

    body = await receipt_for(w.client, job, terms, w.ph.validator)
    amount = int(body["receipt"]["amount"])
    answer = await w.client.post_receipt(job, body)
    if answer["job"]["state"] != "validated":
        row.fail("receipt_not_taken", f"{job}: {answer['job']['state']}")
        return

    def not_settled(view: dict[str, Any]) -> str | None:
        if view["state"] != "validated":
            return f"job {view['state']}"
        if w.ph.balances()["provider"] != before["provider"]:
            return "the provider was paid while the release was out of the chain"
        return None

    settled = _state_is("settled")
    if release is None:
        await w.until(job, "settled", settled, mine=True)
    else:
        replacement = lambda: _validator_releases(w, terms, body)  # noqa: E731
        await _reorg(w, row, job, "release", release, replacement, settled, not_settled)
    w.mine(CONFIRMATIONS)  # anything still hiding would now land and be resolved
    await asyncio.sleep(5 * CHAIN_POLL_SECONDS)
    _check_exactly_once(w, row, job, terms, amount, before)


def _check_exactly_once(
    w: _World, row: Row, job: str, terms: FundingTerms, amount: int, before: dict[str, int]
) -> None:
    facts = read_journal(w.daemon.home).jobs[job]
    if facts.state != "settled" or facts.count("settled") != 1:
        row.fail("not_settled_once", f"{job}: {facts.state}, settled {facts.count('settled')} times")
    if facts.count("running") != 1:
        row.fail("ran_other_than_once", f"{job} ran {facts.count('running')} times")
    with closing(sqlite3.connect(f"file:{journal_path(w.daemon.home)}?mode=ro", uri=True)) as conn:
        txs = conn.execute("SELECT purpose, state FROM chain_txs WHERE job = ?", (job,)).fetchall()
        (mined_total,) = conn.execute(
            "SELECT COUNT(*) FROM chain_txs WHERE state IN ('confirmed', 'reverted')"
        ).fetchone()
    unresolved = [f"{purpose} {state}" for purpose, state in txs if state in OPEN_TX_STATES]
    if unresolved:
        row.fail("tx_unresolved", f"{job}: {unresolved}")
    for purpose in ("fund", "release"):
        if sum(1 for p, state in txs if p == purpose and state == "confirmed") > 1:
            row.fail("tx_confirmed_twice", f"{job}: two confirmed {purpose} transactions")
    escrow_id = terms.to_json()["escrow_job_id"]
    if (released := w.ph.released_events(escrow_id)) != 1:
        row.fail("released_other_than_once", f"{job}: {released} Released events")
    if w.escrow_status(terms) != 2:
        row.fail("escrow_not_released", f"{job}: escrow status {w.escrow_status(terms)}")
    after = w.ph.balances()
    if after["provider"] - before["provider"] != amount:
        row.fail("provider_paid_wrong", f"{job}: +{after['provider'] - before['provider']}, receipt {amount}")
    if before["payer"] - after["payer"] != amount:
        row.fail("payer_charged_wrong", f"{job}: -{before['payer'] - after['payer']}, receipt {amount}")
    sent = w.ph.w3.eth.get_transaction_count(_addr(w.ph.node_wallet.address))
    if sent != mined_total:
        row.fail(
            "stray_node_tx", f"the node's wallet sent {sent} transactions, its journal knows {mined_total}"
        )
    row.runs += 1


# -- the rows -----------------------------------------------------------------------------------------


async def _run(name: str, count: int, workdir: Path, phase: str, offset: int) -> Row:
    row = Row(name, count)
    port = free_port()
    config = {
        "api": {"host": "127.0.0.1", "port": port},
        "scheduler": {"paused": False},
        "policy": {"per_did_concurrency": 4},
    }
    ph = paid_home(workdir / "home", config)
    daemon = DaemonProcess(ph.home, port)
    try:
        set_chain(
            ph.home, confirmations=CONFIRMATIONS, poll_seconds=CHAIN_POLL_SECONDS, funding_timeout_seconds=300
        )
        clip = make_test_clip(workdir / "clip.mp4", seconds=1, width=160, height=120)
        start(daemon)
        async with NodeClient(daemon.url) as client:
            cid = (await client.put_blob(clip))["cid"]
            w = _World(ph, daemon, client, new_ed25519(), node_did(ph.home), cid)
            for n in range(count):
                variant = VARIANTS[(n + offset) % len(VARIANTS)]
                try:
                    if phase == "fund":
                        await _one_job(w, row, n, variant, None)
                    else:
                        await _one_job(w, row, n, None, variant)
                except (Stuck, NodeError) as exc:
                    row.fail("stuck", f"{variant}: {exc}")
                else:
                    row.good[variant] = row.good.get(variant, 0) + 1
    finally:
        daemon.stop()
        devnet.stop(ph.home)
    return row


@scenario(FUNDING, stated=10, short=1)
def run_funding(count: int, workdir: Path) -> Row:
    """Reorgs under the node's funding transaction: never funded while it is out, funded once after."""
    return asyncio.run(_run(FUNDING, count, workdir, "fund", 0))


@scenario(RELEASE, stated=10, short=1)
def run_release(count: int, workdir: Path) -> Row:
    """Reorgs under the node's release transaction: settled exactly once, the provider paid once."""
    # the short run (one iteration) takes the variant that a node without the re-send fix fails
    return asyncio.run(_run(RELEASE, count, workdir, "release", VARIANTS.index("dropped_after_confirmation")))
