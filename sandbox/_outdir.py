"""The one writable directory of a run: made writable for the sandbox user, and measured while it grows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import ExecutionError

# Owner-only when the node (root) can hand the directory to the sandbox user outright.
_OWNED_MODE = 0o700
# Group-shared (setgid, so the files the sandbox writes keep the node's group) when the node runs as a
# service user that cannot chown.
_SHARED_MODE = 0o2770


def parse_user(user: str) -> tuple[int, int]:
    """``"uid:gid"`` as numbers; the sandbox never runs as uid 0."""
    uid_text, sep, gid_text = user.partition(":")
    if not (sep and uid_text.isdigit() and gid_text.isdigit()) or int(uid_text) == 0:
        raise ValueError(f"sandbox user must be a numeric non-root uid:gid, got {user!r}")
    return int(uid_text), int(gid_text)


def prepare_output_dir(path: Path, user: str) -> list[str]:
    """Create ``path`` if needed and let the sandbox user write it; returns the groups to add to that user.

    As root the directory is given to the sandbox user. As an unprivileged service user the directory
    stays the node's and is shared through the node's group, which the container user then joins.
    """
    uid, gid = parse_user(user)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(path, uid, gid)
            os.chmod(path, _OWNED_MODE)
            return []
        os.chmod(path, _SHARED_MODE)
    except OSError as exc:
        raise ExecutionError(
            "output_dir_unusable",
            f"cannot prepare the output directory {path}: {exc.strerror}",
            details={"path": str(path)},
        ) from exc
    return [str(os.getegid())]


@dataclass(frozen=True, slots=True)
class TreeSize:
    """What a walk of the output directory found: bytes in it, and whether some part could not be read."""

    total_bytes: int
    unreadable: bool


def tree_size(path: Path) -> TreeSize:
    """Sum the sizes (``st_size``, so sparse files count in full) of everything under ``path``.

    Links are counted as themselves, never followed. Entries vanishing during the walk are skipped: the
    workload may be rewriting its output while it is measured.
    """
    total = 0
    unreadable = False
    stack = [path]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        else:
                            total += entry.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:
                        continue
        except FileNotFoundError:
            continue
        except PermissionError:
            unreadable = True
    return TreeSize(total, unreadable)
