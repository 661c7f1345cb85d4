"""``python -m tests.crashvalidator POINT ARGS...``: ``hearth ARGS...`` whose validator service kills
itself at fault POINT.

The validator service's crash tests need it to die, as ``kill -9`` would, at a precise moment of a job's
validation (:data:`validator.service.VALIDATING`: recorded as validating, nothing judged;
:data:`validator.service.JUDGED`: the signed receipt stored, not yet posted). ``hearth validator run`` has
no such switch; this test-only launcher makes :func:`validator.service.run` build its service with a
:class:`tests.crashnode.KillAt` hook, then runs ``cli.main.main`` with the remaining arguments.
"""

from __future__ import annotations

import functools
import sys

import validator.service
from cli.main import main as hearth_main
from tests.crashnode import KillAt

POINTS = (validator.service.VALIDATING, validator.service.JUDGED)


def main(argv: list[str]) -> int:
    """Run ``hearth argv[1:]`` with the validator service dying at fault point ``argv[0]``."""
    if not argv or argv[0] not in POINTS:
        print(f"usage: python -m tests.crashvalidator {{{','.join(POINTS)}}} HEARTH-ARGS...", file=sys.stderr)
        return 2
    # `hearth validator run` (cli.validator_run.cmd_run) looks run up in validator.service when it runs
    validator.service.run = functools.partial(validator.service.run, faults=KillAt(argv[0]))
    return hearth_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
