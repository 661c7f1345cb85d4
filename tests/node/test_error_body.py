"""The error path never fails: whatever an error's details carry, its answer is valid JSON in shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.errors import AuthError, HearthError, RequestError
from node.http_errors import error_body


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
    exc = AuthError("malformed_jwt", "message \ud800", details=details, http_status=400)
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
