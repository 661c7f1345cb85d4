"""What the journal hands out and takes in: immutable records of its rows, and the checks on written values.

Each record is one row as it was when read (read again to see later changes). The helpers below turn rows
into records and validate the values a caller asks to write before any SQL runs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypedDict, cast

import orjson

from core.errors import DOMAINS, Domain
from core.lifecycle import JOB_STATES, EventType, JobState

__all__ = [
    "REGISTRY_PURPOSES",
    "TX_OPEN_STATES",
    "Event",
    "FundingState",
    "HeldResources",
    "JobFields",
    "JobRecord",
    "Listener",
    "PaymentRecord",
    "TxPurpose",
    "TxRecord",
    "TxState",
    "WebhookDue",
]

_PRICE_RE: Final = re.compile(r"^(0|[1-9][0-9]{0,17})(\.[0-9]{1,18})?$")


class JobFields(TypedDict, total=False):
    """The job columns a transition may change besides ``state``; anything else is fixed at creation."""

    price: str | None
    quote_id: str | None
    quote_jwt: str | None
    quote_expires_at: float | None
    attempts: int
    failure_domain: Domain | None
    failure_code: str | None
    failure_message: str | None
    failure_retryable: bool | None
    result_json: Mapping[str, Any] | str | None


_MUTABLE_FIELDS: Final = frozenset(JobFields.__annotations__)
_QUOTE_FIELDS: Final = ("price", "quote_id", "quote_jwt", "quote_expires_at")


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One row of ``jobs`` as it was when read. Immutable; read again to see later changes."""

    id: str
    iss: str
    job_id: str
    kind: str
    idem_key: str
    envelope_hash: str
    envelope_json: str
    state: JobState
    price: str | None
    quote_id: str | None
    quote_jwt: str | None
    quote_expires_at: float | None
    cpus: float
    memory_mb: int
    gpus: int
    attempts: int
    failure_domain: str | None
    failure_code: str | None
    failure_message: str | None
    failure_retryable: bool | None
    result_json: str | None
    created_at: float
    updated_at: float

    @property
    def envelope(self) -> dict[str, Any]:
        """The recorded envelope, parsed afresh on each access (callers may mutate their copy)."""
        return cast(dict[str, Any], json.loads(self.envelope_json))

    @property
    def result(self) -> dict[str, Any] | None:
        """The recorded result document, if any, parsed afresh on each access."""
        return None if self.result_json is None else cast(dict[str, Any], json.loads(self.result_json))

    @property
    def failure(self) -> dict[str, Any] | None:
        """Why the job last failed (``domain``, ``code``, ``message``, ``retryable``), or None."""
        if self.failure_domain is None:
            return None
        return {
            "domain": self.failure_domain,
            "code": self.failure_code,
            "message": self.failure_message,
            "retryable": self.failure_retryable,
        }

    @property
    def resources(self) -> tuple[float, int, int]:
        """``(cpus, memory_mb, gpus)`` this job holds while it holds capacity."""
        return (self.cpus, self.memory_mb, self.gpus)

    def holds_capacity(self, now: float) -> bool:
        """Whether this job counts against capacity at ``now`` (live quote, accepted or running)."""
        if self.state == "priced":
            return self.quote_expires_at is not None and self.quote_expires_at > now
        return self.state in ("accepted", "running")


@dataclass(frozen=True, slots=True)
class Event:
    """One row of the append-only ``events`` log: a transition, or a progress/note entry (no state change)."""

    seq: int
    job: str
    at: float
    type: EventType
    from_state: JobState | None
    to_state: JobState | None
    actor: str
    reason: str
    domain: str | None
    retryable: bool | None
    data_json: str | None

    @property
    def data(self) -> dict[str, Any] | None:
        return None if self.data_json is None else cast(dict[str, Any], json.loads(self.data_json))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view, e.g. for the SSE stream of ``GET /v1/jobs/{id}/events``."""
        return {
            "seq": self.seq,
            "job": self.job,
            "at": self.at,
            "type": self.type,
            "from": self.from_state,
            "to": self.to_state,
            "actor": self.actor,
            "reason": self.reason,
            "domain": self.domain,
            "retryable": self.retryable,
            "data": self.data,
        }


Listener = Callable[[Event], None]

FundingState = Literal["awaiting", "funded", "refused"]
TxPurpose = Literal["fund", "release", "refund", "register", "leave"]
REGISTRY_PURPOSES: Final[tuple[TxPurpose, ...]] = ("register", "leave")
"""The wallet's own listing in the provider registry: transactions that belong to no job."""
TxState = Literal["signed", "sent", "mined", "confirmed", "reverted", "dropped"]
TX_OPEN_STATES: Final[tuple[TxState, ...]] = ("signed", "sent", "mined")
"""A transaction in one of these may still land: it is resolved by hash before anything else is sent."""


