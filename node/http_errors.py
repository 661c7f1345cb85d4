"""Errors on the wire: every refusal the HTTP layer sends, in the one shape of docs/protocol.md.

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

from core.errors import (
    AuthError,
    BudgetError,
    CapacityError,
    ChainError,
    ConfigError,
    ConflictError,
    Domain,
    ExecutionError,
    FundingError,
    HearthError,
    IllegalTransitionError,
    JournalError,
    NotFoundError,
    OutputValidationError,
    PolicyError,
    PricingError,
    RegistryError,
    RequestError,
    SettlementError,
    StorageError,
)
from node.metrics import Metrics

log = logging.getLogger("hearth.http")


class BoundaryError(RequestError):
    """A refusal made at the HTTP boundary itself (the parser, the connection guard, aiohttp's own answers),
    where the status is the protocol's and not a Hearth decision: it carries its status."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int,
        details: dict[str, Any] | None = None,
        retryable: bool | None = None,
        domain: Domain | None = None,
    ) -> None:
        super().__init__(code, message, details=details, retryable=retryable, domain=domain)
        self.status = status


# The HTTP status of every error is chosen here, from its class (the most specific class listed first) and,
# where one code of a class needs another status, from its code. Nothing below the node picks a status.
STATUS_BY_CLASS: tuple[tuple[type[HearthError], int], ...] = (
    (NotFoundError, 404),
    (ConflictError, 409),
    (RequestError, 400),
    (AuthError, 401),
    (PolicyError, 403),
    (PricingError, 402),
    (BudgetError, 402),  # a requester's own budget (its MCP server or tools); never the node's
    (CapacityError, 503),
    (FundingError, 422),
    (SettlementError, 422),
    (ChainError, 503),
    (IllegalTransitionError, 409),
    (JournalError, 500),
    (StorageError, 502),
    (ExecutionError, 500),
    (OutputValidationError, 422),
    (RegistryError, 502),
    (ConfigError, 500),
)
STATUS_BY_CODE: dict[str, int] = {
    # 400: malformed tokens and DIDs (an AuthError is 401 otherwise)
    "malformed_jwt": 400,
    "unsupported_alg": 400,
    "missing_claim": 400,
    "invalid_did": 400,
    "unsupported_did_method": 400,
    "unsupported_key_type": 400,
    # 402/403
    "price_above_max": 402,
    "grant_revoked": 402,
    "grant_expired": 402,
    "grant_exceeds_job_cap": 402,
    "grant_exhausted": 402,
    "grant_not_agent": 403,
    "did_denied": 403,
    "wrong_audience": 403,
    "not_job_owner": 403,
    "input_not_allowed": 403,
    # 404
    "blob_not_found": 404,
    # 406/408
    "format_required": 406,
    "unsupported_car_version": 406,
    "body_timeout": 408,
    "upload_stalled": 408,
    # 409
    "replayed_jti": 409,
    "quote_expired": 409,
    "result_not_ready": 409,
    "envelope_mismatch": 409,
    # 413/415
    "body_too_large": 413,
    "blob_too_large": 413,
    "input_too_large": 413,
    "unsupported_media_type": 415,
    # 422: well-formed but unusable
    "invalid_envelope": 422,
    "malformed_body": 422,
    "invalid_cancel": 422,
    "unknown_kind": 422,
    "unknown_model": 422,
    "max_tokens_exceeds_context": 422,
    "kind_not_offered": 422,
    "limits_exceeded": 422,
    "exceeds_capacity": 422,
    "unsupported_file_type": 422,
    "directory_needs_sharding": 422,
    "invalid_file_name": 422,
    "not_a_file": 422,
    "too_many_redirects": 422,
    "escrow_reverted": 422,
    # 429/501/503/507
    "did_concurrency": 429,
    "unsupported_codec": 501,
    "unsupported_hamt_directory": 501,
    "pricing_script_failed": 503,
    "not_ready": 503,
    "journal_write_failed": 507,
    "blockstore_io_error": 507,
}
# Any other refusal of the input or the output judged at validation (the sandbox's checks) is a 422.
STATUS_BY_DOMAIN: dict[str, int] = {"validation": 422}
# A retryable 429/503 that names no wait of its own still tells the client when to come back.
DEFAULT_RETRY_AFTER_SECONDS = 2
CLIENT_CLOSED = BoundaryError("client_closed_request", "the client closed the connection", status=499)


def status_of(exc: HearthError) -> int:
    """The HTTP status of ``exc`` (400-599), chosen from its class and code; never fails."""
    try:
        if isinstance(exc, BoundaryError):
            status = exc.status
        elif exc.code in STATUS_BY_CODE:
            status = STATUS_BY_CODE[exc.code]
        elif isinstance(exc, RequestError) and exc.domain in STATUS_BY_DOMAIN:
            status = STATUS_BY_DOMAIN[exc.domain]
        else:
            status = next((s for cls, s in STATUS_BY_CLASS if isinstance(exc, cls)), 500)
        return status if isinstance(status, int) and 400 <= status < 600 else 500
    except Exception:  # a code that cannot even be hashed: the answer is still an answer
        return 500


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
    return BoundaryError(code, message, status=domain_status, details=details)


def error_response(metrics: Metrics, exc: HearthError) -> web.Response:
    """The JSON error for ``exc``, counted in ``metrics``; this never fails, whatever the error carries."""
    try:
        metrics.error(exc.domain, exc.code)
    except Exception:  # a metric must not cost the requester the answer
        log.exception("could not count error %r", exc)
    status = status_of(exc)
    response = web.Response(body=error_body(exc), status=status, content_type="application/json")
    retry_after = retry_after_header(exc)
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


def retry_after_header(exc: HearthError) -> str | None:
    """The ``Retry-After`` value of ``exc``: its ``details.retry_after_seconds`` in whole seconds (at least
    one); for a retryable 429 or 503 that names none, :data:`DEFAULT_RETRY_AFTER_SECONDS`; else None."""
    retry_after = exc.details.get("retry_after_seconds") if isinstance(exc.details, dict) else None
    if isinstance(retry_after, int | float) and not isinstance(retry_after, bool) and 0 <= retry_after < 1e9:
        return str(max(1, math.ceil(retry_after)))
    if exc.retryable is True and status_of(exc) in (429, 503):
        return str(DEFAULT_RETRY_AFTER_SECONDS)
    return None


def error_body(exc: HearthError) -> bytes:
    """The error's JSON (docs/protocol.md shape). Details JSON cannot carry (integers beyond 64 bits, infinite
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
