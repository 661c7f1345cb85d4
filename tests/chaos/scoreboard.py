"""Scenario registry and the scoreboard table.

A scenario is a function ``run(count, workdir) -> Row``: it performs ``count`` iterations of one fault
against real parts (a daemon process, Docker, anvil, a sized filesystem) and reports what it saw. A row
is green only when every iteration ran and every outcome the scenario counts as bad is zero.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One line of the scoreboard: what ran, how often, and what came of it."""

    name: str
    stated: int  # the count the scoreboard claims for this fault
    runs: int = 0  # iterations that actually ran to their check
    bad: dict[str, int] = field(default_factory=dict)  # outcome -> count; every one must be 0
    good: dict[str, int] = field(default_factory=dict)  # informative tallies (jobs completed, ...)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # first few failure descriptions, for the log
    seed: int | None = None  # the random seed of the run, so a red row can be replayed

    @property
    def ok(self) -> bool:
        return self.runs >= self.stated and not any(self.bad.values())

    def fail(self, outcome: str, note: str) -> None:
        """Count one bad outcome and keep its description (the first ten)."""
        self.bad[outcome] = self.bad.get(outcome, 0) + 1
        if len(self.notes) < 10:
            self.notes.append(f"{outcome}: {note}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stated": self.stated,
            "runs": self.runs,
            "bad": self.bad,
            "good": self.good,
            "seconds": round(self.seconds, 1),
            "ok": self.ok,
            "notes": self.notes,
            "seed": self.seed,
        }


Runner = Callable[[int, Path], Row]


@dataclass(frozen=True)
class Scenario:
    name: str
    stated: int  # the count `make chaos` runs
    short: int  # the count `make test` runs
    run: Runner


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, *, stated: int, short: int) -> Callable[[Runner], Runner]:
    """Register ``run`` as scenario ``name``: ``stated`` times in ``make chaos``, ``short`` in tests."""

    def register(run: Runner) -> Runner:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} registered twice")
        SCENARIOS[name] = Scenario(name, stated, short, run)
        return run

    return register


def load_all() -> dict[str, Scenario]:
    """Import every ``tests/chaos/scenario_*.py`` module (each registers its scenarios)."""
    package = Path(__file__).parent
    for info in pkgutil.iter_modules([str(package)]):
        if info.name.startswith("scenario_"):
            importlib.import_module(f"tests.chaos.{info.name}")
    return SCENARIOS


def run_scenario(sc: Scenario, count: int, workdir: Path) -> Row:
    """Run ``sc`` ``count`` times in ``workdir``; a scenario that raises is a red row, not a crash."""
    t0 = time.monotonic()
    try:
        row = sc.run(count, workdir)
    except Exception as exc:  # the scoreboard reports every row, whatever one of them did
        row = Row(sc.name, count)
        row.fail("harness_error", f"{type(exc).__name__}: {exc}")
    row.stated = count
    row.seconds = time.monotonic() - t0
    return row


def render(rows: list[Row]) -> str:
    """The scoreboard as a Markdown table (also readable in a terminal)."""
    lines = [
        "| fault | count | ran | bad outcomes | tallies | seconds | result |",
        "|---|---:|---:|---|---|---:|---|",
    ]
    for row in rows:
        bad = ", ".join(f"{k} {v}" for k, v in sorted(row.bad.items())) or "none"
        good = ", ".join(f"{k} {v}" for k, v in sorted(row.good.items())) or "-"
        result = "green" if row.ok else "RED"
        lines.append(
            f"| {row.name} | {row.stated} | {row.runs} | {bad} | {good} | {row.seconds:.0f} | {result} |"
        )
    return "\n".join(lines)
