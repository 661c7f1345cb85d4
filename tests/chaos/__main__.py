"""``python -m tests.chaos [--short] [--only NAME ...] [--json FILE]``: run the fault scoreboard."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tests.chaos.scoreboard import load_all, render, run_scenario


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--short", action="store_true", help="each scenario at its short count (as tests do)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these scenarios (by name)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    scenarios = load_all()
    chosen = [s for name, s in scenarios.items() if args.only is None or name in args.only]
    if args.only is not None and len(chosen) != len(args.only):
        known = ", ".join(scenarios)
        parser.error(f"unknown scenario in {args.only}; known: {known}")
    rows = []
    for sc in chosen:
        count = sc.short if args.short else sc.stated
        print(f"[chaos] {sc.name} x{count} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="hearth-chaos-") as tmp:
            row = run_scenario(sc, count, Path(tmp))
        outcome = "green" if row.ok else "RED"
        print(f"[chaos] {sc.name}: {outcome} ({row.seconds:.0f} s, seed {row.seed})", file=sys.stderr)
        for note in row.notes:
            print(f"[chaos]   {note}", file=sys.stderr)
        rows.append(row)
    print(render(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.as_dict() for r in rows], indent=2))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
