"""``hearth validator run``: the validator service (:mod:`validator.service`) as a daemon.

It listens for node-signed notices (``POST /v1/validations``), validates each job exactly as
``hearth validate`` does, keeps its verdicts in ``HOME/validator/verdicts.sqlite`` and posts the signed
receipts, retrying while a node is unreachable. SIGTERM or SIGINT stops it; open work resumes at the next
start. Prints one line when it listens (a JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from cli.common import EXIT_OK, Out
from cli.validator import validator_key

DEFAULT_PORT = 8790


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Add ``validator run`` to ``hearth``'s subcommands; ``parents`` bring --home/--json."""
    p = subparsers.add_parser("validator", help="the validator service: notices in, receipts out")
    sub = p.add_subparsers(dest="validator_command", required=True)
    run = sub.add_parser(
        "run",
        parents=parents,
        help="validate completed jobs on node notices and post their receipts, with no person in the loop",
    )
    run.add_argument(
        "--key", type=Path, required=True, help="validator key file (secp256k1: `keys new --type eth`)"
    )
    run.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})"
    )
    run.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    run.add_argument("--json-logs", action="store_true", help="log one JSON object per line to stderr")
    run.add_argument(
        "--allow-private-addresses",
        action="store_true",
        help="let notices name nodes on loopback or private addresses (devnets, one machine)",
    )
    run.add_argument(
        "--retry-max-seconds",
        type=float,
        default=60.0,
        help="the longest wait between two tries while a node is unreachable (default 60)",
    )
    run.set_defaults(func=cmd_run)
    return run


def cmd_run(args: argparse.Namespace, out: Out) -> int:
    """Run the service until SIGTERM or SIGINT."""
    from core.logs import configure_logging
    from validator.service import run

    signer = validator_key(args.key)
    configure_logging("INFO", "json" if args.json_logs else "text")
    home = Path(args.home) / "validator"

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(bound: int) -> None:
            url = f"http://{args.host}:{bound}"
            msg = {"event": "ready", "did": signer.did, "url": url, "home": str(home)}
            print(
                json.dumps(msg) if out.as_json else f"hearth validator {signer.did} listening on {url}",
                flush=True,
            )

        await run(
            signer,
            home,
            args.host,
            args.port,
            allow_private_addresses=args.allow_private_addresses,
            backoff_max_seconds=args.retry_max_seconds,
            on_ready=ready,
            stop=stop,
        )

    asyncio.run(go())
    return EXIT_OK
