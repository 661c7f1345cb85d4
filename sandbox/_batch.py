"""OpenAI batch files: the request JSONL a ``vllm_batch`` job brings, and the output JSONL vLLM writes.

:func:`parse_batch` reads the input line by line and refuses, naming the line, anything the run could not
honour within the envelope: bad JSON, a model other than the envelope's, a ``max_tokens`` above the
envelope's, a prompt that with its completion would not fit the model's context, more lines than
``max_requests``. It runs at quote time when the input is at hand and again before every run, so a bad
line costs no GPU time. :func:`check_batch_output` judges what vLLM wrote against the parsed input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypedDict, TypeGuard

from core.errors import RequestError
from core.untrusted import UntrustedJSONError, parse_json

BATCH_URL: Final = "/v1/chat/completions"
MAX_BATCH_BYTES: Final = 256 * 1024 * 1024  # a batch is read whole to be checked
MAX_CUSTOM_ID_CHARS: Final = 512
MAX_MESSAGES_PER_REQUEST: Final = 1024
ROLES: Final = frozenset({"system", "developer", "user", "assistant"})
# Request fields that change neither the prompt nor how many completions come back; anything else (tools,
# response formats, several choices) is refused rather than priced wrong.
ALLOWED_BODY_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "n",
        "user",
    }
)

BatchCheckName = Literal["line_format", "answered_once", "status_codes", "token_usage"]

PromptCounter = Callable[[Sequence[Mapping[str, str]]], int]


def bad_batch(code: str, message: str, **details: Any) -> RequestError:
    """A refusal of the batch: the requester's fault, judged at validation, never retryable."""
    return RequestError(code, message, details=dict(details), domain="validation", retryable=False)


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One line of the input: its id, its exact prompt size and the most it may generate."""

    line: int
    custom_id: str
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Batch:
    """A parsed, checked input batch."""

    requests: tuple[BatchRequest, ...]

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    @property
    def max_completion_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)


def parse_batch(
    data: bytes,
    *,
    model: str,
    max_requests: int,
    max_tokens: int,
    max_context: int,
    prompt_tokens: PromptCounter,
) -> Batch:
    """Check every line of an OpenAI batch JSONL and measure it; raises :func:`bad_batch` errors.

    ``max_tokens`` is the envelope's cap per request (a line without one gets it); ``prompt_tokens``
    counts a line's messages with the model's chat template.
    """
    seen: set[str] = set()
    requests: list[BatchRequest] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        if len(requests) == max_requests:
            raise bad_batch(
                "batch_too_large",
                f"batch line {number}: the batch has more than max_requests ({max_requests}) requests",
                line=number,
                max_requests=max_requests,
            )
        custom_id, body = _parse_line(number, raw, seen, model)
        messages = _messages(number, body.get("messages"))
        cap = _line_max_tokens(number, body, max_tokens)
        prompt = prompt_tokens(messages)
        if prompt + cap > max_context:
            raise bad_batch(
                "context_length_exceeded",
                f"batch line {number}: a prompt of {prompt} tokens plus max_tokens {cap} exceeds the "
                f"context of model {model!r} ({max_context} tokens)",
                line=number,
                custom_id=custom_id,
                prompt_tokens=prompt,
                max_tokens=cap,
                max_context=max_context,
            )
        requests.append(BatchRequest(line=number, custom_id=custom_id, prompt_tokens=prompt, max_tokens=cap))
    if not requests:
        raise bad_batch("invalid_batch", "batch line 1: the batch has no requests", line=1)
    return Batch(requests=tuple(requests))


def _bad_line(number: int, reason: str, **details: Any) -> RequestError:
    return bad_batch("invalid_batch", f"batch line {number}: {reason}", line=number, reason=reason, **details)


def _parse_line(number: int, raw: bytes, seen: set[str], model: str) -> tuple[str, dict[str, Any]]:
    try:
        line = parse_json(raw)
    except UntrustedJSONError as exc:
        raise _bad_line(number, f"not valid JSON ({exc.message})", bound=exc.reason) from None
    if not isinstance(line, dict):
        raise _bad_line(number, "a line must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise _bad_line(number, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters")
    if custom_id in seen:
        raise _bad_line(number, f"custom_id {custom_id!r} is repeated", custom_id=custom_id)
    seen.add(custom_id)
    if line.get("method") != "POST":
        raise _bad_line(number, 'method must be "POST"')
    if line.get("url") != BATCH_URL:
        raise _bad_line(number, f'url must be "{BATCH_URL}"')
    body = line.get("body")
    if not isinstance(body, dict):
        raise _bad_line(number, "body must be an object")
    if body.get("model") != model:
        raise bad_batch(
            "unknown_model",
            f"batch line {number}: body.model must be the envelope's model {model!r}",
            line=number,
            model=body.get("model"),
            expected=model,
        )
    extra = sorted(set(body) - ALLOWED_BODY_FIELDS)
    if extra:
        raise _bad_line(number, f"body fields not supported: {', '.join(extra)}", fields=extra)
    if body.get("n", 1) != 1:
        raise _bad_line(number, "n must be 1: one completion per request")
    return custom_id, body


def _messages(number: int, messages: Any) -> list[dict[str, str]]:
    """The line's messages as role and text, the way vLLM flattens text parts (joined by newlines)."""
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES_PER_REQUEST:
        raise _bad_line(number, f"body.messages must be a list of 1 to {MAX_MESSAGES_PER_REQUEST} messages")
    out: list[dict[str, str]] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _bad_line(number, f"each message needs a role among {', '.join(sorted(ROLES))}")
        if set(message) - {"role", "content", "name"}:
            raise _bad_line(number, "a message may carry only role, content and name")
        out.append({"role": message["role"], "content": _text(number, message.get("content"))})
    return out


