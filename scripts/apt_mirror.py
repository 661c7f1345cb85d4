#!/usr/bin/env python3
"""Print the Debian archive mirror this machine's apt uses (scripts/docker.sh debootstraps from it).

Reads ``sources.list`` and ``sources.list.d/*.list`` (one-line format) and ``sources.list.d/*.sources``
(deb822 format) under the apt directory (``/etc/apt``, or the one given), in apt's order, and prints the
first http(s) URI of a ``deb`` entry for a Debian suite (``bookworm``, ``stable-updates``, ...) with the
``main`` component, that is not the security archive. Prints nothing and exits 1 when there is none.
Standard library only: it runs before any virtual environment exists.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

# Debian's release names and aliases; a suite may carry one of SUITE_SUFFIXES (never "-security").
RELEASES = frozenset({"buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid"})
ALIASES = frozenset({"oldoldstable", "oldstable", "stable", "testing", "unstable", "experimental"})
DEBIAN_SUITES = RELEASES | ALIASES
SUITE_SUFFIXES = ("", "-updates", "-backports", "-proposed-updates")


def entries(apt_dir: Path) -> Iterator[tuple[str, str, list[str], list[str]]]:
    """(type, uri, suites, components) of every enabled source, in the order apt reads them."""
    main_list = apt_dir / "sources.list"
    if main_list.is_file():
        yield from _one_line(main_list.read_text(errors="replace"))
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        for path in sorted(parts.iterdir()):
            if path.suffix == ".list" and path.is_file():
                yield from _one_line(path.read_text(errors="replace"))
            elif path.suffix == ".sources" and path.is_file():
                yield from _deb822(path.read_text(errors="replace"))


def debian_mirror(apt_dir: Path) -> str | None:
    """The first http(s) Debian main-archive URI among ``apt_dir``'s sources, without a trailing slash."""
    for kind, uri, suites, components in entries(apt_dir):
        if kind != "deb" or not uri.startswith(("http://", "https://")) or "main" not in components:
            continue
        if not any(_is_debian_suite(suite) for suite in suites):  # bookworm-security is not one
            continue
        return uri.rstrip("/")
    return None


def _is_debian_suite(suite: str) -> bool:
    return any(
        suite.endswith(suffix) and suite[: len(suite) - len(suffix)] in DEBIAN_SUITES
        for suffix in SUITE_SUFFIXES
    )


def _one_line(text: str) -> Iterator[tuple[str, str, list[str], list[str]]]:
    """``deb [ option=value ... ] uri suite [component ...]`` lines; ``#`` starts a comment."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, rest = [*line.split(None, 1), ""][:2]
        if rest.startswith("["):  # [ arch=amd64 signed-by=... ]
            _, closed, rest = rest.partition("]")
            if not closed:
                continue
        words = rest.split()
        if len(words) >= 2:
            yield kind, words[0], [words[1]], words[2:]


def _deb822(text: str) -> Iterator[tuple[str, str, list[str], list[str]]]:
    """Stanzas of ``Field: value`` lines (continued by indented lines), separated by blank lines."""
    for stanza in _stanzas(text):
        if stanza.get("enabled", "yes").lower() in ("no", "false"):
            continue
        suites, components = stanza.get("suites", "").split(), stanza.get("components", "").split()
        for kind in stanza.get("types", "").split():
            for uri in stanza.get("uris", "").split():
                yield kind, uri, suites, components


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    last = ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, ""
        elif line[0] in " \t":
            if last:
                fields[last] += " " + line.strip()
        else:
            name, colon, value = line.partition(":")
            if colon:
                last = name.strip().lower()
                fields[last] = value.strip()


def main(argv: list[str]) -> int:
    apt_dir = Path(argv[1]) if len(argv) > 1 else Path("/etc/apt")
    mirror = debian_mirror(apt_dir)
    if mirror is None:
        return 1
    print(mirror)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
