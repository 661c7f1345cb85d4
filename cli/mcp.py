"""``hearth mcp --home DIR [--node URL] [--http PORT]``: an agent's tools over MCP (:mod:`requester.mcp`).

The requester home ``DIR`` holds the agent's key, grant and budgets (``DIR/requester/requester.toml``,
:mod:`requester.budgets`); jobs go to ``--node`` when given, else through the market. stdio by default (an
MCP client starts this command itself; stdout carries the protocol only), streamable HTTP on
``127.0.0.1:PORT/mcp`` with ``--http PORT``. The MCP SDK loads only when this command runs.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from cli.common import EXIT_OK, Out, usage


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "mcp",
        parents=parents,
        help="serve the requester's tools to an AI agent (Model Context Protocol; stdio, or --http)",
    )
    p.add_argument("--node", help="send every job to this node (default: route through the market)")
    p.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on 127.0.0.1:PORT/mcp")
    p.set_defaults(func=cmd_mcp)
    return p


def cmd_mcp(args: argparse.Namespace, out: Out) -> int:
    from requester.mcp import serve_http, serve_stdio

    if args.http is not None and not 0 < args.http < 65536:
        raise usage("--http takes a port number")
    home = Path(args.home)
    if args.http is None:
        asyncio.run(serve_stdio(home, args.node))
    else:
        asyncio.run(serve_http(home, args.node, args.http))
    return EXIT_OK
