"""``hearth job submit ENVELOPE --market``: find providers on the registry, quote with every one that fits,
submit to the winner (:mod:`requester.market`, then :mod:`requester.routing`) and say why it won.

The registry and the RPC come from ``--registry``/``--rpc``, else from --home's node.toml (``[market]
registry``, ``[chain] rpc_url``). With ``--wallet`` the job is paid for (an authorization signed for the
node that accepted it, only); with ``--grant ID --agent-key K`` it is paid from a spending grant (the agent
requests the job and signs a Spend for the accepting node's terms, only); ``--wait`` then follows the escrow
funding there.

The requester home under --home (:mod:`requester.home`, budgets in ``HOME/requester/requester.toml``) makes
it idempotent and bounded: ``--idempotency-key`` (default: the node's id of the job) returns the recorded job
without quoting or spending again, and the quote's amount is reserved against ``--workflow``'s and the
day's budget before anything is signed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.common import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, Out, read_envelope, usage
from cli.market import connect, where
from core import defaults as d

if TYPE_CHECKING:  # web3, eth-account and the market stack load only when --market is used (hearth run
    # builds this parser on every start: tests/node/test_startup_imports.py)
    from web3 import AsyncWeb3

    from core.envelope import Envelope
    from requester.home_route import Routed
    from requester.market import Discovery
    from requester.reputation import Reputation
    from requester.routing_decision import RoutingDecision


def add_market_options(p: argparse.ArgumentParser) -> None:
    """The options of ``job submit`` that route the job through the market."""
    p.add_argument(
        "--market",
        action="store_true",
        help="route the job: discover providers on the registry, quote with each that fits, submit to "
        "the winner (no --node)",
    )
    p.add_argument(
        "--strategy",
        choices=d.ROUTING_STRATEGIES,
        default="cheapest",
        help="with --market (default cheapest)",
    )
    p.add_argument(
        "--min-settled",
        type=int,
        default=d.DEFAULT_ROUTING_MIN_SETTLED,
        help="--strategy reputation: settled jobs a provider needs "
        f"(default {d.DEFAULT_ROUTING_MIN_SETTLED})",
    )
    p.add_argument(
        "--max-failure-rate",
        type=float,
        default=d.DEFAULT_ROUTING_MAX_FAILURE_RATE,
        help="--strategy reputation: highest refunded share of settled jobs "
        f"(default {d.DEFAULT_ROUTING_MAX_FAILURE_RATE})",
    )
    p.add_argument("--registry", help="HearthRegistry address (default: --home's [market] registry)")
    p.add_argument("--rpc", help="the chain's RPC URL (default: --home's [chain] rpc_url)")
    p.add_argument(
        "--allow-private-endpoints",
        action="store_true",
        help="accept providers at private or loopback addresses (a local devnet)",
    )
    p.add_argument(
        "--quote-timeout",
        type=float,
        default=d.DEFAULT_ROUTING_QUOTE_TIMEOUT_SECONDS,
        help=f"seconds each provider has to quote (default {d.DEFAULT_ROUTING_QUOTE_TIMEOUT_SECONDS:g})",
    )
    p.add_argument(
        "--idempotency-key",
        help="with --market: the same key returns the same job, never quoted or paid again (default: the "
        "node's id of the job, from --key's DID and the envelope's job_id)",
    )
    p.add_argument(
        "--workflow",
        default=d.DEFAULT_REQUESTER_WORKFLOW,
        help="with --market: the budget of HOME/requester/requester.toml [budgets.workflows] the job is "
        f"spent under (default {d.DEFAULT_REQUESTER_WORKFLOW!r})",
    )


async def _reputation(args: argparse.Namespace, w3: AsyncWeb3[Any], env: Envelope) -> dict[str, Reputation]:
    """Every provider's record on the envelope's escrow, the cache under --home brought up to date."""
    from requester.reputation import ReputationCache, default_path

    path = default_path(args.home)
    path.parent.mkdir(parents=True, exist_ok=True)
    with ReputationCache.open(path) as cache:
        await cache.refresh(w3, env.payment.escrow, chain_id=env.payment.chain_id)
        return cache.all(chain_id=env.payment.chain_id, escrow=env.payment.escrow)


async def cmd_market_submit(args: argparse.Namespace, out: Out) -> int:

    from core.envelope import VllmBatchEnvelope, parse_envelope
    from core.errors import HearthError
    from payments.keys import load_key
    from payments.registry_chain import RegistryChain
    from requester.budgets import load_budgets
    from requester.client import NodeClient
    from requester.home import RequesterHome
    from requester.home import default_path as home_path
    from requester.home_route import default_key, route_once
    from requester.market import Provider, discover
    from requester.paid import agent_key, funding_outcome, payer_wallet, wait_for_funding
    from requester.routing import GrantFunder
    from requester.routing_decision import Strategy

    if args.token or args.quote or args.node or args.node_did:
        raise usage(
            "--market chooses the node and asks for its quote: give no --node, --node-did, --token, --quote"
        )
    grant_id = getattr(args, "grant", None)
    if grant_id is not None:
        if args.wallet:
            raise usage("--grant and --wallet are two ways to pay: give one")
        if args.valid_seconds is not None:
            raise usage("--valid-seconds is for --wallet; a grant spend is valid until the escrow deadline")
        if grant_id < 1:
            raise usage("--grant takes a grant id (1, 2, ...; from `hearth grant open`)")
        if not args.agent_key:
            raise usage("--grant needs --agent-key: the grant's agent signs the spend and the request")
    if not args.envelope or not (args.key or grant_id is not None):
        raise usage("--market needs an ENVELOPE file and --key (--agent-key with --grant)")
    if args.valid_seconds is not None and args.valid_seconds <= 0:
        raise usage("--valid-seconds must be a positive number of seconds")
    env = parse_envelope(read_envelope(Path(args.envelope)))
    wallet = payer_wallet(Path(args.wallet), env) if args.wallet else None
    grant = None if grant_id is None else GrantFunder(grant_id, agent_key(Path(args.agent_key)))
    signer = grant.agent if grant is not None else load_key(Path(args.key))
    if wallet is None and grant is None and (args.wait or args.valid_seconds is not None):
        raise usage("--wait and --valid-seconds need --wallet (--wait: or --grant)")
    strategy = Strategy(args.strategy, args.min_settled, args.max_failure_rate)
    _, registry_address, rpc = where(args)
    found: list[Discovery] = []

    async def providers() -> list[Provider]:
        provider, w3 = connect(rpc)  # bounded, no retries: the market commands' one RPC connection
        try:
            reputation = await _reputation(args, w3, env) if strategy.name == "reputation" else None
            found.append(
                await discover(
                    RegistryChain(w3, registry_address, rpc_url=rpc),
                    kind=env.kind,
                    model=env.output_spec.model if isinstance(env, VllmBatchEnvelope) else None,
                    chain_id=env.payment.chain_id,
                    escrow=env.payment.escrow,
                    allow_private=args.allow_private_endpoints,
                    reputation=reputation,
                )
            )
        finally:
            await provider.disconnect()
        return found[0].providers

    key = args.idempotency_key or default_key(signer, env)
    with RequesterHome.open(home_path(args.home), budgets=load_budgets(args.home)) as home:
        try:
            routed = await route_once(
                home,
                key,
                env,
                signer,
                providers,
                workflow=args.workflow,
                strategy=strategy,
                wallet=wallet,
                grant=grant,
                quote_timeout=args.quote_timeout,
                valid_seconds=args.valid_seconds,
            )
        except HearthError as exc:
            if exc.code not in _REFUSALS:
                raise
            out.error(exc)
            return EXIT_UNREACHABLE if exc.code == "outcome_unknown" else EXIT_REFUSED
        budget = home.left(routed.record.workflow)
    decision = routed.decision
    doc: dict[str, Any] = {
        "discovery": _discovery_json(found[0]) if found else None,
        "decision": decision,
        "idempotency": routed.to_json(),
        "budget": budget,
    }
    job = decision.get("job") if isinstance(decision.get("job"), dict) else None
    code = {"submitted": EXIT_OK, "outcome_unknown": EXIT_UNREACHABLE}.get(routed.outcome, EXIT_REFUSED)

    def human() -> None:
        if routed.routing is None:
            _print_replay(routed, job)
        else:
            _print(found[0], routed.routing)
        for name, b in budget.items():
            print(f"  budget    {name}: {b['left_usdc']} of {b['limit_usdc']} USDC left")

    if not (args.wait and routed.outcome == "submitted" and job is not None):
        out.emit(doc, human)
        return code
    if not out.as_json:
        human()
        print("waiting for the escrow to be funded ...", flush=True)

    def say(line: str) -> None:
        if not out.as_json:
            print(line, flush=True)

    async with NodeClient(str(job["endpoint"])) as client:
        status = await wait_for_funding(client, str(job["id"]), say)
    funded, outcome = funding_outcome(status)
    out.emit({**doc, "status": status}, lambda: print(f"  funding   {outcome}"))
    return EXIT_OK if funded else EXIT_REFUSED


# refusals of the requester home before anything is sent: printed as errors, exit 1 (3: outcome_unknown)
_REFUSALS = ("idempotency_key_conflict", "idempotency_key_pinned", "budget_exceeded", "outcome_unknown")


def _print_replay(routed: Routed, job: dict[str, Any] | None) -> None:
    rec = routed.record
    print(
        f"idempotency key {rec.key}: already {rec.state} (attempt {rec.attempts}); "
        "nothing quoted or paid again"
    )
    if job is not None:
        print(f"job {job['id']} ({job['job_id']}) at {job['endpoint']}: {job.get('state') or 'unknown'}")


def _discovery_json(found: Discovery) -> dict[str, Any]:
    """The discovery's summary: where and when it read, and whom it left out (the kept are candidates)."""
    return {
        "registry": found.registry,
        "block": found.block,
        "registered": found.registered,
        "unread": found.unread,
        "dropped": [gone.to_json() for gone in found.dropped],
    }


