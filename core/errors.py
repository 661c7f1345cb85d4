"""Hearth's error tree: one root, failures carried as data.

::

    HearthError                      root; every error Hearth reports is one of these
    ├── RequestError                 the request itself is unusable (malformed, too large, wrong state)
    │   ├── NotFoundError            a job, quote or resource that does not exist
    │   └── ConflictError            a job_id re-used with a different body, or a state clash
    ├── AuthError                    the signature, DID or claims of a signed request fail
    ├── PolicyError                  the operator's policy refuses the job before any capacity is held
    ├── PricingError                 no bid: the ask exceeds max_price, or pricing itself failed
    ├── CapacityError                not enough free capacity right now (retryable)
    ├── BudgetError                  a requester's own budget refuses a spend before anything is signed
    ├── FundingError                 a job's funding is unusable: terms, authorization, escrow entry
    ├── SettlementError              a receipt cannot settle the job: signer, digest, amount, simulation
    ├── ChainError                   the chain's RPC is unreachable or answers nonsense (retryable)
    ├── JournalError                 the journal could not record a fact (retryable)
    │   └── IllegalTransitionError   a state change the lifecycle forbids (never written)
    ├── StorageError                 a blob, block or input could not be stored, fetched or verified
    ├── ExecutionError               the workload failed in its sandbox (OOM, timeout, output cap, exit)
    ├── OutputValidationError        the output does not pass the envelope's checks
    ├── RegistryError                a registry did not take the node's offer (retried with backoff)
    └── ConfigError                  node.toml or the environment is invalid (raised at start)

Every error carries ``code`` (a stable snake_case identifier agents can switch on), ``domain`` (one of the
lifecycle's failure domains), ``retryable`` (whether the same request may succeed later) and ``details``.
None carries an HTTP status: the node's HTTP boundary (``node.http_errors.status_of``) chooses it from the
error's class and code, and renders ``{"error": {...}}`` in one place.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Domain = Literal[
    "auth",
    "request",
    "pricing",
    "scheduling",
    "funding",
    "budget",
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

    Subclasses fix the default domain; each raise names a ``code`` that says exactly what went
    wrong. Foreign exceptions (sqlite3, aiohttp, nacl, ...) are translated into these at the boundary.
    """

    domain: Domain = "internal"
    retryable: bool = False

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retryable: bool | None = None,
        domain: Domain | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}
        if retryable is not None:
            self.retryable = retryable
        if domain is not None:
            self.domain = domain

    def to_dict(self) -> dict[str, Any]:
        """The wire shape of docs/protocol.md: ``{"error": {code, domain, message, retryable, details}}``."""
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


class NotFoundError(RequestError):
    """Raised when the job, quote or blob named does not exist on this node."""


class ConflictError(RequestError):
    """Raised when a job_id is re-used with a different body, or an action clashes with the job's state."""


class AuthError(HearthError):
    """Raised when a signed request fails verification: signature, DID method, kid, aud, time or replay.

    Always raised before any side effect; the request leaves no trace but a metric.
    """

    domain: Domain = "auth"


class PolicyError(HearthError):
    """Raised when the operator's policy screens a job out (denied DID, kind not offered, limits).

    Screening happens before any capacity is reserved, so a policy refusal holds nothing.
    """

    domain: Domain = "pricing"


class PricingError(HearthError):
    """Raised when the node will not bid: its ask is above ``max_price`` or the pricing script failed.

    A rejection for price carries the node's ask in ``details["ask"]`` so the requester can decide.
    """

    domain: Domain = "pricing"


class CapacityError(HearthError):
    """Raised when the job fits the policy but not the capacity free right now. Retry later."""

    domain: Domain = "scheduling"
    retryable = True


class BudgetError(HearthError):
    """Raised on a requester's side when one of its local budgets (per workflow, per UTC day, attempts per
    idempotency key) would be overspent; raised before anything is signed, so it leaves no trace.

    ``details`` says what is left of every budget the spend was checked against.
    """

    domain: Domain = "budget"


class JournalError(HearthError):
    """Raised when the journal (SQLite) cannot record a fact; the action it guarded did not happen."""

    domain: Domain = "internal"
    retryable = True


class IllegalTransitionError(JournalError):
    """Raised when a job would move between states the lifecycle does not connect. Nothing is written."""

    retryable = False


class StorageError(HearthError):
    """Raised when content cannot be stored, fetched or verified: a CID or sha256 mismatch, a gateway down.

    A mismatch is never retryable (the bytes are wrong); an unreachable gateway is.
    """

    domain: Domain = "storage"


class ExecutionError(HearthError):
    """Raised when a workload fails inside its sandbox; ``code`` says how (``oom_killed``, ``timeout``, ...).

    Differs from :class:`OutputValidationError` in that the workload did not finish; the output is not judged.
    """

    domain: Domain = "execution"


class OutputValidationError(HearthError):
    """Raised when a finished workload's output fails the envelope's checks (duration, streams, size)."""

    domain: Domain = "validation"


class ConfigError(HearthError):
    """Raised at start (or on reload) when node.toml or an env override is invalid; names the field."""

    domain: Domain = "config"


class FundingError(HearthError):
    """Raised when a job's funding is unusable: terms the node cannot accept, a bad EIP-3009 authorization,
    an escrow entry with other terms than the quote's. Nothing is held or sent when it is raised.
    """

    domain: Domain = "funding"


class SettlementError(HearthError):
    """Raised when a validator receipt cannot settle the job: a wrong signer, digest, amount or provider,
    or a release the escrow would revert in simulation. The job stays as it was.
    """

    domain: Domain = "settlement"


class ChainError(HearthError):
    """Raised when the chain's RPC cannot be reached or answers nonsense; the action is retried later.

    Differs from :class:`SettlementError` in that nothing is wrong with the request, only with the chain.
    """

    domain: Domain = "settlement"
    retryable = True


class RegistryError(HearthError):
    """Raised when pushing the node's signed offer to a registry fails: unreachable, timed out, or answered
    with an error status. ``code`` is ``registry_unreachable``, ``registry_timeout``,
    ``registry_refused`` (4xx: it will not take this offer) or ``registry_failed`` (5xx and other statuses).

    Never reaches a requester: the push task backs off and tries again, and the node keeps working.
    """

    domain: Domain = "callback"
    retryable = True
