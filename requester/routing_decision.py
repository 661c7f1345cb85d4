"""What routing decided and why (:mod:`requester.routing`): the strategy, every candidate with its ask,
refusal or reason to be left out, each submission attempt, the job, and the structured refusal when nothing
was submitted. Everything here is plain data with ``to_json()``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal

from core import defaults as d
from core.errors import HearthError
from payments.receipts import FundingTerms
from requester.market import Provider
from requester.reputation import Reputation

DEFAULT_MIN_SETTLED: Final = d.DEFAULT_ROUTING_MIN_SETTLED
DEFAULT_MAX_FAILURE_RATE: Final = d.DEFAULT_ROUTING_MAX_FAILURE_RATE

StrategyName = d.RoutingStrategy
STRATEGIES: Final[tuple[StrategyName, ...]] = d.ROUTING_STRATEGIES
CandidateStatus = Literal["quoted", "refused", "unreachable", "unfit", "ineligible"]
# refused: the requester's own guard (its budgets, the node an idempotency key is pinned to) stopped the job
# before the winner was asked to take it; nothing was sent or signed
Outcome = Literal["submitted", "no_provider", "outcome_unknown", "funding_failed", "refused"]
Step = Literal["accept", "fund"]
Heard = Literal["ok", "refused", "not_sent", "unknown"]


@dataclass(frozen=True)
class Strategy:
    """How the winner is chosen: ``cheapest``, or ``reputation`` (the cheapest among providers with at
    least ``min_settled`` settled jobs and a failure rate of at most ``max_failure_rate``)."""

    name: StrategyName = "cheapest"
    min_settled: int = DEFAULT_MIN_SETTLED
    max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise HearthError("usage", f"unknown strategy {self.name!r}", domain="request")
        if self.min_settled < 0 or not 0.0 <= self.max_failure_rate <= 1.0:
            raise HearthError(
                "usage", "min_settled must be >= 0 and max_failure_rate within [0, 1]", domain="request"
            )

    def ineligible(self, rep: Reputation | None) -> str | None:
        """Why a provider with record ``rep`` cannot win under this strategy (None: it can)."""
        if self.name != "reputation":
            return None
        if rep is None:
            return "no reputation record on chain"
        if rep.jobs_settled < self.min_settled:
            return f"{rep.jobs_settled} settled jobs, fewer than {self.min_settled}"
        if rep.failure_rate > self.max_failure_rate:
            return f"failure rate {rep.failure_rate:.0%} above {self.max_failure_rate:.0%}"
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidate:
    """One provider as routing saw it: ``quoted`` (with its ``ask``), ``refused`` (the node's code, and its
    ask when the refusal carries one), ``unreachable``, ``unfit`` or ``ineligible`` (left out unasked)."""

    provider: Provider
    status: CandidateStatus
    message: str = ""
    code: str | None = None
    ask: Decimal | None = None
    quote_jwt: str | None = field(default=None, repr=False)
    job: str | None = None  # the node's job id in the quote
    terms: FundingTerms | None = field(default=None, repr=False)  # the quote's escrow terms, checked

    @property
    def did(self) -> str:
        return self.provider.did

    def rank_key(self) -> tuple[Decimal, int, float, str]:
        """Cheapest first; then more settled jobs, a lower failure rate, and the DID."""
        rep = self.provider.reputation
        settled, rate = (rep.jobs_settled, rep.failure_rate) if rep is not None else (0, 0.0)
        return (self.ask if self.ask is not None else Decimal("Infinity"), -settled, rate, self.did)

    def to_json(self) -> dict[str, Any]:
        rep = self.provider.reputation
        return {
            "did": self.did,
            "wallet": self.provider.wallet,
            "endpoint": self.provider.endpoint,
            "status": self.status,
            "ask": None if self.ask is None else str(self.ask),
            "code": self.code,
            "message": self.message,
            "reputation": None
            if rep is None
            else {
                "jobs_settled": rep.jobs_settled,
                "jobs_funded": rep.jobs_funded,
                "failure_rate": rep.failure_rate,
            },
        }


@dataclass(frozen=True)
class Attempt:
    """One submission request: to which node, which step, which try, and what came of it."""

    node: str
    endpoint: str
    step: Step
    attempt: int
    outcome: Heard
    status: int | None
    code: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SubmittedJob:
    """The job a node accepted (``state`` as its last answer said), or the one whose outcome is unknown."""

    id: str
    job_id: str
    node: str
    endpoint: str
    state: str | None
    accepted_now: bool | None
    funding: dict[str, Any] | None = None  # the escrow terms and authorization sent, when paying

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoutingDecision:
    """What :func:`route` did and why; ``error`` is the structured refusal when nothing was submitted."""

    job_id: str
    strategy: Strategy
    outcome: Outcome
    candidates: list[Candidate]
    attempts: list[Attempt] = field(default_factory=list)
    winner: str | None = None
    reason: str = ""
    job: SubmittedJob | None = None
    error: HearthError | None = None

    @property
    def submitted(self) -> bool:
        return self.outcome == "submitted"

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "strategy": self.strategy.to_json(),
            "outcome": self.outcome,
            "winner": self.winner,
            "reason": self.reason,
            "candidates": [c.to_json() for c in self.candidates],
            "attempts": [a.to_json() for a in self.attempts],
            "job": None if self.job is None else self.job.to_json(),
            "error": None if self.error is None else self.error.to_dict()["error"],
        }


def explain(winner: Candidate, ranked: list[Candidate], passed: list[Candidate], strategy: Strategy) -> str:
    """Why ``winner`` won: the asks it beat (``ranked``, cheapest first), the strategy's threshold, a tie
    broken, and the cheaper candidates ``passed`` over because they refused or could not be reached."""
    standing = [c for c in ranked if c not in passed]
    left = " left" if passed else ""
    others = [shown(c.ask) for c in standing if c is not winner]
    if not others:
        why = f"the only quote{left}: {shown(winner.ask)} USDC"
    else:
        why = f"cheapest of {len(standing)} quotes{left}: {shown(winner.ask)} USDC vs {', '.join(others)}"
    if strategy.name == "reputation":
        why += (
            f" (among providers with >= {strategy.min_settled} settled jobs and failure rate <= "
            f"{strategy.max_failure_rate:.0%})"
        )
    tied = [c for c in standing if c is not winner and c.ask == winner.ask]
    if tied:
        why += f"; tie on price broken by record, then DID (over {', '.join(c.did for c in tied)})"
    if passed:
        why += "; passed over at submission: " + ", ".join(
            f"{c.did} at {shown(c.ask)} USDC ({c.code})" for c in passed
        )
    return why


def shown(amount: Decimal | None) -> str:
    """An amount for people: ``0.012000`` -> ``0.012``, ``0.020000`` -> ``0.02``, ``5`` -> ``5``."""
    if amount is None:
        return "-"
    text = f"{amount:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def brief(c: Candidate) -> dict[str, Any]:
    return {"did": c.did, "status": c.status, "code": c.code, "ask": None if c.ask is None else str(c.ask)}


def no_provider(candidates: list[Candidate], asked: list[Candidate], strategy: Strategy) -> HearthError:
    details = {"candidates": [brief(c) for c in candidates]}
    if not candidates:
        return HearthError("no_provider", "no provider to route to", details=details, domain="request")
    if strategy.name == "reputation" and all(c.status in ("ineligible", "unfit") for c in candidates):
        return HearthError(
            "no_qualified_provider",
            f"no provider has >= {strategy.min_settled} settled jobs with a failure rate <= "
            f"{strategy.max_failure_rate:.0%} and an offer that fits",
            details=details,
            domain="request",
        )
    if not asked:
        return HearthError(
            "no_fitting_provider", "no provider's offer fits the job", details=details, domain="request"
        )
    return HearthError(
        "no_quote",
        f"none of the {len(asked)} providers asked quoted the job",
        details=details,
        domain="request",
    )


__all__ = [
    "STRATEGIES",
    "Attempt",
    "Candidate",
    "RoutingDecision",
    "Strategy",
    "SubmittedJob",
    "brief",
    "explain",
    "no_provider",
    "shown",
]
