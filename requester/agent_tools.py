"""The requester's side as an agent's tools (DESIGN §12): what ``hearth mcp`` serves, without the protocol.

:class:`AgentTools` holds one requester home (``HOME/requester``: the idempotency keys, routing decisions
and budgets of :mod:`requester.home`; the ``[agent]`` of requester.toml: the agent's key, its grant, the
market) and answers each tool with a JSON object, or raises a :class:`~core.errors.HearthError` (the
server turns it into a tool result with ``isError`` and the error shape of docs/protocol.md).

- Where jobs go: with a fixed node (``--node URL``) to it; else through the market (the registry of
  ``[agent] registry``, or node.toml's ``[market] registry``): discovery, quotes, the winner.
- ``submit_job`` goes through :func:`requester.home_route.route_once`: the same ``idempotency_key``
  returns the recorded job (no quote, no spend), the amount is reserved against the budgets before
  anything is signed, and with ``[agent] grant`` the agent's ``Spend`` is signed for the accepting node only.
- ``put_input`` uploads to the fixed node; with the market, to every provider discovery lists (the
  content has one CID everywhere, and any of them may win a job that reads it). ``put_input`` and
  ``cancel_job`` keep their answers by idempotency key in ``HOME/requester/agent.sqlite3``, beside the
  jobs the tools submitted and where they went (``job_status`` and the rest ask that node).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.config import ChainSection, load_config, resolve_path
from core.envelope import VllmBatchEnvelope, parse_envelope
from core.errors import ConfigError, ConflictError, HearthError, NotFoundError, RequestError
from core.lifecycle import STREAM_END_STATES
from payments.grants import Grant
from payments.keys import EthSigner
from requester.budgets import (
    DEFAULT_WORKFLOW,
    Budgets,
    RequesterConfig,
    check_workflow,
    load_requester_config,
)
from requester.client import NodeClient, sign_request
from requester.home import RequesterHome
from requester.home import default_path as home_path
from requester.market import Provider, fits
from requester.paid import agent_key
from requester.routing_decision import Strategy

WAIT_POLL_SECONDS = 0.5
MAX_WAIT_SECONDS = 3600

# -- the tools' inputs (their JSON schemas are what MCP clients see) ---------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FindProviders(_In):
    """Providers that offer ``kind`` (and ``model``), with their prices and reputation."""

    kind: str = Field(description="job kind: ffmpeg_transcode or vllm_batch", min_length=1, max_length=64)
    model: str | None = Field(default=None, description="vllm_batch: the model", max_length=256)


class QuoteJob(_In):
    """The providers' quotes for an envelope, cheapest first (nothing is accepted or paid)."""

    envelope: dict[str, Any] = Field(description="the job envelope (docs/protocol.md)")


class SubmitJob(_In):
    """Route the job, fund it from the agent's grant, within the budgets; the same key, the same job."""

    envelope: dict[str, Any] = Field(description="the job envelope (docs/protocol.md)")
    max_price: str | None = Field(
        default=None, description="USDC: the most this job may cost (replaces the envelope's max_price)"
    )
    workflow: str = Field(default=DEFAULT_WORKFLOW, description="the budget the job is spent under")
    idempotency_key: str = Field(min_length=1, max_length=200, description="the same key, the same job")


class JobRef(_In):
    job: str = Field(min_length=1, max_length=200, description="the job id (hj_…) submit_job returned")


class WaitJob(JobRef):
    timeout_seconds: float = Field(default=300, gt=0, le=MAX_WAIT_SECONDS)


class CancelJob(JobRef):
    idempotency_key: str = Field(min_length=1, max_length=200)


class PutInput(_In):
    path: str = Field(min_length=1, description="a local file to upload")
    idempotency_key: str = Field(min_length=1, max_length=200)


class BudgetQuery(_In):
    workflow: str | None = Field(default=None, description="also the budget of this workflow")


# -- the memo of put_input / cancel_job, and where each job went ---------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, tool TEXT NOT NULL, args TEXT NOT NULL,
                                  result TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (job TEXT PRIMARY KEY, endpoint TEXT NOT NULL, node TEXT NOT NULL,
                                 key TEXT NOT NULL);
