"""``hearth status``: the operator's overview of a running node (``GET /v1/overview``) in the terminal.

Wired into ``hearth`` by :func:`add_parser`. People get tables drawn with ``rich``: capacity, running jobs
with progress bars, failures by domain, earnings with a sparkline over time, recent jobs and, for a node in
front of a cluster, its workers. ``--json`` prints the overview document itself; ``--watch`` redraws it
until Ctrl-C (with ``--json``, one document per line). Exit codes as the rest of the CLI: 0 shown, 1 the
node refused, 3 unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from cli.common import Out
from node.overview import DEFAULT_PERIOD, MAX_RECENT, PERIODS

if TYPE_CHECKING:
    from requester.client import NodeClient

__all__ = ["add_parser", "cmd_status"]

DEFAULT_STATUS_RECENT: Final = 10
DEFAULT_WATCH_SECONDS: Final = 2.0
MIN_WATCH_SECONDS: Final = 0.2


def _recent_count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_RECENT:
        raise argparse.ArgumentTypeError(f"an integer from 0 to {MAX_RECENT}, not {raw!r}")
    return value


def _watch_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value >= MIN_WATCH_SECONDS:
        raise argparse.ArgumentTypeError(f"a number of seconds >= {MIN_WATCH_SECONDS}, not {raw!r}")
    return value


def _positive(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, not {raw!r}")
    return int(raw)


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Add ``status`` to ``hearth``'s subcommands; ``parents`` bring --home/--json and --node/--node-did."""
    p = subparsers.add_parser(
        "status",
        parents=parents,
        help="the node's capacity, running jobs, failures and earnings (operator)",
    )
    p.add_argument(
        "--recent",
        type=_recent_count,
        default=DEFAULT_STATUS_RECENT,
        help=f"recent jobs to list (default {DEFAULT_STATUS_RECENT}, at most {MAX_RECENT})",
    )
    p.add_argument(
        "--period", choices=tuple(PERIODS), default=DEFAULT_PERIOD, help="earnings per hour or per day"
    )
    p.add_argument(
        "--watch",
        type=_watch_seconds,
        nargs="?",
        const=DEFAULT_WATCH_SECONDS,
        metavar="SECONDS",
        help=f"redraw every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C",
    )
    p.add_argument("--count", type=_positive, help="with --watch: stop after this many refreshes")
    p.set_defaults(afunc=cmd_status)
    return p


async def cmd_status(args: argparse.Namespace, out: Out, client: NodeClient) -> int:
    """Show the overview once, or every ``--watch`` seconds (``--count`` times, or until Ctrl-C)."""

    async def fetch() -> dict[str, Any]:
        return await client.overview(recent=args.recent, period=args.period)

    # rich is imported here, not by `hearth`'s parser: the daemon's start does not pay for it
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from cli.status_view import print_frame, render

    if args.watch is None:
        doc = await fetch()
        console = Console()
        out.emit(doc, lambda: console.print(render(doc, console.width)))
        return 0
    console = Console()
    try:
        if out.as_json:
            await _repeat(fetch, args.watch, args.count, lambda doc: print(json.dumps(doc), flush=True))
        elif not console.is_terminal:  # a pipe or a file: one frame after another, as they come
            await _repeat(fetch, args.watch, args.count, lambda doc: print_frame(console, doc))
        else:
            with Live(Text("fetching the overview ..."), console=console, auto_refresh=False) as live:

                def redraw(doc: dict[str, Any]) -> None:
                    live.update(render(doc, console.width), refresh=True)

                await _repeat(fetch, args.watch, args.count, redraw)
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels this task; stop quietly, exit 0
        pass
    return 0


async def _repeat(
    fetch: Callable[[], Awaitable[dict[str, Any]]],
    seconds: float,
    count: int | None,
    show: Callable[[dict[str, Any]], None],
) -> None:
    done = 0
    while count is None or done < count:
        if done:
            await asyncio.sleep(seconds)
        show(await fetch())
        done += 1
