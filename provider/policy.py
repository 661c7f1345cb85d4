"""Operator policy: screens a job out before any capacity is reserved (the README's Bidding).

Like Bacalhau's bid strategies, each rule is one small check behind one interface: it looks at the
:class:`Screening` and returns the error to refuse with, or None. :func:`screen` runs them in order and
raises the first refusal, so a refused job holds nothing and costs the node nothing but this call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.config import PolicySection
from core.envelope import FfmpegTranscodeEnvelope, VllmBatchEnvelope
from core.errors import CapacityError, HearthError, PolicyError

Envelope = FfmpegTranscodeEnvelope | VllmBatchEnvelope


@dataclass(frozen=True, slots=True)
class Screening:
    """Everything a policy check may look at: the job, who sent it, the policy, the sender's active jobs."""

    env: Envelope
    iss: str
    policy: PolicySection
    active_for_did: int


# A check returns the refusal to raise, or None to let the job through.
PolicyCheck = Callable[[Screening], HearthError | None]


def check_did(s: Screening) -> HearthError | None:
    """Refuse a requester on the deny list, or missing from a non-empty allow list."""
    if s.iss in s.policy.deny_dids:
        reason = "the requester DID is on this node's deny list"
    elif s.policy.allow_dids and s.iss not in s.policy.allow_dids:
        reason = "the requester DID is not on this node's allow list"
    else:
        return None
    return PolicyError("did_denied", reason, details={"iss": s.iss}, domain="auth")


def check_kind(s: Screening) -> HearthError | None:
    """Refuse a job kind this node does not offer."""
    if s.env.kind in s.policy.kinds:
        return None
    return PolicyError(
        "kind_not_offered",
        f"this node does not offer {s.env.kind} jobs",
        details={"kind": s.env.kind, "offered": list(s.policy.kinds)},
    )


def check_limits(s: Screening) -> HearthError | None:
    """Refuse limits above the policy's maxima; names the first one exceeded and lists all of them."""
    limits = s.env.limits
    p = s.policy
    pairs: list[tuple[str, float, float]] = [
        ("timeout_seconds", limits.timeout_seconds, p.max_timeout_seconds),
        ("max_output_mb", limits.max_output_mb, p.max_output_mb),
        ("cpus", limits.cpus, p.max_cpus),
        ("memory_mb", limits.memory_mb, p.max_memory_mb),
        ("gpus", limits.gpus, p.max_gpus),
    ]
    exceeded = [{"limit": name, "asked": asked, "max": most} for name, asked, most in pairs if asked > most]
    if not exceeded:
        return None
    first = exceeded[0]
    return PolicyError(
        "limits_exceeded",
        f"limits.{first['limit']} = {first['asked']} is above this node's maximum of {first['max']}",
        details={**first, "exceeded": exceeded},
    )


def check_concurrency(s: Screening) -> HearthError | None:
    """Refuse (for now) a requester already running as many jobs as one DID may."""
    most = s.policy.per_did_concurrency
    if s.active_for_did < most:
        return None
    return CapacityError(
        "did_concurrency",
        f"this requester already has {s.active_for_did} active job(s); the limit per DID is {most}",
        details={"active": s.active_for_did, "max": most},
        retryable=True,
    )


# Order matters only for which refusal a job that breaks several rules sees: who, then what, then how much.
DEFAULT_CHECKS: tuple[PolicyCheck, ...] = (check_did, check_kind, check_limits, check_concurrency)


def screen(
    env: Envelope,
    iss: str,
    policy: PolicySection,
    *,
    active_for_did: int,
    checks: tuple[PolicyCheck, ...] = DEFAULT_CHECKS,
) -> None:
    """Run the policy checks in order and raise the first refusal; return None when the job may be bid on.

    Raises :class:`PolicyError` (``did_denied`` 403, ``kind_not_offered`` 422, ``limits_exceeded`` 422) or
    :class:`CapacityError` (``did_concurrency`` 429, retryable). Must run before any capacity is reserved.
    """
    screening = Screening(env=env, iss=iss, policy=policy, active_for_did=active_for_did)
    for check in checks:
        refusal = check(screening)
        if refusal is not None:
            raise refusal
