"""The ``hearth`` command: one entry point, one module per audience.

- :mod:`cli.operator` (with :mod:`cli.service`, :mod:`cli.status`, :mod:`cli.models`): the GPU owner
  running a node;
- :mod:`cli.requester`: submitting and following jobs;
- :mod:`cli.validator`: checking a result and signing its receipt;
- :mod:`cli.validator_run`: the validator service (``hearth validator run``);
- :mod:`cli.devnet`: a local chain and the demo;
- :mod:`cli.market` (with :mod:`cli.market_leave`): the provider market on chain (who sells what, each
  provider's reputation) and ``hearth market leave`` (the node's wallet out of the registry);
- :mod:`cli.grant`: an owner's spending grants for an agent key;
- :mod:`cli.mcp`: an agent's tools over the Model Context Protocol (``hearth mcp``).

:mod:`cli.common` holds the exit codes (0 done, 1 the node refused, 2 bad usage or local input, 3 the node
could not be reached) and the output for people or for machines (``--json``).
"""

from __future__ import annotations

import argparse
import sys

from cli import devnet, grant, market, models, operator, requester, service, status, validator, validator_run
from cli import mcp as mcp_cli
from cli import worker as worker_cli
from cli.common import (
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Out,
    client_opts,
    common_opts,
    config_opt,
    request_opts,
    run_async,
)
from cli.market_leave import add_leave_parser
from core.config import default_home
from core.errors import HearthError
from requester.client import NodeError, NodeUnreachable


def build_parser() -> argparse.ArgumentParser:
    common, client, request, config = common_opts(), client_opts(), request_opts(), config_opt()
    parser = argparse.ArgumentParser(prog="hearth", description="Hearth provider node", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    operator.add_parser(sub, common, config)
    devnet.add_parser(sub, common)
    job = requester.add_parser(sub, common, client, request)
    operator.add_replay_parser(job, common, config)
    validator.add_parser(sub, [common, client])
    validator_run.add_parser(sub, [common])
    models.add_parser(sub, [common, config])
    service.add_parser(sub)
    status.add_parser(sub, [common, client])
    market_sub = market.add_parser(sub, [common])
    add_leave_parser(market_sub, [common, config])
    grant.add_parser(sub, [common])
    mcp_cli.add_parser(sub, [common])
    worker_cli.add_parser(sub, [common])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.home is None:
        args.home = default_home()
    out = Out(args.json)
    try:
        if hasattr(args, "afunc"):
            return run_async(args, out, args.afunc)
        result: int = args.func(args, out)
        return result
    except NodeUnreachable as exc:
        out.error(exc)
        return EXIT_UNREACHABLE
    except NodeError as exc:
        out.error(exc)
        return EXIT_REFUSED
    except HearthError as exc:
        out.error(exc)
        return EXIT_USAGE
    except OSError as exc:
        out.error(HearthError("os_error", str(exc), domain="request"))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
