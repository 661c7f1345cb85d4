"""Hearth's error tree: one root, failures carried as data.

::

    HearthError                      root; every error the node reports is one of these
    ├── RequestError                 the request itself is unusable (400/404/409/413/422)
    │   ├── NotFoundError            a job, quote or resource that does not exist (404)
    │   └── ConflictError            a job_id re-used with a different body, or a state clash (409)
    ├── AuthError                    the signature, DID or claims of a signed request fail (400/401/403/409)
    ├── PolicyError                  the operator's policy refuses the job before any capacity is held
    ├── PricingError                 no bid: the ask exceeds max_price, or pricing itself failed
    ├── CapacityError                not enough free capacity right now (retryable, 503/429)
    ├── JournalError                 the journal could not record a fact (500, retryable)
    │   └── IllegalTransitionError   a state change the lifecycle forbids (never written)
    ├── StorageError                 a blob, block or input could not be stored, fetched or verified
    ├── ExecutionError               the workload failed in its sandbox (OOM, timeout, output cap, exit)
    ├── OutputValidationError        the output does not pass the envelope's checks
    ├── RegistryError                a registry did not take the node's offer (retried with backoff)
    └── ConfigError                  node.toml or the environment is invalid (raised at start)

Every error carries ``code`` (a stable snake_case identifier agents can switch on), ``domain`` (one of the
lifecycle's failure domains), ``retryable`` (whether the same request may succeed later) and ``details``.
The HTTP layer turns any of them into ``{"error": {...}}`` with :attr:`HearthError.http_status` in one place.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Domain = Literal[
    "auth",
    "request",
    "pricing",
    "scheduling",
    "funding",
    "execution",
    "storage",
    "validation",
    "settlement",
    "callback",
    "config",
    "internal",
]
DOMAINS: tuple[str, ...] = get_args(Domain)


class HearthError(Exception):
    """Root of every error Hearth raises on purpose.

    Subclasses fix the default domain and status; each raise names a ``code`` that says exactly what went
    wrong. Foreign exceptions (sqlite3, aiohttp, nacl, ...) are translated into these at the boundary.
    """

    domain: Domain = "internal"
    http_status: int = 500
    retryable: bool = False

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        http_status: int | None = None,
        retryable: bool | None = None,
        domain: Domain | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}
        if http_status is not None:
            self.http_status = http_status
        if retryable is not None:
            self.retryable = retryable
        if domain is not None:
            self.domain = domain

    def to_dict(self) -> dict[str, Any]:
        """The wire shape of DESIGN §9: ``{"error": {code, domain, message, retryable, details}}``."""
        return {
            "error": {
                "code": self.code,
                "domain": self.domain,
                "message": self.message,
                "retryable": self.retryable,
                "details": self.details,
            }
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class RequestError(HearthError):
    """Raised when the request cannot be used as sent: malformed JSON, a bad envelope, an oversized body.

    Differs from :class:`AuthError` in that nothing about the signer is in question.
    """

    domain: Domain = "request"
    http_status = 400


class NotFoundError(RequestError):
    """Raised when the job, quote or blob named does not exist on this node."""

    http_status = 404


class ConflictError(RequestError):
    """Raised when a job_id is re-used with a different body, or an action clashes with the job's state."""

    http_status = 409


class AuthError(HearthError):
    """Raised when a signed request fails verification: signature, DID method, kid, aud, time or replay.

    Always raised before any side effect; the request leaves no trace but a metric.
    """

    domain: Domain = "auth"
    http_status = 401


class PolicyError(HearthError):
    """Raised when the operator's policy screens a job out (denied DID, kind not offered, limits).

    Screening happens before any capacity is reserved, so a policy refusal holds nothing.
    """

    domain: Domain = "pricing"
    http_status = 403


class PricingError(HearthError):
    """Raised when the node will not bid: its ask is above ``max_price`` or the pricing script failed.

    A rejection for price carries the node's ask in ``details["ask"]`` so the requester can decide.
    """

    domain: Domain = "pricing"
    http_status = 402


class CapacityError(HearthError):
    """Raised when the job fits the policy but not the capacity free right now. Retry later."""

    domain: Domain = "scheduling"
    http_status = 503
    retryable = True


class JournalError(HearthError):
    """Raised when the journal (SQLite) cannot record a fact; the action it guarded did not happen."""

    domain: Domain = "internal"
    http_status = 500
    retryable = True


class IllegalTransitionError(JournalError):
    """Raised when a job would move between states the lifecycle does not connect. Nothing is written."""

    http_status = 409
    retryable = False


class StorageError(HearthError):
    """Raised when content cannot be stored, fetched or verified: a CID or sha256 mismatch, a gateway down.

    A mismatch is never retryable (the bytes are wrong); an unreachable gateway is.
    """

    domain: Domain = "storage"
    http_status = 502


class ExecutionError(HearthError):
    """Raised when a workload fails inside its sandbox; ``code`` says how (``oom_killed``, ``timeout``, ...).

    Differs from :class:`OutputValidationError` in that the workload did not finish; the output is not judged.
    """

    domain: Domain = "execution"
    http_status = 500


class OutputValidationError(HearthError):
    """Raised when a finished workload's output fails the envelope's checks (duration, streams, size)."""

    domain: Domain = "validation"
    http_status = 422


class ConfigError(HearthError):
    """Raised at start (or on reload) when node.toml or an env override is invalid; names the field."""

    domain: Domain = "config"
    http_status = 500


class FundingError(HearthError):
    """Raised when a job's funding is unusable: terms the node cannot accept, a bad EIP-3009 authorization,
    an escrow entry with other terms than the quote's. Nothing is held or sent when it is raised.
    """

    domain: Domain = "funding"
    http_status = 422


class SettlementError(HearthError):
    """Raised when a validator receipt cannot settle the job: a wrong signer, digest, amount or provider,
    or a release the escrow would revert in simulation. The job stays as it was.
    """

    domain: Domain = "settlement"
    http_status = 422


class ChainError(HearthError):
    """Raised when the chain's RPC cannot be reached or answers nonsense; the action is retried later.

    Differs from :class:`SettlementError` in that nothing is wrong with the request, only with the chain.
    """

    domain: Domain = "settlement"
    http_status = 503
    retryable = True


class RegistryError(HearthError):
    """Raised when pushing the node's signed offer to a registry fails: unreachable, timed out, or answered
    with an error status. ``code`` is ``registry_unreachable``, ``registry_timeout``,
    ``registry_refused`` (4xx: it will not take this offer) or ``registry_failed`` (5xx and other statuses).

    Never reaches a requester: the push task backs off and tries again, and the node keeps working.
    """

    domain: Domain = "callback"
    http_status = 502
    retryable = True
