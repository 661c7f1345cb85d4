"""What every ``hearth`` command shares: exit codes, output for people or machines, the node's URL, the
envelope file reader, the common options and the async runner.

Exit codes: 0 done, 1 the node refused (its structured error is printed), 2 bad usage or local input, 3 the
node could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from core.config import load_config
from core.envelope import parse_envelope
from core.errors import HearthError
from requester.client import NodeClient

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Out:
    """Prints for people or for machines, chosen once by ``--json``."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        if self.as_json:
            print(json.dumps(data, indent=2, sort_keys=True))
        else:
            human()

    def error(self, exc: HearthError) -> None:
        if self.as_json:
            print(json.dumps(exc.to_dict(), indent=2, sort_keys=True))
        else:
            print(f"error [{exc.domain}/{exc.code}]: {exc.message}", file=sys.stderr)
            for key, value in exc.details.items():
                print(
                    f"  {key}: {json.dumps(value) if not isinstance(value, str) else value}", file=sys.stderr
                )


# -- node home ----------------------------------------------------------------------------------------


def node_url(home: Path, explicit: str | None) -> str:
    if explicit:
        return explicit
    env = os.environ.get("HEARTH_NODE_URL")
    if env:
        return env
    cfg = load_config(home)
    host = "127.0.0.1" if cfg.api.host in ("0.0.0.0", "::") else cfg.api.host
    return f"http://{host}:{cfg.api.port}"


def read_envelope(path: Path) -> dict[str, Any]:
    """A YAML or JSON envelope file, checked locally so mistakes are caught before anything is sent."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise HearthError("unreadable_envelope", f"{path}: {exc}", domain="request") from None
    if isinstance(data, dict) and "job" in data and len(data) == 1:
        data = data["job"]
    parse_envelope(data)
    assert isinstance(data, dict)
    return data


def usage(message: str) -> HearthError:
    return HearthError("usage", message, domain="request")


def utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def common_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--home", type=Path, default=None, help="node home (default $HEARTH_HOME or ~/.hearth)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def client_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--node", help="node URL (default: from --home's node.toml, or $HEARTH_NODE_URL)")
    p.add_argument("--node-did", help="the node's DID (default: read from GET /v1/capacity)")
    return p


def request_opts() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("envelope", nargs="?", help="job envelope, YAML or JSON")
    p.add_argument("--key", help="requester key file (from `hearth keys new`)")
    p.add_argument("--token", help="send this already signed request (file) instead of signing one")
    p.add_argument("--ttl", type=int, default=300, help="request lifetime in seconds (default 300)")
    return p


def config_opt() -> argparse.ArgumentParser:
    """``--config``: a node run as a service keeps its node.toml in /etc/hearth, not in its home."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="node.toml to read (default: HOME/node.toml); relative paths in it stay under --home",
    )
    return p


def run_async(
    args: argparse.Namespace, out: Out, fn: Callable[[argparse.Namespace, Out, NodeClient], Awaitable[int]]
) -> int:
    async def go() -> int:
        async with NodeClient(node_url(args.home, args.node)) as client:
            return await fn(args, out, client)

    return asyncio.run(go())
