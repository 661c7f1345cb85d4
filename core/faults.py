"""Fault points: named places in crash-sensitive code where a test may stop the process.

Code that must survive a crash at a precise moment (a transaction recorded but not yet broadcast, or
broadcast but not yet marked sent) calls :meth:`FaultPoints.reached` there with the point's name. The
production object, :data:`NO_FAULTS`, does nothing. A crash-safety test passes its own object down the
constructors (``node.daemon.Node(faults=...)`` hands it to ``payments.settlement.Settlement``), for
example one that sends the process SIGKILL at one named point, as ``kill -9`` would. Nothing here reads
the environment: which point fires, if any, is decided by whoever builds the object.
"""

from __future__ import annotations

from typing import Final, Protocol


class FaultPoints(Protocol):
    """What crash-sensitive code calls at each named fault point."""

    def reached(self, point: str) -> None:
        """Called when the code reaches ``point``; may stop the process (tests), must not raise."""
        ...


class NoFaults:
    """The production fault points: reaching one does nothing."""

    def reached(self, point: str) -> None:
        """Do nothing: a production process never stops at a fault point."""
        return None


NO_FAULTS: Final[FaultPoints] = NoFaults()

__all__ = ["NO_FAULTS", "FaultPoints", "NoFaults"]