def _print(found: Discovery, decision: RoutingDecision) -> None:
    from requester.routing_decision import shown

    print(
        f"market {found.registry} at block {found.block}: {found.registered} registered, "
        f"{len(found.providers)} bound, {len(found.dropped)} dropped"
    )
    for c in decision.candidates:
        mark = "*" if c.did == decision.winner else " "
        if c.status == "quoted":
            what = f"asks {shown(c.ask)} USDC"
        else:
            ask = f" (asks {shown(c.ask)} USDC)" if c.ask is not None else ""
            what = f"{c.status} {c.code}{ask}: {c.message}"
        print(f" {mark} {c.did}  {c.provider.endpoint}  {what}")
    for gone in found.dropped:
        print(f"   {gone.did}  {gone.endpoint}  dropped {gone.reason}: {gone.message}")
    for a in decision.attempts:
        status = "" if a.status is None else f" HTTP {a.status}"
        print(f"  try {a.step} #{a.attempt} at {a.endpoint}: {a.outcome}{status} {a.code or ''}".rstrip())
    if decision.winner is not None:
        print(f"chose {decision.winner}: {decision.reason}")
    if decision.job is not None:
        job = decision.job
        state = job.state or "unknown"
        print(f"job {job.id} ({job.job_id}) at {job.endpoint}: {state}")
        if job.funding is not None:
            terms = job.funding["terms"]
            print(
                f"  escrow    job {terms['escrow_job_id']}, {terms['amount_usdc']} USDC from {terms['payer']}"
            )
            if "grant" in job.funding:
                print(
                    f"  funding   from grant {job.funding['grant']['grant']} (the node submits fundFromGrant)"
                )
            else:
                print("  funding   gasless (the node submits fundWithAuthorization)")
    if decision.error is not None:
        err = decision.error
        print(f"error [{err.domain}/{err.code}]: {err.message}")