@dataclass(frozen=True, slots=True)
class WebhookDue:
    """A job's webhook with a transition the requester has not acknowledged yet: the next to deliver."""

    job: str
    url: str
    attempts: int
    event: Event


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """One job's escrow terms and where its funding and settlement stand (``payments`` table)."""

    job: str
    escrow_job_id: str
    terms_json: str
    authorization_json: str | None
    funding: FundingState
    wait_until: float
    receipt_json: str | None
    created_at: float
    updated_at: float

    @property
    def terms(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(self.terms_json))

    @property
    def authorization(self) -> dict[str, Any] | None:
        return (
            None
            if self.authorization_json is None
            else cast(dict[str, Any], json.loads(self.authorization_json))
        )

    @property
    def receipt(self) -> dict[str, Any] | None:
        return None if self.receipt_json is None else cast(dict[str, Any], json.loads(self.receipt_json))


@dataclass(frozen=True, slots=True)
class TxRecord:
    """One transaction the node signed (``chain_txs``): recorded before broadcast, resolved by hash after.

    ``job`` is the job a payment transaction belongs to; None for a registry one (``register``, ``leave``).
    """

    id: int
    job: str | None
    purpose: TxPurpose
    sender: str
    nonce: int
    hash: str
    raw: str
    state: TxState
    block_number: int | None
    block_hash: str | None
    gas_used: int | None
    gas_price: int | None
    error: str | None
    created_at: float
    updated_at: float

    def as_dict(self) -> dict[str, Any]:
        """The public view (no raw bytes)."""
        return {
            "purpose": self.purpose,
            "hash": self.hash,
            "nonce": self.nonce,
            "state": self.state,
            "block_number": self.block_number,
            "gas_used": self.gas_used,
            "gas_price": self.gas_price,
            "error": self.error,
            "created_at": self.created_at,
        }


HeldResources = tuple[str, float, int, int, float | None, str]
"""``(job id, cpus, memory_mb, gpus, expires_at, iss)``: one hold of the capacity ledger and its requester."""

# --------------------------------------------------------------------------------------------- rows


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode()


def _with_flag(row: tuple[Any, ...], at: int) -> list[Any]:
    """``row`` with the 0/1 column at index ``at`` turned into a bool (NULL stays None)."""
    values = list(row)
    if values[at] is not None:
        values[at] = bool(values[at])
    return values


def _job(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(*_with_flag(row, -4))  # failure_retryable


def _event(row: tuple[Any, ...]) -> Event:
    return Event(*_with_flag(row, -2))  # retryable


# --------------------------------------------------------------------------------------------- checks


def _check_state(state: str) -> None:
    if state not in JOB_STATES:
        raise ValueError(f"unknown job state {state!r}")


def _check_price(price: str | None) -> None:
    if price is not None and not (isinstance(price, str) and _PRICE_RE.match(price)):
        raise ValueError(f"price must be a plain decimal string, not {price!r}")


def _check_time(name: str, value: float | None) -> None:
    if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")


def _check_domain(domain: str | None) -> None:
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"unknown failure domain {domain!r}; one of {', '.join(DOMAINS)}")


def _column_values(fields: JobFields) -> dict[str, Any]:
    """Validate ``fields`` and turn them into column values (JSON text, 0/1 flags)."""
    unknown = set(fields) - _MUTABLE_FIELDS
    if unknown:
        raise ValueError(f"fields not changeable by a transition: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = dict(fields)
    if "price" in fields:
        _check_price(fields["price"])
    if "quote_expires_at" in fields:
        _check_time("quote_expires_at", fields["quote_expires_at"])
    if "attempts" in fields:
        attempts = fields["attempts"]
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            raise ValueError(f"attempts must be a non-negative int, not {attempts!r}")
    if "failure_domain" in fields:
        _check_domain(fields["failure_domain"])
    if "failure_retryable" in fields:
        flag = fields["failure_retryable"]
        values["failure_retryable"] = None if flag is None else int(bool(flag))
    if "result_json" in fields:
        result = fields["result_json"]
        if isinstance(result, str):
            json.loads(result)  # refuse text that is not JSON before it is recorded
        elif result is not None:
            values["result_json"] = _dumps(result)
    return values
