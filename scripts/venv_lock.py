#!/usr/bin/env python3
"""Hold the virtual environment to requirements.lock; run with the venv's python (scripts/setup.sh does).

``venv_lock.py extras``: print the installed distributions the lock does not list, one a line (setup
uninstalls them, so the venv holds exactly the lock). ``venv_lock.py check``: exit 1, naming each one,
when an installed version misses a requirement of pyproject.toml (its dependencies and the ``dev`` extra),
that is when the lock is older than pyproject.toml and wants ``make lock``.
``--lock`` and ``--pyproject`` name other files than the repository's.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
# Installed with any venv, or the project itself: never in the lock, never removed.
ALWAYS_KEPT = frozenset({"pip", "setuptools", "wheel"})
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", re.MULTILINE)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_names(lock_text: str) -> set[str]:
    return {canonical(m.group(1)) for m in _PIN.finditer(lock_text)}


def extras(lock_text: str, project: str) -> list[str]:
    """Installed distributions neither in the lock nor the project (or pip and its kin), sorted."""
    keep = locked_names(lock_text) | ALWAYS_KEPT | {canonical(project)}
    installed = {canonical(d.metadata["Name"]) for d in metadata.distributions()}
    return sorted(installed - keep)


def unmet(pyproject: dict[str, Any]) -> list[str]:
    """Each requirement of the project and its ``dev`` extra that the installed versions miss."""
    project = pyproject["project"]
    wanted = [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("dev", [])]
    problems = []
    for line in wanted:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req} (installed: {version})")
    return problems


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["extras", "check"])
    parser.add_argument("--lock", type=Path, default=REPO / "requirements.lock")
    parser.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    args = parser.parse_args(argv)
    pyproject = tomllib.loads(args.pyproject.read_text())
    if args.command == "extras":
        for name in extras(args.lock.read_text(), pyproject["project"]["name"]):
            print(name)
        return 0
    problems = unmet(pyproject)
    for problem in problems:
        print(f"{args.lock} does not satisfy {args.pyproject}: {problem}", file=sys.stderr)
    if problems:
        print("regenerate the lock with `make lock`", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
