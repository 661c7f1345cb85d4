"""The terminal rendering of ``hearth status``: the overview document drawn with ``rich``.

Capacity, running jobs with progress bars, failures by domain, earnings with a sparkline over time and the
recent jobs; :mod:`cli.status` imports this only when the command runs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

__all__ = ["print_frame", "render", "sparkline"]

DEFAULT_WIDTH: Final = 120
_SPARK: Final = "▁▂▃▄▅▆▇█"
_BAR_WIDTH: Final = 30
_MIN_BAR_WIDTH: Final = 8
_ID_WIDTH: Final = 29  # "hj_" + 26 base32 characters


def print_frame(console: Console, doc: dict[str, Any]) -> None:
    console.print(render(doc, console.width))
    console.print()
    console.file.flush()


# -- rendering ----------------------------------------------------------------------------------------


def render(doc: dict[str, Any], width: int = DEFAULT_WIDTH) -> RenderableType:
    """The overview as rich renderables (header, capacity, running, failures, earnings, recent jobs and,
    for a node in front of a cluster, its workers).

    ``width``: the console's, in characters; the progress bars are sized to fit it.
    """
    parts = [_header(doc), _capacity(doc), _running(doc, width), _failures(doc), _earnings(doc), _recent(doc)]
    cluster = doc.get("cluster")  # absent from the overview of an older node, null without [cluster]
    if cluster:
        parts.append(_workers(cluster))
    return Group(*parts)


def _header(doc: dict[str, Any]) -> Text:
    node = doc["node"]
    state = "not ready" if not node["ready"] else "paused" if node["paused"] else "ready"
    style = {"ready": "green", "paused": "yellow"}.get(state, "red")
    at = datetime.fromtimestamp(doc["generated_at"]).strftime("%H:%M:%S")
    text = Text.assemble((node["name"], "bold"), "  ", (state, f"bold {style}"), (f"  at {at}  ", "dim"))
    text.append(node["did"], style="dim")
    market = node.get("market")  # absent from the overview of an older node
    if market:
        colour = {"listed": "green", "pending": "yellow", "checking": "yellow"}.get(market["state"], "red")
        text.append("\nregistry listing ", style="dim")
        text.append(market["state"], style=colour)
        text.append(
            f"  {market['endpoint']}" + (f"  ({market['error']})" if market["error"] else ""), style="dim"
        )
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


def _workers(cluster: dict[str, Any]) -> RenderableType:
    """The cluster's workers, one row each: alive or dead, what each offers, runs there now and lost."""
    workers = cluster["workers"]
    dead = len(workers) - cluster["alive"]
    title = (
        f"Workers ({cluster['engine']} at {cluster['address']}: {cluster['alive']} alive"
        + (f", {dead} dead" if dead else "")
        + f"; {cluster['lost_runs']} runs lost)"
    )
    if not workers:
        return Text(f"{title}: none has joined", style="bold")
    table = Table(title=title, title_justify="left")
    table.add_column("worker", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for name in ("CPUs", "memory", "GPUs", "models", "running", "lost"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("address", style="dim")
    for w in workers:
        table.add_row(
            w["name"],
            Text("alive", style="green") if w["alive"] else Text("dead", style="bold red"),
            f"{w['cpus']:g}",
            _memory(w["memory_mb"]),
            str(w["gpus"]),
            str(len(w["models"])),
            str(w["running"]),
            Text(str(w["lost"]), style="red" if w["lost"] else ""),
            w["address"],
        )
    return table
