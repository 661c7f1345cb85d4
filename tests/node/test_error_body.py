"""The error path never fails: whatever an error's details carry, its answer is valid JSON in shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.errors import AuthError, BudgetError, HearthError, RequestError
from node.http_errors import error_body, status_of


class Opaque:
    def __repr__(self) -> str:
        raise RuntimeError("not even repr works")


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"d": value}
    return value


@pytest.mark.parametrize(
    "details",
    [
        {"got": 10**30},
        {"got": -(2**70), "also": [2**64, 2**63 - 1]},
        {"exp": float("inf"), "nan": float("nan")},
        {"name": "\ud800 lone"},
        {"\udfff": "key with a lone surrogate"},
        {"obj": Opaque(), "set": {1, 2}},
        {"deep": nested(5_000)},
        {"wide": list(range(100_000))},
        {1: "int key", (1, 2): "tuple key", Opaque(): "a key whose repr fails"},
    ],
)
def test_details_json_cannot_carry_still_give_a_json_error(details: dict[Any, Any]) -> None:
    exc = AuthError("malformed_jwt", "message \ud800", details=details)
    doc = json.loads(error_body(exc))
    err = doc["error"]
    assert set(err) == {"code", "domain", "message", "retryable", "details"}
    assert (err["code"], err["domain"], err["retryable"]) == ("malformed_jwt", "auth", False)
    assert isinstance(err["details"], dict)


def test_safe_details_keep_what_they_can() -> None:
    exc = RequestError("x", "m", details={"big": 10**30, "ok": 5, "inf": float("inf"), "list": [1, "a"]})
    details = json.loads(error_body(exc))["error"]["details"]
    assert details == {"big": str(10**30), "ok": 5, "inf": "inf", "list": [1, "a"]}


def test_an_ordinary_error_is_written_as_is() -> None:
    exc = HearthError("internal_error", "boom", details={"a": [1, 2.5, None, True]})
    assert json.loads(error_body(exc)) == exc.to_dict()


def test_status_is_chosen_at_the_boundary_from_class_and_code() -> None:
    from core.errors import CapacityError, ChainError, NotFoundError, StorageError
    from node.http_errors import DEFAULT_RETRY_AFTER_SECONDS, BoundaryError, retry_after_header

    assert status_of(NotFoundError("job_not_found", "x")) == 404
    assert status_of(AuthError("bad_signature", "x")) == 401
    assert status_of(BudgetError("budget_exceeded", "x")) == 402
    assert status_of(AuthError("wrong_audience", "x")) == 403  # a code of the class with its own status
    assert status_of(StorageError("blob_not_found", "x")) == 404
    assert status_of(StorageError("gateway_down", "x")) == 502
    assert status_of(BoundaryError("header_too_large", "x", status=431)) == 431
    assert status_of(BoundaryError("odd", "x", status=999)) == 500  # never a status outside 400-599
    # A retryable 503 that names no wait still says when to come back; one that names a wait says that.
    assert retry_after_header(ChainError("chain_unavailable", "x")) == str(DEFAULT_RETRY_AFTER_SECONDS)
    busy = CapacityError("insufficient_capacity", "x", details={"retry_after_seconds": 7.2})
    assert retry_after_header(busy) == "8"
    assert retry_after_header(NotFoundError("job_not_found", "x")) is None
