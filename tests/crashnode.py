"""``python -m tests.crashnode POINT ARGS...``: ``hearth ARGS...`` whose node kills itself at fault POINT.

The crash-safety tests run the daemon as a real child process and need it to die, as ``kill -9`` would,
at a precise moment of settlement (:mod:`core.faults`; the points are :data:`payments.outbox.AFTER_RECORD`
and :data:`payments.outbox.AFTER_BROADCAST`). The node's own entry point (``cli.main``) has no such
switch; this test-only launcher builds every :class:`node.daemon.Node` of the process with a
:class:`KillAt` hook (the ``faults`` constructor argument, which the node hands to
``payments.settlement.Settlement``), then runs ``cli.main.main`` with the remaining arguments.

The hook logs ``fault point POINT: killing the node`` before the SIGKILL, so a test can count the deaths
in the daemon's log.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import node.daemon
from cli.main import main as hearth_main
from payments.outbox import AFTER_BROADCAST, AFTER_RECORD

POINTS = (AFTER_RECORD, AFTER_BROADCAST)

log = logging.getLogger("hearth.faults")


class KillAt:
    """Fault points that SIGKILL the process at one named point and let every other one pass."""

    def __init__(self, point: str) -> None:
        self.point = point

    def reached(self, point: str) -> None:
        """Kill the process when ``point`` is the one this hook names."""
        if point == self.point:
            log.warning("fault point %s: killing the node", point)
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    """Run ``hearth argv[1:]`` with every node of the process dying at fault point ``argv[0]``."""
    if not argv or argv[0] not in POINTS:
        print(f"usage: python -m tests.crashnode {{{','.join(POINTS)}}} HEARTH-ARGS...", file=sys.stderr)
        return 2
    hook = KillAt(argv[0])

    class CrashingNode(node.daemon.Node):
        """The node, built with the launcher's fault points (``Node.from_home`` builds this class)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, faults=hook, **kwargs)

    # `hearth run` (cli.operator.cmd_run) looks the class up in node.daemon when it runs, so the daemon it
    # starts is this one; nothing else in the process differs from `python -m cli.main`.
    node.daemon.Node = CrashingNode  # type: ignore[misc]
    return hearth_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