"""


class _Memo:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(_SCHEMA)

    def recalled(self, key: str, tool: str, args: dict[str, Any]) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT tool, args, result FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if row[0] != tool or row[1] != _digest(args):
            raise ConflictError(
                "idempotency_key_conflict",
                f"idempotency key {key!r} was used for another call ({row[0]})",
                details={"key": key, "tool": row[0]},
            )
        result: dict[str, Any] = json.loads(row[2])
        return {**result, "replayed": True}

    def keep(self, key: str, tool: str, args: dict[str, Any], result: dict[str, Any]) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO calls VALUES (?, ?, ?, ?, ?)",
            (key, tool, _digest(args), json.dumps(result), time.time()),
        )

    def job_at(self, job: str, endpoint: str, node: str, key: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?)", (job, endpoint, node, key))

    def endpoint(self, job: str) -> str | None:
        row = self.conn.execute("SELECT endpoint FROM jobs WHERE job = ?", (job,)).fetchone()
        return None if row is None else str(row[0])


def _digest(args: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()


# -- the tools -----------------------------------------------------------------------------------------


@dataclass
class Where:
    """Where jobs go: a fixed node, or a registry on a chain."""

    node: str | None
    registry: str | None
    rpc_url: str | None
    allow_private: bool


class AgentTools:
    """One requester home's tools: ``AgentTools.open(home, node=...)``, a method a tool, then ``close()``."""

    def __init__(
        self,
        home: Path,
        cfg: RequesterConfig,
        agent: EthSigner,
        where: Where,
        chain: ChainSection | None,
    ) -> None:
        self.home = home
        self.cfg = cfg
        self.agent = agent
        self.where = where
        self.chain = chain
        self.requester_home = RequesterHome.open(home_path(home), budgets=Budgets.from_config(cfg))
        self.memo = _Memo(home / "requester" / "agent.sqlite3")

    @classmethod
    def open(cls, home: Path, *, node: str | None = None) -> AgentTools:
        """The tools of ``home``: its requester.toml ``[agent]``, and node.toml's chain and market."""
        cfg = load_requester_config(home)
        a = cfg.agent
        if a.key_file is None:
            raise ConfigError(
                "agent_key_missing",
                f"{home}/requester/requester.toml names no [agent] key_file (the agent's Ethereum key)",
            )
        agent = agent_key(resolve_path(home / "requester", a.key_file))
        node_cfg = load_config(home)
        registry = a.registry or node_cfg.market.registry
        rpc = a.rpc_url or (node_cfg.chain.rpc_url if node_cfg.chain is not None else None)
        if node is None and (registry is None or rpc is None):
            raise ConfigError(
                "no_market",
                "give --node URL, or a registry and an RPC ([agent] registry and rpc_url in requester.toml, "
                "or node.toml's [market] registry and [chain] rpc_url)",
            )
        where = Where(node, None if node else registry, rpc, a.allow_private_endpoints)
        return cls(home, cfg, agent, where, node_cfg.chain)

    def close(self) -> None:
        self.requester_home.close()
        self.memo.conn.close()

    # where to ask

    async def providers(self, kind: str | None, model: str | None, *, chain_id: int | None = None,
                        escrow: str | None = None) -> list[Provider]:  # fmt: skip
        """The fixed node, or the providers the registry lists that offer ``kind`` (and ``model``)."""
        if self.where.node is not None:
            async with NodeClient(self.where.node) as c:
                offer = await c.capacity()
            return [
                Provider(str(offer.get("payout_address") or ""), str(offer["node"]), self.where.node, offer)
            ]
        from web3 import AsyncWeb3
        from web3.providers import AsyncHTTPProvider

        from payments.registry_chain import RegistryChain
        from requester.market import discover

        assert self.where.registry is not None and self.where.rpc_url is not None
        w3: AsyncWeb3[Any] = AsyncWeb3(AsyncHTTPProvider(self.where.rpc_url))
        try:
            found = await discover(
                RegistryChain(w3, self.where.registry, rpc_url=self.where.rpc_url),
                kind=kind,
                model=model,
                chain_id=chain_id if chain_id is not None else (self.chain.chain_id if self.chain else None),
                escrow=escrow if escrow is not None else (self.chain.escrow if self.chain else None),
                allow_private=self.where.allow_private,
            )
        finally:
            await w3.provider.disconnect()
        return found.providers

    def _endpoint(self, job: str) -> str:
        endpoint = self.memo.endpoint(job) or self.where.node
        if endpoint is None:
            raise NotFoundError(
                "job_not_found", f"no job {job} was submitted through this home", details={"job": job}
            )
        return endpoint

    # the tools

    async def find_providers(self, args: FindProviders) -> dict[str, Any]:
        found = await self.providers(args.kind, args.model)
        return {
            "providers": [
                {
                    "did": p.did,
                    "endpoint": p.endpoint,
                    "wallet": p.wallet,
                    "kinds": p.offer.get("kinds"),
                    "models": p.offer.get("models"),
                    "prices": p.offer.get("prices"),
                    "resources": p.offer.get("resources"),
                    "reputation": None if p.reputation is None else p.reputation.to_json(),
                }
                for p in found
            ]
        }

    async def quote_job(self, args: QuoteJob) -> dict[str, Any]:
        env = parse_envelope(args.envelope)
        model = env.output_spec.model if isinstance(env, VllmBatchEnvelope) else None
        found = await self.providers(
            env.kind, model, chain_id=env.payment.chain_id, escrow=env.payment.escrow
        )
        found = [p for p in found if fits(p.offer, env) is None]

        async def one(p: Provider) -> dict[str, Any]:
            try:
                async with NodeClient(p.endpoint) as c:
                    body = await c.quote(sign_request(self.agent, p.did, {"job": args.envelope}))
            except HearthError as exc:
                return {"did": p.did, "endpoint": p.endpoint, "error": exc.to_dict()["error"]}
            q = body.get("quote", {})
            return {"did": p.did, "endpoint": p.endpoint, "price": q.get("price"), "expires_at": q.get("exp"),
                    "funding_terms": q.get("funding_terms")}  # fmt: skip

        quotes = await asyncio.gather(*(one(p) for p in found))
        quotes.sort(key=lambda q: (q.get("price") is None, Decimal(str(q.get("price") or 0))))
        return {"job_id": env.job_id, "quotes": quotes}

    async def submit_job(self, args: SubmitJob) -> dict[str, Any]:
        from requester.home_route import route_once
        from requester.routing import GrantFunder

        _workflow(args.workflow)
        doc = dict(args.envelope)
        if args.max_price is not None:
            doc["payment"] = {**dict(doc.get("payment") or {}), "max_price": args.max_price}
        env = parse_envelope(doc)
        model = env.output_spec.model if isinstance(env, VllmBatchEnvelope) else None
        grant = self.cfg.agent.grant
        funder = None if grant is None else GrantFunder(grant, self.agent)

        async def discover() -> list[Provider]:
            return await self.providers(
                env.kind, model, chain_id=env.payment.chain_id, escrow=env.payment.escrow
            )

        home = self.requester_home
        record = home.record(args.idempotency_key)
        if grant is not None and (record is None or record.state != "submitted"):
            await self._grant_open(grant)  # a revoked, expired or spent grant: refused before routing
        routed = await route_once(
            home, args.idempotency_key, env, self.agent, discover, workflow=args.workflow,
            grant=funder, strategy=Strategy("cheapest"),
        )  # fmt: skip
        decision = routed.decision
        job = decision.get("job") if isinstance(decision.get("job"), dict) else None
        left = home.left(args.workflow)
        if job is not None and job.get("endpoint"):  # where it went, even when its funding failed
            self.memo.job_at(str(job["id"]), str(job["endpoint"]), str(job["node"]), args.idempotency_key)
        if routed.outcome != "submitted" or job is None:
            err = decision.get("error") or {
                "code": routed.outcome,
                "domain": "request",
                "message": "not submitted",
            }
            details = {"left": left, **dict(err.get("details") or {}), "key": args.idempotency_key}
            raise HearthError(
                str(err.get("code")), str(err.get("message")), details=details,
                retryable=bool(err.get("retryable")), domain=err.get("domain", "request"),
            )  # fmt: skip
        funding = job.get("funding") or {}
        terms = funding.get("terms") or {}
        return {
            "job": job["id"],
            "job_id": job["job_id"],
            "node": job["node"],
            "endpoint": job["endpoint"],
            "state": job.get("state"),
            "replayed": routed.replayed,
            "idempotency_key": args.idempotency_key,
            "amount_usdc": terms.get("amount_usdc"),
            "grant": None if "grant" not in funding else str(funding["grant"]["grant"]),
            "reason": decision.get("reason"),
            "budget": left,
        }

    async def job_status(self, args: JobRef) -> dict[str, Any]:
        async with NodeClient(self._endpoint(args.job)) as c:
            view: dict[str, Any] = (await c.status(args.job))["job"]
        return {"job": view}

    async def wait_job(self, args: WaitJob) -> dict[str, Any]:
        """Until the job completes, fails or ends (or ``timeout_seconds``): ``done`` says which."""
        endpoint = self._endpoint(args.job)
        give_up = time.monotonic() + args.timeout_seconds
        async with NodeClient(endpoint) as c:
            while True:
                view: dict[str, Any] = (await c.status(args.job))["job"]
                if view["state"] in STREAM_END_STATES or time.monotonic() >= give_up:
                    return {"done": view["state"] in STREAM_END_STATES, "state": view["state"], "job": view}
                await asyncio.sleep(WAIT_POLL_SECONDS)

    async def job_result(self, args: JobRef) -> dict[str, Any]:
        endpoint = self._endpoint(args.job)
        async with NodeClient(endpoint) as c:
            result: dict[str, Any] = (await c.result(args.job))["result"]
        cid = result.get("artifact_cid")
        return {
            "job": args.job,
            "artifact_cid": cid,
            "artifact_uri": result.get("artifact_uri"),
            "gateway_url": None if cid is None else f"{endpoint.rstrip('/')}/ipfs/{cid}",
            "checks": result.get("checks"),
            "cost": result.get("cost"),
            "currency": result.get("currency"),
            "result": result,
        }

    async def cancel_job(self, args: CancelJob) -> dict[str, Any]:
        call = {"job": args.job}
        done = self.memo.recalled(args.idempotency_key, "cancel_job", call)
        if done is not None:
            return done
        async with NodeClient(self._endpoint(args.job)) as c:
            node_did = await c.node_did()
            body = await c.cancel(args.job, sign_request(self.agent, node_did, {"cancel": args.job}))
        result = {"job": args.job, "state": body["job"]["state"], "replayed": False}
        self.memo.keep(args.idempotency_key, "cancel_job", call, result)
        return result

    async def put_input(self, args: PutInput) -> dict[str, Any]:
        path, digest, size = await asyncio.to_thread(_local_file, args.path)
        call = {"path": str(path), "sha256": digest}
        done = self.memo.recalled(args.idempotency_key, "put_input", call)
        if done is not None:
            return done
        providers = await self.providers(None, None)
        stored, failed, cid = [], [], None
        for p in providers:
            try:
                async with NodeClient(p.endpoint) as c:
                    body = await c.put_blob(path)
            except HearthError as exc:
                failed.append({"did": p.did, "endpoint": p.endpoint, "error": exc.to_dict()["error"]})
                continue
            cid = str(body["cid"])
            stored.append({"did": p.did, "endpoint": p.endpoint})
        if cid is None:
            raise HearthError(
                "input_not_stored", f"no provider took {path.name}", details={"failed": failed},
                retryable=True, domain="storage",
            )  # fmt: skip
        result = {"cid": cid, "uri": f"ipfs://{cid}", "size": size, "stored_at": stored,
                  "failed": failed, "replayed": False}  # fmt: skip
        self.memo.keep(args.idempotency_key, "put_input", call, result)
        return result

    async def _read_grant(self, grant_id: int) -> Grant | None:
        """The grant as the chain reads it now (None without a chain in node.toml)."""
        if self.chain is None:
            return None
        from payments.chain import Chain
        from payments.grant_terms import read_grant

        chain = Chain(self.chain, self.agent)
        try:
            return await read_grant(chain, grant_id)
        finally:
            await chain.close()

    async def _grant_open(self, grant_id: int) -> None:
        """Refuse (as the node would, with what is left) a grant that is revoked, expired or spent."""
        from payments.grant_terms import check_grant_limits

        grant = await self._read_grant(grant_id)
        if grant is not None:
            check_grant_limits(grant, 1, time.time())

    async def budget(self, args: BudgetQuery) -> dict[str, Any]:
        if args.workflow is not None:
            _workflow(args.workflow)
        local = self.requester_home.left(args.workflow)
        grant_id = self.cfg.agent.grant
        grant = None if grant_id is None else await self._read_grant(grant_id)
        return {
            "agent": self.agent.address,
            "grant": None if grant is None else grant.to_json(),
            "local": local,
        }


