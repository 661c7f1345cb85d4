"""Helpers for tests of the paid path: a node home on a real devnet (anvil), wallets, and the market round.

Everything is real: anvil from npm, the committed HearthEscrow and TestUSDC, the node's HTTP API, Docker
transcodes. The requester signs DID-JWTs with a did:key and pays from its devnet wallet; the validator
signs receipts with its devnet wallet.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from web3 import Web3

from core.config import ChainSection, load_config
from payments import devnet
from payments.escrow_build import load_artifact
from payments.keys import EthSigner, Signer, load_key
from payments.receipts import (
    FundingTerms,
    Receipt,
    result_digest,
    sign_authorization,
    sign_receipt,
    usdc_units,
)
from requester.client import NodeClient, sign_request
from tests.conftest import make_envelope, write_home


@dataclass
class PaidHome:
    """A node home whose ``[chain]`` points at a devnet anvil, with the devnet's wallets."""

    home: Path
    net: devnet.Devnet
    payer: EthSigner
    validator: EthSigner
    node_wallet: EthSigner
    w3: Web3

    def token_balance(self, address: str) -> int:
        token = self.w3.eth.contract(address=self.net.token, abi=load_artifact("TestUSDC").abi)
        return int(token.functions.balanceOf(address).call())

    def balances(self) -> dict[str, int]:
        return {
            "payer": self.token_balance(self.payer.address),
            "provider": self.token_balance(self.node_wallet.address),
            "escrow": self.token_balance(self.net.escrow),
        }

    def escrow_job(self, escrow_job_id: str) -> tuple[int, bytes]:
        """``HearthEscrow.jobState``: the job's status and the hash of the terms it was funded with."""
        escrow = self.w3.eth.contract(address=self.net.escrow, abi=load_artifact("HearthEscrow").abi)
        status, terms_hash = escrow.functions.jobState(bytes.fromhex(escrow_job_id[2:])).call()
        return int(status), bytes(terms_hash)

    def funded(self, escrow_job_id: str) -> dict[str, Any] | None:
        """The terms of the job's ``Funded`` event (payer, provider, validator, amount, deadline); None if
        the job was never funded."""
        escrow = self.w3.eth.contract(address=self.net.escrow, abi=load_artifact("HearthEscrow").abi)
        logs = escrow.events.Funded().get_logs(
            from_block=0, argument_filters={"jobId": bytes.fromhex(escrow_job_id[2:])}
        )
        assert len(logs) <= 1, logs
        return {k: v for k, v in logs[0]["args"].items() if k != "jobId"} if logs else None

    def released_events(self, escrow_job_id: str) -> int:
        escrow = self.w3.eth.contract(address=self.net.escrow, abi=load_artifact("HearthEscrow").abi)
        logs = escrow.events.Released().get_logs(
            from_block=0, argument_filters={"jobId": bytes.fromhex(escrow_job_id[2:])}
        )
        return len(logs)


def paid_home(
    home: Path, config: dict[str, Any] | None = None, *, chain: dict[str, Any] | None = None
) -> PaidHome:
    """``write_home`` plus a devnet: anvil on a free port, contracts deployed, ``[chain]`` written."""
    from tests.conftest import free_port

    write_home(home, config)
    net = devnet.up(home, port=free_port())
    if chain:
        set_chain(home, **chain)
    keys = {a.role: load_key(a.key_file) for a in net.accounts}
    w3 = Web3(Web3.HTTPProvider(net.rpc_url, request_kwargs={"timeout": 30}))
    return PaidHome(
        home=home,
        net=net,
        payer=_eth(keys["requester"]),
        validator=_eth(keys["validator"]),
        node_wallet=_eth(keys["node"]),
        w3=w3,
    )


def set_chain(home: Path, **knobs: Any) -> None:
    """Change ``[chain]`` knobs of ``home``'s node.toml (e.g. ``funding_timeout_seconds``)."""
    current = load_config(home).chain
    assert current is not None
    devnet.set_chain_config(home, ChainSection.model_validate({**current.model_dump(), **knobs}))


def _eth(signer: Signer) -> EthSigner:
    assert isinstance(signer, EthSigner)
    return signer


def paid_envelope(ph: PaidHome, job_id: str, input_uri: str, **overrides: Any) -> dict[str, Any]:
    env = make_envelope(
        job_id,
        input_uri=input_uri,
        output_spec={"format": "mp4", "resolution": "360p", "codec": "h264", "audio_codec": "aac"},
        validation={"min_duration_seconds": 1, "required_streams": ["video", "audio"]},
        **overrides,
    )
    env["payment"] = {
        **env["payment"],
        "escrow": ph.net.escrow,
        "payer": ph.payer.address,
        "validator": ph.validator.did,
    }
    return env


