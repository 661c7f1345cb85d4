"""The requester's commands: ``hearth job sign|quote|submit|status|result|events|cancel``, ``blob put``.

A paid submission (``job submit --wallet``, or ``--grant`` with ``--agent-key``) is
:mod:`requester.paid`'s work; this module prints it.
``job submit --market`` (the node chosen among the registry's providers) is :mod:`cli.routing`'s.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.common import EXIT_OK, EXIT_REFUSED, Out, read_envelope, usage, utc
from cli.routing import add_market_options, cmd_market_submit
from core.envelope import Envelope, parse_envelope
from payments.jwt import decode_unverified
from payments.keys import load_key
from payments.receipts import usdc_str
from requester.client import NodeClient, sign_request
from requester.paid import (
    PaymentTermsRefused,
    agent_key,
    funding_outcome,
    payer_wallet,
    submit_granted,
    submit_paid,
    wait_for_funding,
)


async def _request_token(args: argparse.Namespace, client: NodeClient, node_did: str | None = None) -> str:
    """The signed request to send: the --token file as it is, or a fresh JWT (new ``jti``) on each call."""
    if args.token:
        return str(Path(args.token).read_text().strip())
    key = getattr(args, "agent_key", None) if getattr(args, "grant", None) is not None else args.key
    if not args.envelope or not key:
        raise usage("give an ENVELOPE file and --key (--agent-key with --grant), or --token FILE")
    signer = load_key(Path(key))
    node_did = node_did or args.node_did or await client.node_did()
    return sign_request(signer, node_did, {"job": read_envelope(Path(args.envelope))}, ttl_seconds=args.ttl)


async def cmd_job_sign(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    token = await _request_token(args, client)
    out.emit({"request": token}, lambda: print(token))
    return EXIT_OK


def _print_quote(body: dict[str, Any]) -> None:
    q = body["quote"]
    print(f"quote {q['quote_id']} for job {q['job']} ({q['job_id']})")
    print(f"  price     {q['price']} {q['currency'].upper()}   (surge x{q['surge_factor']})")
    print(f"  expires   {q['expires_at']}   estimate basis: {q['estimate']['basis']}")
    for k, v in q["breakdown"].items():
        print(f"    {k:16} {v}")


async def cmd_job_quote(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    token = await _request_token(args, client)
    body = await client.quote(token)
    if args.save_quote:
        Path(args.save_quote).write_text(body["jwt"])
    out.emit(body, lambda: _print_quote(body))
    return EXIT_OK


def _print_status(body: dict[str, Any]) -> None:
    job = body["job"]
    print(f"job {job['id']} ({job['job_id']})  {job['kind']}")
    print(f"  state     {job['state']}")
    print(f"  price     {job['price']} USDC")
    print(f"  requester {job['requester']}")
    if job.get("failure"):
        f = job["failure"]
        print(f"  failure   {f['domain']}/{f['code']} retryable={f['retryable']}: {f['message']}")
    if "outcome" in body:
        print(f"  outcome   {body['outcome']}")
    if job.get("payment"):
        _print_payment(job["payment"])


def _print_payment(payment: dict[str, Any]) -> None:
    """The ``payment`` of a job's status: escrow terms, funding, the receipt and every transaction."""
    terms, funding = payment["terms"], payment["funding"]
    print("  payment")
    print(f"    escrow job  {terms['escrow_job_id']}  (escrow {terms['escrow']}, chain {terms['chain_id']})")
    print(f"    amount      {terms['amount_usdc']} USDC from {terms['payer']}")
    print(f"    deadline    {utc(terms['deadline'])}")
    state = funding["state"]
    if state == "awaiting":
        state += f" until {utc(funding['wait_until'])}"
    if funding.get("grant") is not None:
        state += f", from grant {funding['grant']} (the node submits fundFromGrant)"
    elif funding["gasless"]:
        state += ", gasless (the node submits fundWithAuthorization)"
    print(f"    funding     {state}")
    receipt = payment["settlement"]["receipt"]
    if receipt is not None:
        verdict = "passed" if receipt["passed"] else "failed"
        print(f"    receipt     {verdict}, {usdc_str(int(receipt['amount']))} USDC")
    for tx in payment["txs"]:
        block = "-" if tx["block_number"] is None else tx["block_number"]
        gas = "-" if tx["gas_used"] is None else tx["gas_used"]
        print(f"    tx {tx['purpose']:8} {tx['state']:9} {tx['hash']}  block {block}  gas {gas}")


def _print_accepted(body: dict[str, Any]) -> None:
    print("accepted" if body.get("accepted_now") else "already accepted")
    _print_status(body)


