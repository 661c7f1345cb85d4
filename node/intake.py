"""Intake: a signed request made into what admission works on, refused before any side effect.

:class:`Intake` verifies the DID-JWT (:class:`~payments.jwt.RequestVerifier`: cheap checks first, the
replay cache last), validates the envelope and derives, once per requester and envelope, its canonical
hash, idempotency key and the node's job id. Used as a context manager around the handling of one
request, it records the request's jti only if that handling succeeds: a refusal, by intake or later by
admission, leaves no trace, and the same token is judged the same way when it comes again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson

from core.config import ApiSection
from core.envelope import (
    FfmpegTranscodeEnvelope,
    VllmBatchEnvelope,
    envelope_dict,
    envelope_digests,
    node_job_id,
    parse_envelope,
)
from core.errors import AuthError, RequestError
from node.metrics import Metrics
from payments.jwt import ReplayCache, RequestVerifier, VerifiedRequest

AnyEnvelope = FfmpegTranscodeEnvelope | VllmBatchEnvelope
ENVELOPE_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Incoming:
    """A verified request, its envelope, canonical hash, idempotency key and job id: computed once."""

    request: VerifiedRequest
    env: AnyEnvelope
    doc: dict[str, Any]
    hash: str
    key: str
    job_key: str


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A valid envelope with what :class:`Incoming` derives from it for one requester."""

    env: AnyEnvelope
    doc: dict[str, Any]
    hash: str
    key: str
    job_key: str


_Found = tuple[tuple[str, bytes] | None, AnyEnvelope | _Parsed]  # (cache key, envelope or cache hit)


def _envelope_key(iss: Any, raw: Any) -> tuple[str, bytes] | None:
    """The cache key of a request's ``job`` claim: its issuer and exact JSON (``1``, ``1.0`` and ``true``
    stay apart, as strict validation tells them apart); None for what JSON cannot write back."""
    if not isinstance(iss, str) or not isinstance(raw, dict):
        return None
    try:
        return iss, orjson.dumps(raw, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits: validated the long way
        return None


class Intake:
    """Verified requests addressed to ``node_did``, with their envelopes checked once per requester."""

    def __init__(
        self,
        node_did: str,
        replay: ReplayCache,
        api: ApiSection,
        metrics: Metrics,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.verifier = RequestVerifier(
            node_did,
            replay,  # the journal: each nonce is committed with the request's own writes
            clock_skew_seconds=api.clock_skew_seconds,
            max_lifetime_seconds=api.max_token_lifetime_seconds,
            now=now,
        )
        self._metrics = metrics
        # envelopes already checked, by requester and exact JSON: a quote's envelope comes back with its
        # acceptance (and with every retry), and need not be validated and hashed again
        self._envelopes: dict[tuple[str, bytes], _Parsed] = {}

    def job(self, token: str) -> AbstractContextManager[Incoming]:
        """A job request (a ``job`` claim holding an envelope), verified and parsed; its jti is recorded
        only if the block succeeds."""
        return _Handling(self, token, None)

    def request(
        self, token: str, check: Callable[[dict[str, Any]], None]
    ) -> AbstractContextManager[VerifiedRequest]:
        """Any signed request, verified, with ``check(payload)`` run before the block; its jti is recorded
        only if the block succeeds. Verification refusals are counted by code."""
        return _Handling(self, token, check)

    def _parse_job(self, payload: dict[str, Any]) -> _Found:
        """The envelope of a job request's ``job`` claim, checked now or as it was for this requester, and
        its cache key."""
        if "job" not in payload:
            raise RequestError("invalid_envelope", "the request has no 'job' claim")
        raw = payload["job"]
        seen = _envelope_key(payload["iss"], raw)
        hit = None if seen is None else self._envelopes.get(seen)
        return seen, parse_envelope(raw) if hit is None else hit

    def _incoming(
        self, request: VerifiedRequest, seen: tuple[str, bytes] | None, found: AnyEnvelope | _Parsed
    ) -> Incoming:
        if isinstance(found, _Parsed):
            return Incoming(request, found.env, found.doc, found.hash, found.key, found.job_key)
        env = found
        doc = envelope_dict(env)
        digest, key = envelope_digests(request.iss, doc)
        job_key = node_job_id(request.iss, env.job_id)
        if seen is not None:
            if len(self._envelopes) >= ENVELOPE_CACHE_SIZE:
                del self._envelopes[next(iter(self._envelopes))]  # the oldest
            self._envelopes[seen] = _Parsed(env, doc, digest, key, job_key)
        return Incoming(request=request, env=env, doc=doc, hash=digest, key=key, job_key=job_key)


class _Handling:
    """The handling of one signed request: :meth:`Intake.job` (``check`` None) or :meth:`Intake.request`.

    Verified on entry (refusals counted), its jti recorded on a clean exit. A class rather than stacked
    generator context managers: it is entered for every request the node takes.
    """

    __slots__ = ("_admitted", "_check", "_intake", "_job", "_token")

    def __init__(self, intake: Intake, token: str, check: Callable[[dict[str, Any]], None] | None) -> None:
        self._intake = intake
        self._token = token
        self._check = check
        self._job: _Found | None = None
        self._admitted: AbstractContextManager[VerifiedRequest] | None = None

    def _parse_job(self, payload: dict[str, Any]) -> None:
        self._job = self._intake._parse_job(payload)

    def __enter__(self) -> Any:
        intake = self._intake
        admitted = intake.verifier.admit(self._token, before_record=self._check or self._parse_job)
        try:
            request = admitted.__enter__()
        except AuthError as exc:
            intake._metrics.auth_rejected(exc.code)
            raise
        self._admitted = admitted
        if self._check is not None:
            return request
        assert self._job is not None
        try:
            return intake._incoming(request, *self._job)
        except BaseException as exc:
            admitted.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._admitted is not None
        return self._admitted.__exit__(exc_type, exc, tb)