async def quote_and_fund(
    client: NodeClient, node_did: str, requester: Signer, ph: PaidHome, env: dict[str, Any]
) -> tuple[str, FundingTerms]:
    """Quote, sign the EIP-3009 authorization for its terms, submit with it; the node's job id and terms."""
    quote = await client.quote(sign_request(requester, node_did, {"job": env}))
    terms = FundingTerms.from_json(quote["quote"]["funding_terms"])
    auth = sign_authorization(ph.payer, terms)
    body = await client.submit(sign_request(requester, node_did, {"job": env}), quote["jwt"], auth.to_json())
    return str(body["job"]["id"]), terms


async def receipt_for(
    client: NodeClient,
    job: str,
    terms: FundingTerms,
    validator: EthSigner,
    *,
    passed: bool = True,
    amount: int | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """A validator's receipt body for ``job``'s result (paying its cost unless told otherwise)."""
    result = (await client.result(job))["result"]
    fields: dict[str, Any] = {
        "job": job,
        "chain_id": terms.chain_id,
        "escrow": terms.escrow,
        "escrow_job_id": terms.job_id,
        "result_digest": result_digest(job, result),
        "passed": passed,
        "amount": (usdc_units(result["cost"]) if amount is None else amount) if passed else 0,
        "provider": terms.provider,
    }
    fields.update(changes)
    receipt = Receipt(**fields)
    return {"receipt": receipt.to_json(), "signature": "0x" + sign_receipt(validator, receipt).hex()}


async def wait_for(client: NodeClient, job: str, states: set[str], limit: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        view: dict[str, Any] = (await client.status(job))["job"]
        if view["state"] in states:
            return view
        assert time.monotonic() < deadline, f"job {job} stuck in {view['state']}: {view.get('payment')}"
        await asyncio.sleep(0.1)


async def open_grant(
    ph: PaidHome,
    agent: EthSigner,
    *,
    per_job: int,
    per_period: int,
    period_seconds: int = 86_400,
    expires_in: int = 30 * 86_400,
    permit: bool = False,
) -> int:
    """The devnet payer opens a spending grant for ``agent`` (as ``hearth grant open`` does); its id."""
    from payments.grant_owner import GrantOwner, GrantTerms

    cfg = load_config(ph.home).chain
    assert cfg is not None
    owner = GrantOwner(cfg, ph.payer)
    terms = GrantTerms(
        agent=agent.address,
        per_job_max=per_job,
        period_max=per_period,
        period_seconds=period_seconds,
        expiry=int(time.time()) + expires_in,
    )
    try:
        opened = await owner.open(terms, permit=permit)
    finally:
        await owner.close()
    return int(opened["grant"]["grant"])


async def quote_for_grant(
    client: NodeClient, node_did: str, agent: EthSigner, env: dict[str, Any]
) -> tuple[str, FundingTerms]:
    """The agent asks for a quote; the quote JWT and its escrow terms."""
    quote = await client.quote(sign_request(agent, node_did, {"job": env}))
    return str(quote["jwt"]), FundingTerms.from_json(quote["quote"]["funding_terms"])


def grant_spend(agent: EthSigner, grant_id: int, terms: FundingTerms) -> dict[str, Any]:
    """``agent``'s signed spend from ``grant_id`` for exactly ``terms``, as a submission's ``funding``."""
    from payments.grants import Spend, sign_spend

    spend = Spend.for_terms(grant_id, terms)
    return sign_spend(agent, chain_id=terms.chain_id, escrow=terms.escrow, spend=spend).to_json()


def grant_events(ph: PaidHome, name: str, **filters: Any) -> list[Any]:
    """The escrow's ``name`` events (GrantSpent, GrantRevoked, Funded ...) matching ``filters``."""
    escrow = ph.w3.eth.contract(
        address=Web3.to_checksum_address(ph.net.escrow), abi=load_artifact("HearthEscrow").abi
    )
    return list(getattr(escrow.events, name)().get_logs(from_block=0, argument_filters=filters))


def grant_view(ph: PaidHome, grant_id: int) -> tuple[Any, ...]:
    escrow = ph.w3.eth.contract(
        address=Web3.to_checksum_address(ph.net.escrow), abi=load_artifact("HearthEscrow").abi
    )
    return tuple(escrow.functions.grantOf(grant_id).call())
