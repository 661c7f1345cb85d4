"""Errors on the wire: every refusal the HTTP layer sends, in the one shape of DESIGN §9.

``{"error": {"code", "domain", "message", "retryable", "details"}}`` with the error's status. The error path
is the most robust code in the house: :func:`error_body` writes valid JSON in that shape whatever the
error carries (details echoing a stranger's integers beyond 64 bits, infinities, lone surrogates, objects
that cannot even be printed), and :func:`error_response` never fails.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from aiohttp import web

from core.errors import HearthError, RequestError
from node.metrics import Metrics

log = logging.getLogger("hearth.http")

CLIENT_CLOSED = RequestError("client_closed_request", "the client closed the connection", http_status=499)
# Headers an aiohttp refusal carries that its JSON replacement must keep (405 names the allowed methods).
KEPT_HEADERS = ("Allow",)


def http_error(exc: web.HTTPException) -> HearthError:
    """The Hearth error for one of aiohttp's own refusals (no route, wrong method, body over the cap)."""
    codes = {
        404: ("not_found", "no such route"),
        405: ("method_not_allowed", "method not allowed on this route"),
        413: ("body_too_large", "the request body exceeds the node's cap"),
    }
    code, message = codes.get(exc.status, ("http_error", exc.reason))
    domain_status = exc.status if 400 <= exc.status < 600 else 400
    details: dict[str, Any] = {}
    if exc.status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
        details["allowed"] = sorted(exc.allowed_methods)
    return RequestError(code, message, http_status=domain_status, details=details)


def error_response(metrics: Metrics, exc: HearthError) -> web.Response:
    """The JSON error for ``exc``, counted in ``metrics``; this never fails, whatever the error carries."""
    try:
        metrics.error(exc.domain, exc.code)
    except Exception:  # a metric must not cost the requester the answer
        log.exception("could not count error %r", exc)
    status = exc.http_status if isinstance(exc.http_status, int) and 400 <= exc.http_status < 600 else 500
    response = web.Response(body=error_body(exc), status=status, content_type="application/json")
    retry_after = retry_after_header(exc)
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


def retry_after_header(exc: HearthError) -> str | None:
    """The ``Retry-After`` value of ``exc``: its ``details.retry_after_seconds`` in whole seconds (at least
    one), or None where it names none."""
    retry_after = exc.details.get("retry_after_seconds") if isinstance(exc.details, dict) else None
    if isinstance(retry_after, int | float) and not isinstance(retry_after, bool) and 0 <= retry_after < 1e9:
        return str(max(1, math.ceil(retry_after)))
    return None


def error_body(exc: HearthError) -> bytes:
    """The error's JSON (DESIGN §9 shape). Details JSON cannot carry (integers beyond 64 bits, infinite
    floats, lone surrogates, objects) are written as text; should even that fail, they are left out."""
    try:
        return orjson.dumps(exc.to_dict())
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        pass
    error = {
        "code": _safe_text(exc.code, 200),
        "domain": _safe_text(exc.domain, 40),
        "message": _safe_text(exc.message, 2000),
        "retryable": bool(exc.retryable),
        "details": _json_safe(exc.details, 0),
    }
    try:
        return orjson.dumps({"error": error})
    except (TypeError, ValueError):
        error["details"] = {}
        return orjson.dumps({"error": error})


_SAFE_DEPTH = 8
_SAFE_ITEMS = 100


def _safe_text(value: object, limit: int) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = repr(value)
        except Exception:  # an object whose repr fails is still named
            text = type(value).__name__
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _json_safe(value: object, depth: int) -> Any:
    """``value`` with everything orjson cannot write turned into short text; bounded in depth and size."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else _safe_text(str(value), 80)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _safe_text(value, 2000)
    if depth >= _SAFE_DEPTH:
        return "..."
    if isinstance(value, dict):
        items = list(value.items())[:_SAFE_ITEMS]
        return {_safe_text(k, 200): _json_safe(v, depth + 1) for k, v in items}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in list(value)[:_SAFE_ITEMS]]
    return type(value).__name__
