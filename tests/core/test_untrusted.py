"""core.untrusted: the bounded JSON parser every boundary uses."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.untrusted import DEFAULT_MAX_DEPTH, MAX_INT_DIGITS, UntrustedJSONError, parse_json


def reason(data: bytes | str, **kw: Any) -> str:
    with pytest.raises(UntrustedJSONError) as info:
        parse_json(data, **kw)
    return info.value.reason


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**MAX_INT_DIGITS) + 1, max_value=10**MAX_INT_DIGITS - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@given(JSON_VALUES)
def test_every_bounded_value_round_trips(value: Any) -> None:
    assert parse_json(json.dumps(value).encode()) == value
    assert parse_json(json.dumps(value, ensure_ascii=True)) == value


@pytest.mark.parametrize("depth", [DEFAULT_MAX_DEPTH + 1, 100, 5_000, 200_000])
@pytest.mark.parametrize(("opener", "closer"), [("[", "]"), ('{"a":', "}")])
def test_depth_bombs_are_refused(depth: int, opener: str, closer: str) -> None:
    assert reason(opener * depth + "0" + closer * depth) == "too_deep"


def test_the_depth_bound_is_exact_and_configurable() -> None:
    at_bound = "[" * DEFAULT_MAX_DEPTH + "]" * DEFAULT_MAX_DEPTH
    assert parse_json(at_bound) is not None
    assert reason("[" + at_bound + "]") == "too_deep"
    assert reason("[[[1]]]", max_depth=2) == "too_deep"
    assert parse_json("[[1]]", max_depth=2) == [[1]]
    # wide is not deep: many brackets side by side pass
    assert len(parse_json("[" + ",".join(["[]"] * 10_000) + "]")) == 10_000


@pytest.mark.parametrize("text", ["1" * (MAX_INT_DIGITS + 1), "-" + "9" * 5_000, "1" * 100_000])
def test_integers_longer_than_uint256_are_refused(text: str) -> None:
    assert reason(text) == "number_out_of_range"
    assert reason(f'{{"a":[{text}]}}') == "number_out_of_range"


def test_every_uint256_parses() -> None:
    assert parse_json(str(2**256 - 1)) == 2**256 - 1
    assert parse_json("-" + "9" * MAX_INT_DIGITS) == -int("9" * MAX_INT_DIGITS)


@pytest.mark.parametrize("text", ["1e400", "-1e400", "1E+999", "[0.5, 2e308]", '{"x": -9e99999}'])
def test_floats_that_overflow_are_refused(text: str) -> None:
    assert reason(text) == "number_out_of_range"


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "[NaN]"])
def test_non_json_constants_are_refused(text: str) -> None:
    assert reason(text) == "not_json"


def test_tiny_floats_underflow_to_zero_as_json_allows() -> None:
    assert parse_json("1e-400") == 0.0
    assert math.isfinite(parse_json("1.7976931348623157e308"))


@pytest.mark.parametrize("text", ['{"a":1,"a":2}', '{"x":{"b":1,"c":2,"b":3}}', '[{"k":1,"k":1}]'])
def test_duplicate_member_names_are_refused(text: str) -> None:
    assert reason(text) == "duplicate_member"


@pytest.mark.parametrize("text", ['"\\ud800"', '{"\\udfff":1}', '["ok","\\ud83d"]', '"\\ude00\\ud83d"'])
def test_lone_surrogates_are_refused(text: str) -> None:
    assert reason(text) == "bad_unicode"


def test_surrogate_pairs_are_text() -> None:
    assert parse_json('"\\ud83d\\ude00"') == "\U0001f600"


@pytest.mark.parametrize("data", [b"\xff\xfe{}", b'"\xc3"', b"\xed\xa0\x80"])
def test_bytes_must_be_utf8(data: bytes) -> None:
    assert reason(data) == "not_utf8"


@pytest.mark.parametrize("text", ["", "{", "[1,]", "{'a':1}", "01", "\ufeff{}", "1 2", "tru"])
def test_what_is_not_json_is_refused(text: str) -> None:
    assert reason(text) == "not_json"


def test_the_error_is_a_value_error_with_a_short_message() -> None:
    with pytest.raises(ValueError) as info:
        parse_json("[" * 10_000)
    assert len(str(info.value)) < 200


def test_a_depth_bomb_never_reaches_the_recursion_limit() -> None:
    # Libraries raise the recursion limit (hypothesis does); the depth is refused before the C parser
    # recurses, so the process's stack is never at stake, whatever the limit.
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1_000_000)
    try:
        for opener, closer in (("[", "]"), ('{"a":', "}")):
            assert reason(opener * 500_000 + "0" + closer * 500_000) == "too_deep"
            assert reason(opener * 500_000) == "too_deep"  # never closed
    finally:
        sys.setrecursionlimit(old)


def test_brackets_inside_strings_do_not_count() -> None:
    text = '["' + "[" * 10_000 + '", "' + "{" * 10_000 + '\\"[[["]'
    assert parse_json(text) == ["[" * 10_000, "{" * 10_000 + '"[[[']


@pytest.mark.parametrize(
    "text",
    [
        '["' + '\\"' * 100_000,  # a string that never ends, full of escaped quotes
        '"' * 100_001 + "[" * 40,  # quotes that pair up, then openers
        "[" * 20 + '"' + "\\" * 100_001,
    ],
)
def test_adversarial_strings_cost_linear_time(text: str) -> None:
    # The CPU time of this thread, not the wall clock: other processes on the machine cannot add to it.
    # A linear scan of these takes milliseconds of it; a quadratic one (10**10 steps) takes minutes.
    started = time.thread_time()
    with pytest.raises(UntrustedJSONError):
        parse_json(text)
    assert time.thread_time() - started < 2.0


def test_unclosed_openers_within_the_bound_are_just_not_json() -> None:
    assert reason("[" * DEFAULT_MAX_DEPTH) == "not_json"
    assert (
        reason("[" * (DEFAULT_MAX_DEPTH - 1) + "[" * DEFAULT_MAX_DEPTH + "]" * DEFAULT_MAX_DEPTH)
        == "not_json"
    )
    assert reason("[" * (DEFAULT_MAX_DEPTH + 1)) == "too_deep"
