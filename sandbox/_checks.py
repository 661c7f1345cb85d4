"""What every workload's output checks end in: a failure that carries the whole checks document."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.errors import OutputValidationError


def raise_for_checks(checks: Mapping[str, Any]) -> None:
    """Raise ``OutputValidationError("checks_failed")`` carrying the whole document if any check failed.

    ``checks`` is a ``{"passed", "checks": [{"name", "passed", "detail"}, ...]}`` document, as the media
    checks (:mod:`sandbox.ffmpeg`) and the batch checks (:mod:`sandbox.vllm`) both write it.
    """
    failed = [c["name"] for c in checks["checks"] if not c["passed"]]
    if failed:
        raise OutputValidationError(
            "checks_failed",
            "the output failed its checks: " + ", ".join(failed),
            details={"checks": checks, "failed": failed},
        )