def _workflow(name: str) -> None:
    try:
        check_workflow(name)
    except ValueError as exc:
        raise RequestError("invalid_workflow", str(exc), details={"workflow": name}) from None


def _local_file(name: str) -> tuple[Path, str, int]:
    """The file ``name`` names (resolved), its sha256 and size; ``os_error`` if there is none."""
    path = Path(name).expanduser().resolve()
    if not path.is_file():
        raise HearthError("os_error", f"no file at {path}", details={"path": str(path)}, domain="request")
    return path, _sha256(path), path.stat().st_size


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


Tool = Callable[[Any], Awaitable[dict[str, Any]]]

# name -> (input model, description); the server calls AgentTools.<name>
TOOLS: dict[str, tuple[type[BaseModel], str]] = {
    "find_providers": (
        FindProviders,
        "Providers offering a job kind (and model), with prices and reputation.",
    ),
    "quote_job": (
        QuoteJob,
        "Every fitting provider's quote for an envelope, cheapest first; nothing is paid.",
    ),
    "submit_job": (
        SubmitJob,
        "Route the job to the best quote and fund it from the agent's grant, within the local budgets. The "
        "same idempotency_key returns the same job and never spends twice.",
    ),
    "job_status": (JobRef, "A submitted job's state, payment and progress."),
    "wait_job": (WaitJob, "Wait until the job completes, fails or ends, or timeout_seconds pass."),
    "job_result": (JobRef, "A completed job's artifact CID, checks, cost and gateway URL."),
    "cancel_job": (CancelJob, "Cancel a job (signed by the agent); the same key answers the same."),
    "put_input": (
        PutInput,
        "Upload a local file to the node (with the market: to every listed provider); returns its CID.",
    ),
    "budget": (BudgetQuery, "What is left: the grant on chain this period, and the local budgets."),
}

__all__ = ["TOOLS", "AgentTools", "Where"]