def _text(number: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "\n".join(str(t) for t in texts)
    raise _bad_line(number, "message content must be a string or a list of text parts")


def _line_max_tokens(number: int, body: dict[str, Any], cap: int) -> int:
    # as vLLM reads them: max_completion_tokens unless it is absent or null, then max_tokens
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens")
    if value is None:
        return cap
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _bad_line(number, "max_tokens must be a positive integer")
    if value > cap:
        raise bad_batch(
            "max_tokens_exceeded",
            f"batch line {number}: max_tokens {value} is above the envelope's max_tokens {cap}",
            line=number,
            max_tokens=value,
            limit=cap,
        )
    return value


# -- the output -----------------------------------------------------------------------------------------


class BatchCheck(TypedDict):
    """One named check of a batch result and why it passed or failed."""

    name: BatchCheckName
    passed: bool
    detail: dict[str, Any]


class BatchChecks(TypedDict):
    passed: bool
    checks: list[BatchCheck]


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What the output says: the checks, the tokens used (what is charged) and the answers by status."""

    checks: BatchChecks
    prompt_tokens: int
    completion_tokens: int
    status_counts: dict[str, int] = field(default_factory=dict)

    def usage(self) -> dict[str, int]:
        return _usage(self.prompt_tokens, self.completion_tokens)


def check_batch_output(
    batch: Batch,
    output: bytes,
    *,
    all_answered: bool,
    reported_usage: Mapping[str, Any] | None = None,
) -> BatchOutcome:
    """Judge vLLM's output JSONL against the input it answered.

    Checks: every line parses as a batch output line (``line_format``); every input ``custom_id`` is
    answered exactly once and nothing else is (``answered_once``); every answer has status 200, unless
    the envelope's ``validation.all_answered`` is false (``status_codes``); each usage is whole, no
    completion is longer than its line allowed and, given ``reported_usage`` (a result's claim, as
    :meth:`BatchOutcome.usage` writes it), the sums are those (``token_usage``). Usage is summed over every
    answer that reports one, so tokens vLLM spent on a failed line are counted too.
    """
    expected = {r.custom_id: r for r in batch.requests}
    answered: dict[str, int] = {}
    bad_lines: list[int] = []
    unknown: list[str] = []
    statuses: dict[str, int] = {}
    over: list[str] = []
    bad_usage: list[str] = []
    prompt = completion = 0
    for number, raw in enumerate(output.split(b"\n"), start=1):
        if not raw.strip():
            continue
        line = _output_line(raw)
        if line is None:
            bad_lines.append(number)
            continue
        custom_id, status, usage = line
        answered[custom_id] = answered.get(custom_id, 0) + 1
        if custom_id not in expected:
            unknown.append(custom_id)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if usage is None:
            if status == 200:
                bad_usage.append(custom_id)
            continue
        p, c = usage
        prompt += p
        completion += c
        request = expected.get(custom_id)
        if request is not None and c > request.max_tokens:
            over.append(custom_id)
    misreported = reported_usage is not None and dict(reported_usage) != _usage(prompt, completion)
    missing = [cid for cid in expected if cid not in answered]
    repeated = sorted(cid for cid, n in answered.items() if n > 1)
    not_ok = sum(n for code, n in statuses.items() if code != "200")
    checks: list[BatchCheck] = [
        _check("line_format", not bad_lines, bad_lines=bad_lines[:20], count=len(bad_lines)),
        _check(
            "answered_once",
            not missing and not repeated and not unknown,
            requests=len(expected),
            missing=missing[:20],
            repeated=repeated[:20],
            unexpected=unknown[:20],
        ),
        _check("status_codes", not all_answered or not_ok == 0, counts=statuses, all_answered=all_answered),
        _check(
            "token_usage",
            not over and not bad_usage and not misreported,
            prompt_tokens=prompt,
            completion_tokens=completion,
            over_max_tokens=over[:20],
            missing_usage=bad_usage[:20],
            **({"reported": dict(reported_usage)} if misreported and reported_usage is not None else {}),
        ),
    ]
    return BatchOutcome(
        checks={"passed": all(c["passed"] for c in checks), "checks": checks},
        prompt_tokens=prompt,
        completion_tokens=completion,
        status_counts=statuses,
    )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _check(name: BatchCheckName, passed: bool, **detail: Any) -> BatchCheck:
    return {"name": name, "passed": passed, "detail": detail}


def _output_line(raw: bytes) -> tuple[str, int, tuple[int, int] | None] | None:
    """``(custom_id, status, (prompt, completion) tokens or None)`` of one output line, or None if bad."""
    try:
        line = parse_json(raw)
    except UntrustedJSONError:
        return None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    response = line.get("response")
    if response is None:
        # vLLM reports a request it could not even start as an error with no response
        return (line["custom_id"], 0, None) if isinstance(line.get("error"), dict) else None
    if not isinstance(response, dict) or not _is_count(response.get("status_code")):
        return None
    body = response.get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return line["custom_id"], response["status_code"], None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not _is_count(p) or not _is_count(c):
        return line["custom_id"], response["status_code"], None
    return line["custom_id"], response["status_code"], (p, c)


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
