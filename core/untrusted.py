"""Bounded parsing of JSON that comes from strangers: the one parser every boundary uses.

A request body, a JWT's header and payload, a validator's receipt, a batch line, a node's answer to a
requester: all are bytes someone else chose. :func:`parse_json` turns them into Python values or raises
:class:`UntrustedJSONError` (a ``ValueError``) naming what was wrong, and guarantees what the code past
the edge may rely on:

- nesting at most ``max_depth`` deep (a depth bomb is refused before Python's recursion limit is near);
- integers of at most :data:`MAX_INT_DIGITS` digits (every uint256 fits; a 5,000-digit number does not);
- finite floats only (``1e400`` parses to infinity in Python; here it is refused), no NaN/Infinity;
- no duplicate member names (parsers disagree on which one wins);
- valid Unicode: UTF-8 bytes, and no lone surrogate escapes such as ``"\\ud800"`` (I-JSON, RFC 7493), which
  JCS cannot canonicalise and UTF-8 encoders refuse.

Size is bounded by the caller (bodies are capped before they are read).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final, Literal

DEFAULT_MAX_DEPTH: Final = 32
"""Deep enough for every document Hearth reads (an envelope, a W3C credential, a chat batch line)."""
MAX_INT_DIGITS: Final = 78
"""The digits of 2**256: every on-chain amount fits; anything longer is no number Hearth uses."""

Reason = Literal["not_utf8", "not_json", "too_deep", "number_out_of_range", "duplicate_member", "bad_unicode"]


class UntrustedJSONError(ValueError):
    """Raised when untrusted bytes are not JSON within Hearth's bounds; ``reason`` says which bound."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message


def _int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise UntrustedJSONError(
            "number_out_of_range", f"an integer of {digits} digits (at most {MAX_INT_DIGITS} are accepted)"
        )
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UntrustedJSONError("number_out_of_range", f"the number {text[:40]} is too large for a float")
    return value


def _constant(name: str) -> Any:
    raise UntrustedJSONError("not_json", f"{name} is not JSON")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        names = [name for name, _ in pairs]
        duplicate = next(name for i, name in enumerate(names) if name in names[:i])
        raise UntrustedJSONError("duplicate_member", f"the member name {duplicate[:80]!r} appears twice")
    return obj


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_unique, parse_int=_int, parse_float=_float, parse_constant=_constant
)


def parse_json(data: bytes | str, *, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """The value ``data`` holds, within the bounds above; raises :class:`UntrustedJSONError` otherwise."""
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise UntrustedJSONError("not_utf8", "the JSON text is not UTF-8") from None
    else:
        text = data
    # Most documents have fewer brackets than the bound: they cannot be too deep.
    if text.count("[") + text.count("{") > max_depth and _too_deep(text, max_depth):
        raise UntrustedJSONError("too_deep", f"JSON nested deeper than {max_depth} levels")
    try:
        value = _DECODER.decode(text)
    except UntrustedJSONError:
        raise
    except RecursionError:  # unreachable past _too_deep; kept so that no input can ever crash a caller
        raise UntrustedJSONError("too_deep", f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, and int()'s own digit limit
        raise UntrustedJSONError("not_json", f"not valid JSON: {str(exc)[:120]}") from None
    if "\\u" in text:
        _check_strings(value)
    return value


# A JSON string, or the rest of the text after an opening quote that is never closed. It cannot fail once
# started, so finding every string is one linear pass (no backtracking over an unterminated one).
_STRING: Final = re.compile(r'"(?:[^"\\]|\\[\s\S])*"?')
_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]+")
_AS_PARENS: Final = str.maketrans("[{]}", "(())")


def _too_deep(text: str, max_depth: int) -> bool:
    """Whether ``text`` nests deeper than ``max_depth``, decided before any parser recurses into it.

    Strings are dropped, then everything but brackets; ``max_depth`` passes each remove the innermost
    ``()`` pairs. A pair left after them was nested deeper than the bound; so is a run of unclosed
    openers longer than it (the parser would recurse into those too before failing). Linear work per
    pass, in C: a stranger's brackets cost the node microseconds, and never its stack.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_AS_PARENS)
    for _ in range(max_depth):
        shorter = brackets.replace("()", "")
        if len(shorter) == len(brackets):
            break
        brackets = shorter
    return "()" in brackets or brackets.count("(") > max_depth


def _check_strings(value: Any) -> None:
    """Walk ``value`` (its depth is bounded by now) and refuse strings holding a lone surrogate."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_unicode(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_unicode(key)
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UntrustedJSONError("bad_unicode", "a string holds a lone surrogate (\\ud800-\\udfff)") from None
