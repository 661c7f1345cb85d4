"""``hearth status``: the operator's overview of a running node (``GET /v1/overview``) in the terminal.

Wired into ``hearth`` by :func:`add_parser`. People get tables drawn with ``rich``: capacity, running jobs
with progress bars, failures by domain, earnings with a sparkline over time, recent jobs. ``--json``
prints the overview document itself; ``--watch`` redraws it until Ctrl-C (with ``--json``, one
document per line). Exit codes as the rest of the CLI: 0 shown, 1 the node refused, 3 unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from node.overview import DEFAULT_PERIOD, MAX_RECENT, PERIODS

if TYPE_CHECKING:
    from node.cli import Out
    from node.client import NodeClient

__all__ = ["add_parser", "cmd_status", "render", "sparkline"]

DEFAULT_STATUS_RECENT: Final = 10
DEFAULT_WIDTH: Final = 120
DEFAULT_WATCH_SECONDS: Final = 2.0
MIN_WATCH_SECONDS: Final = 0.2
_SPARK: Final = "▁▂▃▄▅▆▇█"
_BAR_WIDTH: Final = 30
_MIN_BAR_WIDTH: Final = 8
_ID_WIDTH: Final = 29  # "hj_" + 26 base32 characters


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
            await _repeat(fetch, args.watch, args.count, lambda doc: _print_frame(console, doc))
        else:
            with Live(Text("fetching the overview ..."), console=console, auto_refresh=False) as live:

                def redraw(doc: dict[str, Any]) -> None:
                    live.update(render(doc, console.width), refresh=True)

                await _repeat(fetch, args.watch, args.count, redraw)
    except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels this task; stop quietly, exit 0
        pass
    return 0


def _print_frame(console: Console, doc: dict[str, Any]) -> None:
    console.print(render(doc, console.width))
    console.print()
    console.file.flush()


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


# -- rendering ----------------------------------------------------------------------------------------


def render(doc: dict[str, Any], width: int = DEFAULT_WIDTH) -> RenderableType:
    """The overview as rich renderables (header, capacity, running, failures, earnings, recent jobs).

    ``width``: the console's, in characters; the progress bars are sized to fit it.
    """
    return Group(
        _header(doc),
        _capacity(doc),
        _running(doc, width),
        _failures(doc),
        _earnings(doc),
        _recent(doc),
    )


def _header(doc: dict[str, Any]) -> Text:
    node = doc["node"]
    state = "not ready" if not node["ready"] else "paused" if node["paused"] else "ready"
    style = {"ready": "green", "paused": "yellow"}.get(state, "red")
    at = datetime.fromtimestamp(doc["generated_at"]).strftime("%H:%M:%S")
    text = Text.assemble((node["name"], "bold"), "  ", (state, f"bold {style}"), (f"  at {at}  ", "dim"))
    text.append(node["did"], style="dim")
    return text


def _memory(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:g} MiB"


def _capacity(doc: dict[str, Any]) -> RenderableType:
    cap = doc["capacity"]
    res = cap["resources"]
    table = Table(title="Capacity", title_justify="left", expand=False)
    for name in ("resource", "free", "used", "total"):
        table.add_column(name, justify="left" if name == "resource" else "right")
    table.add_row("CPU", *(f"{res[k]['cpus']:g}" for k in ("free", "used", "total")))
    table.add_row("memory", *(_memory(res[k]["memory_mb"]) for k in ("free", "used", "total")))
    table.add_row("GPUs", *(str(res[k]["gpus"]) for k in ("free", "used", "total")))
    machine = cap["machine"]
    gpus = ", ".join(g["name"] for g in machine["gpus"]) or "no GPU"
    models = ", ".join(m["name"] for m in cap["models"]) or "none declared"
    facts = Text(
        f"{machine['cpu_count']} CPUs, {_memory(machine['memory_total_mb'])} RAM, "
        f"disk {_memory(machine['disk']['free_mb'])} free, {gpus}; "
        f"utilisation {100 * res['utilisation']:.0f}%; models: {models}",
        style="dim",
    )
    return Group(table, facts)


def _elapsed(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _short_kind(kind: str) -> str:
    """``ffmpeg_transcode`` -> ``ffmpeg``, ``vllm_batch`` -> ``vllm``: the tables are narrow."""
    return kind.split("_", 1)[0]


def _running(doc: dict[str, Any], width: int) -> RenderableType:
    jobs = doc["jobs"]
    # the bar takes what the other columns leave (about 78 characters with their borders)
    bar_width = max(_MIN_BAR_WIDTH, min(_BAR_WIDTH, width - 78))
    title = f"Running jobs ({len(jobs['running'])} running, {jobs['queued']} queued)"
    if not jobs["running"]:
        return Text(f"{title}: none", style="bold")
    table = Table(title=title, title_justify="left")
    table.add_column("id", no_wrap=True, min_width=_ID_WIDTH)  # whole, to copy into `hearth job ...`
    table.add_column("kind")
    table.add_column("stage", no_wrap=True)
    table.add_column("progress", no_wrap=True)
    table.add_column("%", justify="right", no_wrap=True)
    table.add_column("elapsed", justify="right", no_wrap=True)
    for job in jobs["running"]:
        percent = job["percent"]
        bar = ProgressBar(total=100, completed=percent or 0, width=bar_width)
        table.add_row(
            job["id"],
            _short_kind(job["kind"]),
            job["stage"],
            bar,
            "-" if percent is None else f"{percent:.1f}%",
            _elapsed(doc["generated_at"] - job["started_at"]),
        )
    return table


def _failures(doc: dict[str, Any]) -> RenderableType:
    failures = doc["failures"]
    if not failures["total"]:
        return Text("Failures: none", style="bold")
    table = Table(title=f"Failures by domain ({failures['total']} failed jobs)", title_justify="left")
    table.add_column("domain")
    table.add_column("jobs", justify="right")
    table.add_column("codes")
    ranked = sorted(failures["by_domain"].items(), key=lambda item: -item[1]["count"])
    for domain, entry in ranked:
        codes = ", ".join(f"{code or '?'} x{n}" for code, n in entry["codes"].items())
        table.add_row(Text(domain, style="red"), str(entry["count"]), codes)
    return table


def sparkline(values: list[int]) -> str:
    """One block character per value, scaled to the largest (all lowest when every value is 0)."""
    top = max(values, default=0)
    if top <= 0:
        return _SPARK[0] * len(values)
    steps = len(_SPARK) - 1
    return "".join(_SPARK[0 if v <= 0 else max(1, round(v * steps / top))] for v in values)


def _earnings(doc: dict[str, Any]) -> RenderableType:
    earnings = doc["earnings"]
    currency = earnings["currency"].upper()
    series = earnings["series"]
    points = series["points"]
    in_window = sum(p["earned_units"] for p in points) / 10 ** earnings["decimals"]
    gas = sum(earnings["gas_wei"].values())
    lines = Text()
    lines.append("Earnings ", style="bold")
    lines.append(f"{earnings['earned']} {currency} in all")
    lines.append(
        f"; gas {gas} wei" if doc["node"]["payments"] else "; payments off (no [chain])", style="dim"
    )
    lines.append(f"\nlast {len(points)} {series['period']}s  ")
    lines.append(sparkline([p["earned_units"] for p in points]), style="yellow")
    lines.append(f"  {in_window:g} {currency}, {sum(p['jobs'] for p in points)} settled jobs")
    return lines


def _recent(doc: dict[str, Any]) -> RenderableType:
    jobs = doc["jobs"]["recent"]
    if not jobs:
        return Text("Recent jobs: none", style="bold")
    table = Table(title="Recent jobs", title_justify="left")
    table.add_column("id", no_wrap=True, min_width=_ID_WIDTH)
    table.add_column("job")
    table.add_column("kind")
    table.add_column("state", no_wrap=True)
    table.add_column("price", justify="right", no_wrap=True)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("failure")
    now = doc["generated_at"]
    for job in jobs:
        failure = job["failure"]
        table.add_row(
            job["id"],
            job["job_id"],
            _short_kind(job["kind"]),
            Text(job["state"], style="red" if job["state"] == "failed" else ""),
            job["price"] or "-",
            _elapsed(now - job["created_at"]),
            f"{failure['domain']}/{failure['code']}" if failure else "",
        )
    return table
