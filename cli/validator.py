"""``hearth validate <job>``: the validator's command (see :mod:`validator` for what it checks).

Wired into ``hearth`` by :func:`add_parser`. Exit codes as the rest of the CLI: 0 the result passed and
the receipt was signed (and accepted by the node, unless ``--no-post``); 1 the result failed its checks,
could not be verified, or the node refused the receipt; 2 bad usage or local input (key, envelope); 3 the
node could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.common import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, Out, node_url, read_envelope
from core.errors import HearthError, RequestError
from payments.keys import EthSigner, load_eth_key
from requester.client import NodeClient, NodeError, NodeUnreachable

if TYPE_CHECKING:  # the validator's stack (web3, didkit, storage) loads only when the command runs
    from payments.receipts import FundingTerms
    from validator import ValidationReport

# Refusals about the command's own input (its key, its envelope): bad usage, not a verdict.
_USAGE_DOMAINS = ("request", "config")


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Add ``validate`` to ``hearth``'s subcommands; ``parents`` bring --home/--json and --node/--node-did."""
    p = subparsers.add_parser(
        "validate",
        parents=parents,
        help="check a job's result independently and sign the receipt that settles it",
    )
    p.add_argument("job", help="the node's job id (hj_...)")
    p.add_argument(
        "--key", type=Path, required=True, help="validator key file (secp256k1: `keys new --type eth`)"
    )
    p.add_argument(
        "--envelope", type=Path, help="the job's envelope, YAML or JSON (default: the node's copy)"
    )
    p.add_argument("--terms", type=Path, help="the escrow's funding terms, JSON (default: the node's)")
    p.add_argument("--vc", action="store_true", help="also issue the receipt as a W3C Verifiable Credential")
    p.add_argument("--no-post", action="store_true", help="sign and print the receipt; do not send it")
    p.set_defaults(func=cmd_validate)
    return p


def validator_key(path: Path) -> EthSigner:
    """The validator's secp256k1 key; an Ed25519 key cannot sign EIP-712 (``validator_key_not_ethereum``)."""
    return load_eth_key(path, role="validator")


def read_terms(path: Path) -> FundingTerms:
    """Funding terms from a JSON file (``FundingTerms.to_json()``, as a node's status shows them)."""
    from payments.receipts import FundingTerms

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RequestError("unreadable_terms", f"{path}: {exc}", details={"path": str(path)}) from None
    return FundingTerms.from_json(doc)


def cmd_validate(args: argparse.Namespace, out: Out) -> int:
    """Run :func:`~validator.validate` for ``args.job``, print the report, return the exit code."""
    from validator import validate  # the validator's stack loads only when the command runs

    signer = validator_key(args.key)
    envelope = read_envelope(args.envelope) if args.envelope else None
    terms = read_terms(args.terms) if args.terms else None
    url = node_url(args.home, args.node)
    posting = not args.no_post

    async def go() -> ValidationReport:
        async with NodeClient(url) as client:
            return await validate(
                client,
                args.job,
                signer,
                envelope=envelope,
                terms=terms,
                node_did=args.node_did,
                credential=args.vc,
                post=posting,
            )

    try:
        report = asyncio.run(go())
    except (NodeError, NodeUnreachable):
        raise  # hearth's main prints them and exits 1 / 3
    except HearthError as exc:
        if exc.domain in _USAGE_DOMAINS:
            raise
        out.error(exc)
        return EXIT_REFUSED
    out.emit(report.to_json(), lambda: _print_report(report, posting=posting))
    if posting and not report.posted:
        unreachable = _answer_error(report.node_answer).get("code") == "node_unreachable"
        return EXIT_UNREACHABLE if unreachable else EXIT_REFUSED
    return EXIT_OK if report.passed else EXIT_REFUSED


def _print_report(report: ValidationReport, *, posting: bool) -> None:
    from payments.receipts import usdc_str

    judgement, receipt = report.judgement, report.receipt
    verdict = "PASSED" if report.passed else "FAILED"
    print(f"{verdict}  job {report.job}   amount {usdc_str(receipt.amount)} USDC")
    print(f"  artifact  sha256 {'matches' if judgement.digest_ok else 'DIFFERS from'} the result's")
    for check in judgement.checks["checks"]:
        print(f"  {check['name']:16} {'ok' if check['passed'] else 'FAILED'}")
    print(f"  receipt   {json.dumps(receipt.to_json())}")
    print(f"  signature 0x{report.signature.hex()}")
    if report.credential is not None:
        print(f"  credential issued by {report.credential.get('issuer')}")
    if posting:
        print(f"  node      {'accepted the receipt' if report.posted else 'refused the receipt'}")
        if not report.posted:
            print(f"            {_answer_line(report.node_answer)}")
    else:
        print("  not posted (--no-post)")


def _answer_error(answer: dict[str, Any] | None) -> dict[str, Any]:
    error = (answer or {}).get("error")
    return error if isinstance(error, dict) else {}


def _answer_line(answer: dict[str, Any] | None) -> str:
    error = _answer_error(answer)
    return f"{error.get('domain', '?')}/{error.get('code', '?')}: {error.get('message', '')}"
