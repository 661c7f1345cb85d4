"""Where a node keeps things: its home, paths under it, and the keys the service manager may hand over.

Re-exported by :mod:`core.config`, where callers have always found them.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """``$HEARTH_HOME``, else ``/var/lib/hearth`` as root under systemd, else ``~/.hearth``."""
    env = os.environ.get("HEARTH_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0 and os.environ.get("INVOCATION_ID"):
        return Path("/var/lib/hearth")
    return Path.home() / ".hearth"


def resolve_path(home: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else home / p


def key_path(home: Path, configured: str, *, credential: str, credentials_dir: Path | None) -> Path:
    """Where to read a key: the systemd credential ``credential`` if the service manager passed one that is
    not blank, else ``configured`` (relative: under ``home``).

    Under the unit in ``systemd/``, LoadCredential= hands the keys over in ``$CREDENTIALS_DIRECTORY``, so
    the service user never reads root's key files; a blank credential is the unit's SetCredential=
    fallback for a key file that does not exist (a node without a wallet).
    """
    if credentials_dir is not None:
        candidate = credentials_dir / credential
        try:
            if candidate.read_bytes().strip():
                return candidate
        except FileNotFoundError:
            pass
    return resolve_path(home, configured)