async def cmd_job_submit(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    if args.market:
        return await cmd_market_submit(args, out)
    if args.grant is not None:
        try:
            return await _submit_granted(args, out, client)
        except PaymentTermsRefused as exc:
            out.error(exc)
            return EXIT_REFUSED
    if args.wallet:
        try:
            return await _submit_paid(args, out, client)
        except PaymentTermsRefused as exc:
            out.error(exc)
            return EXIT_REFUSED
    if args.wait or args.valid_seconds is not None:
        raise usage("--wait and --valid-seconds need --wallet (--wait: or --grant)")
    token = await _request_token(args, client)
    quote = Path(args.quote).read_text().strip() if args.quote else None
    body = await client.submit(token, quote)
    out.emit(body, lambda: _print_accepted(body))
    return EXIT_OK


# -- paying for a job (submit --wallet) ----------------------------------------------------------------


async def _submit_paid(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    """Quote, sign the payer's EIP-3009 authorization for the quote's escrow terms, submit with it.

    The node submits ``fundWithAuthorization`` itself, so the payer's wallet needs USDC but no gas. Every
    check that can fail locally (wallet, envelope, terms) runs before the job is submitted.
    """
    if args.valid_seconds is not None and args.valid_seconds <= 0:
        raise usage("--valid-seconds must be a positive number of seconds")
    if args.token and not args.quote:
        raise usage("a --token can be sent once; with --wallet give --quote FILE too, or ENVELOPE and --key")
    env = _request_envelope(args)
    wallet = payer_wallet(Path(args.wallet), env)
    node_did = args.node_did or await client.node_did()
    paid = await submit_paid(
        client,
        env=env,
        wallet=wallet,
        node_did=node_did,
        quote_jwt=Path(args.quote).read_text().strip() if args.quote else None,
        request_token=lambda: _request_token(args, client, node_did),
        valid_seconds=args.valid_seconds,
    )
    body, terms, auth = paid.body, paid.terms, paid.authorization
    doc = {**body, "funding_terms": terms.to_json(), "authorization": auth.to_json()}

    def human() -> None:
        _print_accepted(body)
        t = terms.to_json()
        print(f"  escrow    job {t['escrow_job_id']} (escrow {t['escrow']}, chain {t['chain_id']})")
        print(f"  amount    {t['amount_usdc']} USDC from {t['payer']}")
        print(f"  valid     until {utc(auth.valid_before)}")
        print("  funding   gasless (the node submits fundWithAuthorization)")

    return await _maybe_wait(args, out, client, body, doc, human)


async def _submit_granted(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    """Quote, sign the agent's ``Spend`` from ``--grant`` for the quote's escrow terms, submit with it.

    The request is signed by the agent's key too (``iss`` = its ``did:pkh``); the node submits
    ``fundFromGrant`` and the grant's owner pays. Nothing is signed before the terms are checked.
    """
    if args.wallet:
        raise usage("--grant and --wallet are two ways to pay: give one")
    if args.valid_seconds is not None:
        raise usage("--valid-seconds is for --wallet; a grant spend is valid until the escrow deadline")
    if args.grant < 1:
        raise usage("--grant takes a grant id (1, 2, ...; from `hearth grant open`)")
    if not args.agent_key:
        raise usage("--grant needs --agent-key: the grant's agent signs the spend and the request")
    if args.token and not args.quote:
        raise usage("a --token can be sent once; with --grant give --quote FILE too, or ENVELOPE")
    env = _request_envelope(args)
    agent = agent_key(Path(args.agent_key))
    node_did = args.node_did or await client.node_did()
    sub = await submit_granted(
        client,
        env=env,
        agent=agent,
        grant_id=args.grant,
        node_did=node_did,
        quote_jwt=Path(args.quote).read_text().strip() if args.quote else None,
        request_token=lambda: _request_token(args, client, node_did),
    )
    body, terms = sub.body, sub.terms
    doc = {**body, "funding_terms": terms.to_json(), "funding": sub.funding.to_json()}

    def human() -> None:
        _print_accepted(body)
        t = terms.to_json()
        print(f"  escrow    job {t['escrow_job_id']} (escrow {t['escrow']}, chain {t['chain_id']})")
        print(f"  amount    {t['amount_usdc']} USDC from grant {args.grant} (owner {t['payer']})")
        print(f"  agent     {agent.did}")
        print("  funding   from the grant (the node submits fundFromGrant)")

    return await _maybe_wait(args, out, client, body, doc, human)


async def _maybe_wait(
    args: argparse.Namespace,
    out: Out,
    client: NodeClient,
    body: dict[str, Any],
    doc: dict[str, Any],
    human: Callable[[], None],
) -> int:
    """Print the submission; with ``--wait``, follow the funding to its outcome first."""
    if not args.wait:
        out.emit(doc, human)
        return EXIT_OK

    def say(line: str) -> None:
        if not out.as_json:  # people follow along; machines get one document at the end
            print(line, flush=True)

    if not out.as_json:
        human()
    say("waiting for the escrow to be funded ...")
    status = await wait_for_funding(client, str(body["job"]["id"]), say)
    funded, outcome = funding_outcome(status)
    out.emit({**doc, "status": status}, lambda: print(f"  funding   {outcome}"))
    return EXIT_OK if funded else EXIT_REFUSED


def _request_envelope(args: argparse.Namespace) -> Envelope:
    """The envelope the submission carries (the ENVELOPE file, or a --token's ``job`` claim), checked."""
    if args.token:
        _, claims, _, _ = decode_unverified(Path(args.token).read_text().strip())
        return parse_envelope(claims.get("job"))
    if not args.envelope:
        raise usage("give an ENVELOPE file and --key, or --token FILE")
    return parse_envelope(read_envelope(Path(args.envelope)))


async def cmd_job_status(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    body = await client.status(args.id)
    out.emit(body, lambda: _print_status(body))
    return EXIT_OK


async def cmd_job_result(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    body = await client.result(args.id)
    out.emit(body, lambda: print(json.dumps(body["result"], indent=2)))
    return EXIT_OK


async def cmd_job_cancel(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    signer = load_key(Path(args.key))
    node_did = args.node_did or await client.node_did()
    body = await client.cancel(args.id, sign_request(signer, node_did, {"cancel": args.id}))
    out.emit(body, lambda: _print_status(body))
    return EXIT_OK


async def cmd_job_events(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    async for event in client.events(args.id, follow=args.follow):
        if out.as_json:
            print(json.dumps(event, sort_keys=True), flush=True)
        else:
            move = (
                f"{event['from'] or '-'} -> {event['to']}" if event["type"] == "transition" else event["type"]
            )
            print(
                f"#{event['seq']:<4} {event['at']:.3f}  {move:24} {event['actor']}: {event['reason']}",
                flush=True,
            )
    return EXIT_OK


async def cmd_blob_put(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    body = await client.put_blob(Path(args.file))
    out.emit(body, lambda: print(f"{body['cid']}  ({body['size']} bytes)"))
    return EXIT_OK


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    client: argparse.ArgumentParser,
    request: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """``hearth job ...`` and ``hearth blob put``; returns the ``job`` subcommands for others to join."""
    job = sub.add_parser("job", help="requester commands").add_subparsers(dest="job_cmd", required=True)
    p = job.add_parser("sign", parents=[common, client, request], help="print a signed request (JWT)")
    p.set_defaults(afunc=cmd_job_sign)
    p = job.add_parser("quote", parents=[common, client, request], help="ask the node for a signed quote")
    p.add_argument("--save-quote", help="write the quote JWT to this file")
    p.set_defaults(afunc=cmd_job_quote)
    p = job.add_parser("submit", parents=[common, client, request], help="submit a job (against --quote)")
    p.add_argument("--quote", help="quote JWT file from `hearth job quote --save-quote`")
    p.add_argument(
        "--wallet",
        help="the payer's Ethereum key file: sign an EIP-3009 authorization for the quote's escrow terms; "
        "the node funds the escrow with it (the payer pays no gas)",
    )
    p.add_argument(
        "--valid-seconds",
        type=int,
        help="with --wallet: the authorization lapses after this many seconds (default: the escrow deadline)",
    )
    p.add_argument(
        "--grant",
        type=int,
        help="fund the job from this spending grant (`hearth grant open`): the agent signs a Spend for the "
        "quote's escrow terms, the node submits fundFromGrant, the grant's owner pays",
    )
    p.add_argument(
        "--agent-key",
        help="with --grant: the grant's agent (an Ethereum key); it signs the request and the spend",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="with --wallet or --grant: wait until the escrow is funded or funding fails",
    )
    add_market_options(p)
    p.set_defaults(afunc=cmd_job_submit)
    for name, fn, text in (
        ("status", cmd_job_status, "job status"),
        ("result", cmd_job_result, "job result"),
    ):
        p = job.add_parser(name, parents=[common, client], help=text)
        p.add_argument("id")
        p.set_defaults(afunc=fn)
    p = job.add_parser("events", parents=[common, client], help="the job's events (SSE)")
    p.add_argument("id")
    p.add_argument("--follow", action="store_true", help="keep streaming live events")
    p.set_defaults(afunc=cmd_job_events)
    blob = sub.add_parser("blob", help="content-addressed inputs").add_subparsers(
        dest="blob_cmd", required=True
    )
    p = blob.add_parser("put", parents=[common, client], help="upload a file; prints its CID")
    p.add_argument("file")
    p.set_defaults(afunc=cmd_blob_put)
    p = job.add_parser("cancel", parents=[common, client], help="cancel a job (signed by its requester)")
    p.add_argument("id")
    p.add_argument("--key", required=True)
    p.set_defaults(afunc=cmd_job_cancel)
    return job
