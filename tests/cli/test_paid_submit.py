"""``hearth job submit --wallet`` and ``hearth job status`` on the paid path: a real devnet, a real node.

The CLI runs in a worker thread (``main`` runs its own event loop) against an in-process node whose
``[chain]`` points at anvil. The scheduler stays paused: funding happens before a job runs, and these
tests are about paying for a job, not running it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from web3 import Web3

from cli.main import main
from core.envelope import node_job_id
from payments import devnet
from payments.jwt import decode_unverified, sign_jwt
from payments.keys import Signer, new_ed25519, new_eth, save_key
from payments.receipts import Authorization, FundingTerms, authorization_signer
from requester.client import NodeClient
from tests.conftest import LiveNode, live, make_envelope, write_home
from tests.payments.paid import PaidHome, paid_envelope, paid_home, set_chain

INPUT = "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"


@dataclass
class Cli:
    """Runs ``hearth`` in-process against one node and hands back its exit code and output."""

    url: str
    capsys: pytest.CaptureFixture[str]

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()  # only this command's output
        code = await asyncio.to_thread(main, [*args, "--node", self.url])
        captured = self.capsys.readouterr()
        return code, captured.out, captured.err

    async def json(self, *args: str) -> tuple[int, Any]:
        code, out, _ = await self(*args, "--json")
        return code, json.loads(out)


@pytest.fixture
def ph(tmp_path: Path) -> Iterator[PaidHome]:
    home = paid_home(tmp_path / "home", chain={"funding_timeout_seconds": 60})
    try:
        yield home
    finally:
        devnet.stop(home.home)


@pytest.fixture
async def node(ph: PaidHome) -> AsyncIterator[LiveNode]:
    async with live(ph.home) as ln:
        yield ln


@pytest.fixture
def requester_key(tmp_path: Path) -> tuple[Signer, Path]:
    signer = new_ed25519()
    save_key(signer, tmp_path / "requester.key")
    return signer, tmp_path / "requester.key"


def wallet_file(ph: PaidHome, role: str) -> str:
    return next(a.key_file for a in ph.net.accounts if a.role == role)


def sent_txs(ph: PaidHome, address: str) -> int:
    """How many transactions ``address`` has sent (its nonce): 0 for a payer that paid no gas."""
    return ph.w3.eth.get_transaction_count(Web3.to_checksum_address(address))


def envelope_file(folder: Path, env: dict[str, Any], name: str | None = None) -> str:
    path = folder / f"{name or env['job_id']}.yaml"
    path.write_text(yaml.safe_dump(env))
    return str(path)


async def test_submit_with_a_wallet_funds_the_escrow_gasless_and_status_shows_the_fund_tx(
    node: LiveNode,
    ph: PaidHome,
    requester_key: tuple[Signer, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    requester, key = requester_key
    hearth = Cli(node.url, capsys)
    job_file = envelope_file(tmp_path, paid_envelope(ph, "cli-paid-1", INPUT))
    before = ph.balances()

    code, out, err = await hearth(
        "job", "submit", job_file, "--key", str(key), "--wallet", wallet_file(ph, "requester"), "--wait"
    )
    assert code == 0, out + err
    job = node_job_id(requester.did, "cli-paid-1")
    assert out.startswith("accepted\n") and f"job {job} (cli-paid-1)" in out
    assert ph.payer.address in out and "gasless (the node submits fundWithAuthorization)" in out

    async with NodeClient(node.url) as client:
        payment = (await client.status(job))["job"]["payment"]
    fund = payment["funding"]["tx"]
    assert payment["funding"]["state"] == "funded" and payment["funding"]["gasless"] is True
    assert fund["purpose"] == "fund" and fund["state"] == "confirmed" and fund["block_number"] > 0
    terms = payment["terms"]
    assert terms["escrow_job_id"] in out and f"{terms['amount_usdc']} USDC from {ph.payer.address}" in out
    assert f"fund tx   {fund['hash']}" in out  # --wait printed the hash as it appeared
    assert f"funding   funded by tx {fund['hash']} (confirmed in block {fund['block_number']}" in out
    # the node paid the gas; the payer never sent a transaction, and the escrow holds exactly the quote
    assert sent_txs(ph, ph.payer.address) == 0
    after = ph.balances()
    assert after["escrow"] - before["escrow"] == int(terms["amount"])
    assert before["payer"] - after["payer"] == int(terms["amount"])

    code, out, _ = await hearth("job", "status", job)
    assert code == 0
    assert "  payment\n" in out and f"escrow job  {terms['escrow_job_id']}" in out
    assert "funding     funded, gasless" in out
    fund_line = f"tx fund     confirmed {fund['hash']}  block {fund['block_number']}  gas {fund['gas_used']}"
    assert fund_line in out, out

    code, doc = await hearth.json("job", "status", job)  # --json stays the node's body
    assert code == 0 and doc["job"]["payment"] == payment and "jwt" in doc


async def test_submit_json_against_a_saved_quote_carries_the_authorization(
    node: LiveNode,
    ph: PaidHome,
    requester_key: tuple[Signer, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, key = requester_key
    hearth = Cli(node.url, capsys)
    job_file = envelope_file(tmp_path, paid_envelope(ph, "cli-paid-2", INPUT))
    quote_file = tmp_path / "quote.jwt"
    code, out, _ = await hearth("job", "quote", job_file, "--key", str(key), "--save-quote", str(quote_file))
    assert code == 0 and out.startswith("quote ")

    started = int(time.time())
    code, doc = await hearth.json(
        "job", "submit", job_file, "--key", str(key), "--quote", str(quote_file),
        "--wallet", wallet_file(ph, "requester"), "--valid-seconds", "600", "--wait",
    )  # fmt: skip
    assert code == 0, doc
    assert doc["accepted_now"] is True and doc["job"]["state"] == "accepted"
    quoted = decode_unverified(quote_file.read_text())[1]["quote"]["funding_terms"]
    assert doc["funding_terms"] == quoted
    terms, auth = FundingTerms.from_json(doc["funding_terms"]), Authorization.from_json(doc["authorization"])
    assert auth.payer == ph.payer.address and authorization_signer(terms, auth) == ph.payer.address
    assert started + 600 <= auth.valid_before <= int(time.time()) + 600 and auth.valid_before < terms.deadline
    funding = doc["status"]["job"]["payment"]["funding"]
    assert funding["state"] == "funded" and funding["tx"]["state"] == "confirmed"
    assert sent_txs(ph, ph.payer.address) == 0


async def test_a_wallet_that_is_not_the_payer_is_refused_before_anything_is_sent(
    node: LiveNode,
    ph: PaidHome,
    requester_key: tuple[Signer, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    requester, key = requester_key
    hearth = Cli(node.url, capsys)
    job_file = envelope_file(tmp_path, paid_envelope(ph, "cli-paid-3", INPUT))

    not_the_payer = ("job", "submit", job_file, "--key", str(key), "--wallet", wallet_file(ph, "validator"))
    code, out, err = await hearth(*not_the_payer)
    assert code == 2 and out == ""
    assert "error [funding/wallet_not_payer]" in err and ph.payer.address in err

    code, doc = await hearth.json(*not_the_payer)
    assert code == 2
    assert doc["error"]["code"] == "wallet_not_payer" and doc["error"]["domain"] == "funding"
    assert doc["error"]["details"] == {"wallet": ph.validator.address, "payer": ph.payer.address}

    code, doc = await hearth.json("job", "submit", job_file, "--key", str(key), "--wallet", str(key))
    assert code == 2 and doc["error"]["code"] == "wallet_not_ethereum"

    # neither quoted nor submitted: the node has never heard of the job
    assert node.node.journal.get(node_job_id(requester.did, "cli-paid-3")) is None
    assert sent_txs(ph, ph.node_wallet.address) == 0


async def test_quotes_whose_terms_the_envelope_did_not_agree_to_are_not_signed(
    node: LiveNode,
    ph: PaidHome,
    requester_key: tuple[Signer, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    requester, key = requester_key
    hearth = Cli(node.url, capsys)
    job_file = envelope_file(tmp_path, paid_envelope(ph, "cli-paid-4", INPUT, max_price="1.00"))
    quote_file = tmp_path / "quote.jwt"
    code, _, _ = await hearth("job", "quote", job_file, "--key", str(key), "--save-quote", str(quote_file))
    assert code == 0
    job = node_job_id(requester.did, "cli-paid-4")

    # a quote genuinely signed by the node, asking for more than max_price and another payer
    claims = decode_unverified(quote_file.read_text())[1]
    claims["quote"]["funding_terms"].update(amount="1000001", payer=ph.validator.address)
    forged = tmp_path / "greedy.jwt"
    forged.write_text(sign_jwt(node.node.signer, claims))
    wallet = wallet_file(ph, "requester")
    code, doc = await hearth.json(
        "job", "submit", job_file, "--key", str(key), "--quote", str(forged), "--wallet", wallet
    )
    assert code == 1 and doc["error"]["code"] == "funding_terms_mismatch", doc
    fields = {m["field"]: m for m in doc["error"]["details"]["mismatches"]}
    assert set(fields) == {"payer", "amount"} and fields["amount"]["quote"] == "1.000001"

    # the same job_id with another max_price is another envelope: its quote is refused as local input
    other = paid_envelope(ph, "cli-paid-4", INPUT, max_price="2.00")
    other_file = envelope_file(tmp_path, other, "cli-paid-4-other")
    code, doc = await hearth.json(
        "job", "submit", other_file, "--key", str(key), "--quote", str(quote_file), "--wallet", wallet
    )
    assert code == 2 and doc["error"]["code"] == "quote_for_another_envelope"

    record = node.node.journal.get(job)
    assert record is not None and record.state == "priced"  # quoted, never accepted
    assert node.node.journal.payment(job) is None


async def test_wait_gives_up_at_the_funding_wait_when_nothing_can_fund_the_job(
    ph: PaidHome,
    requester_key: tuple[Signer, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requester, key = requester_key
    set_chain(ph.home, funding_timeout_seconds=1)
    monkeypatch.setattr("requester.paid.FUNDING_WAIT_GRACE_SECONDS", 1.0)
    job_file = envelope_file(tmp_path, paid_envelope(ph, "cli-paid-5", INPUT))
    async with live(ph.home) as node:
        devnet.stop(ph.home)  # the chain is gone: the node accepts the authorization but cannot send it
        started = time.monotonic()
        code, out, err = await Cli(node.url, capsys)(
            "job", "submit", job_file, "--key", str(key), "--wallet", wallet_file(ph, "requester"), "--wait"
        )
        assert time.monotonic() - started < 30
        job = node_job_id(requester.did, "cli-paid-5")
        assert code == 1, out + err
        assert out.startswith("accepted\n") and "waiting for the escrow to be funded" in out
        assert f"funding   still awaiting after the wait; see `hearth job status {job}`" in out
        payment = node.node.settlement.view(job) if node.node.settlement else None
        assert payment is not None and payment["funding"]["state"] == "awaiting" and payment["txs"] == []


async def test_wallet_against_a_node_without_a_chain_fails_clearly(
    tmp_path: Path, requester_key: tuple[Signer, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    requester, key = requester_key
    payer = new_eth(31337)
    save_key(payer, tmp_path / "payer.key")
    env = make_envelope("cli-unpaid-1")
    env["payment"]["payer"] = payer.address
    job_file = envelope_file(tmp_path, env)
    async with live(write_home(tmp_path / "plain")) as plain:
        hearth = Cli(plain.url, capsys)
        code, out, err = await hearth(
            "job", "submit", job_file, "--key", str(key), "--wallet", str(tmp_path / "payer.key")
        )
        assert code == 1 and out == ""
        assert "error [funding/payments_not_configured]" in err and "submit without --wallet" in err
        code, doc = await hearth.json(
            "job", "submit", job_file, "--key", str(key), "--wallet", str(tmp_path / "payer.key")
        )
        assert code == 1 and doc["error"]["code"] == "payments_not_configured"
        record = plain.node.journal.get(node_job_id(requester.did, "cli-unpaid-1"))
        assert record is not None and record.state == "priced"  # quoted, never accepted

        code, out, _ = await hearth("job", "submit", job_file, "--key", str(key), "--wait")
        assert code == 2 and out == ""  # --wait is about funding: it needs --wallet
