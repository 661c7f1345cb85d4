"""The vLLM workload without a container: parsing input batches, judging vLLM's output, the run plan.

``parse_batch``'s refusals of malformed lines are covered through the estimator (tests/provider/
test_estimate.py); here are the values it returns. The output checks are fed JSONL shaped like what
``vllm.entrypoints.openai.run_batch`` writes; ``batch_plan`` is checked argument by argument.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from core.errors import OutputValidationError, RequestError
from sandbox.vllm import (
    CONTAINER_BATCH_PATH,
    CONTAINER_MODEL_DIR,
    CONTAINER_OUTPUT_PATH,
    CPU_MIN_KV_CACHE_MB,
    CPU_RUNTIME_MB,
    Batch,
    BatchOutcome,
    BatchProgress,
    BatchRequest,
    batch_plan,
    check_batch_output,
    cpu_memory_needed_mb,
    kv_cache_gib,
    parse_batch,
    raise_for_checks,
)

MODEL = "tiny-llama"
MIB = 1024 * 1024


def words(messages: Sequence[Mapping[str, str]]) -> int:
    """A stand-in prompt counter: each message's words plus 3 for its role markers."""
    return sum(3 + len(m["content"].split()) for m in messages)


def request_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": text}], **body},
    }


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return b"".join((x if isinstance(x, str) else json.dumps(x)).encode() + b"\n" for x in lines)


def parse(data: bytes, *, max_tokens: int = 16, max_context: int = 2048, max_requests: int = 10) -> Batch:
    return parse_batch(
        data,
        model=MODEL,
        max_requests=max_requests,
        max_tokens=max_tokens,
        max_context=max_context,
        prompt_tokens=words,
    )


# ------------------------------------------------------------------------------------------ parse_batch


def test_parse_batch_measures_every_line() -> None:
    data = jsonl(
        request_line("q1", "hello world", max_tokens=8),
        request_line("q2", "one two three four"),  # no cap of its own: the envelope's
        request_line("q3", "x", max_completion_tokens=5),
    )
    batch = parse(data, max_tokens=16)
    assert batch.requests == (
        BatchRequest(line=1, custom_id="q1", prompt_tokens=5, max_tokens=8),
        BatchRequest(line=2, custom_id="q2", prompt_tokens=7, max_tokens=16),
        BatchRequest(line=3, custom_id="q3", prompt_tokens=4, max_tokens=5),
    )
    assert batch.prompt_tokens == 16
    assert batch.max_completion_tokens == 29


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    # max_tokens alone would be refused (above the envelope's 16): the newer field is the one honoured
    batch = parse(jsonl(request_line("q", "hi", max_tokens=100, max_completion_tokens=3)), max_tokens=16)
    assert batch.requests[0].max_tokens == 3


def test_a_null_max_completion_tokens_falls_back_to_max_tokens() -> None:
    # as vLLM reads the request: a null newer field leaves the older one in force, cap checks included
    with pytest.raises(RequestError) as info:
        parse(jsonl(request_line("q", "hi", max_completion_tokens=None, max_tokens=1000)), max_tokens=16)
    assert info.value.code == "max_tokens_exceeded"
    batch = parse(jsonl(request_line("q", "hi", max_completion_tokens=None, max_tokens=5)), max_tokens=16)
    assert batch.requests[0].max_tokens == 5


def test_blank_lines_are_skipped_but_keep_their_numbers() -> None:
    data = b"\n" + jsonl(request_line("a", "x")) + b"   \n\n" + jsonl(request_line("b", "y z"))
    batch = parse(data)
    assert [(r.line, r.custom_id) for r in batch.requests] == [(2, "a"), (5, "b")]
    assert [r.prompt_tokens for r in batch.requests] == [4, 5]


def test_a_batch_of_exactly_max_requests_and_a_line_exactly_at_the_context() -> None:
    data = jsonl(*(request_line(f"r{i}", "a b c", max_tokens=4) for i in range(3)))
    # 3 + 3 prompt tokens + 4 completion tokens = 10: the whole context, which is allowed
    batch = parse(data, max_requests=3, max_context=10)
    assert [r.custom_id for r in batch.requests] == ["r0", "r1", "r2"]


def test_the_last_line_needs_no_newline() -> None:
    data = jsonl(request_line("a", "x")) + json.dumps(request_line("b", "y")).encode()
    assert [r.line for r in parse(data).requests] == [1, 2]


# ----------------------------------------------------------------------------------- check_batch_output

BATCH = Batch(
    requests=(
        BatchRequest(line=1, custom_id="q1", prompt_tokens=10, max_tokens=8),
        BatchRequest(line=2, custom_id="q2", prompt_tokens=20, max_tokens=16),
    )
)


def answer(custom_id: str, prompt: int = 10, completion: int = 4, *, status: int = 200) -> dict[str, Any]:
    """One output line the way vLLM's run_batch writes it."""
    body: dict[str, Any] = {
        "id": f"chatcmpl-{custom_id}",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."}}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    if status != 200:
        body = {"object": "error", "message": "bad request", "code": status}
    return {
        "id": f"vllm-{custom_id}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"vllm-batch-{custom_id}", "body": body},
        "error": None,
    }


def error_only(custom_id: str) -> dict[str, Any]:
    """A request vLLM could not even start: an error object and no response."""
    return {
        "id": f"vllm-{custom_id}",
        "custom_id": custom_id,
        "response": None,
        "error": {"message": "engine failure", "code": 500},
    }


def checks_of(outcome: BatchOutcome) -> dict[str, dict[str, Any]]:
    return {c["name"]: {"passed": c["passed"], **c["detail"]} for c in outcome.checks["checks"]}


def failed(outcome: BatchOutcome) -> list[str]:
    return [c["name"] for c in outcome.checks["checks"] if not c["passed"]]


GOOD = jsonl(answer("q1", 10, 4), answer("q2", 20, 16))


def test_a_good_output_passes_every_check_and_sums_the_usage() -> None:
    outcome = check_batch_output(BATCH, GOOD, all_answered=True)
    assert outcome.checks["passed"] is True
    assert [c["name"] for c in outcome.checks["checks"]] == [
        "line_format",
        "answered_once",
        "status_codes",
        "token_usage",
    ]
    assert failed(outcome) == []
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (30, 20)
    assert outcome.usage() == {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}
    assert outcome.status_counts == {"200": 2}
    raise_for_checks(outcome.checks)  # nothing to raise


@pytest.mark.parametrize(
    ("output", "field", "ids"),
    [
        (jsonl(answer("q1")), "missing", ["q2"]),
        (jsonl(answer("q1"), answer("q2"), answer("q2")), "repeated", ["q2"]),
        (jsonl(answer("q1"), answer("q2"), answer("q9")), "unexpected", ["q9"]),
    ],
)
def test_every_request_is_answered_exactly_once(output: bytes, field: str, ids: list[str]) -> None:
    outcome = check_batch_output(BATCH, output, all_answered=True)
    assert failed(outcome) == ["answered_once"]
    detail = checks_of(outcome)["answered_once"]
    assert detail[field] == ids
    assert detail["requests"] == 2
    assert outcome.checks["passed"] is False


def test_a_line_that_is_not_json_fails_line_format() -> None:
    output = GOOD + b"{truncated\n"
    outcome = check_batch_output(BATCH, output, all_answered=True)
    assert failed(outcome) == ["line_format"]
    assert checks_of(outcome)["line_format"]["bad_lines"] == [3]
    assert checks_of(outcome)["line_format"]["count"] == 1
    assert outcome.usage()["total_tokens"] == 50  # the good lines still count


def test_a_non_200_answer_fails_only_when_every_request_must_be_answered() -> None:
    output = jsonl(answer("q1"), answer("q2", status=400))
    strict = check_batch_output(BATCH, output, all_answered=True)
    assert failed(strict) == ["status_codes"]
    assert checks_of(strict)["status_codes"]["counts"] == {"200": 1, "400": 1}
    lenient = check_batch_output(BATCH, output, all_answered=False)
    assert lenient.checks["passed"] is True
    assert lenient.status_counts == {"200": 1, "400": 1}
    assert (lenient.prompt_tokens, lenient.completion_tokens) == (10, 4)  # the 400 reported no usage


def test_a_completion_longer_than_its_line_allows_fails_token_usage() -> None:
    output = jsonl(answer("q1", 10, 9), answer("q2", 20, 16))  # q1 may have 8, q2 exactly its 16
    outcome = check_batch_output(BATCH, output, all_answered=True)
    assert failed(outcome) == ["token_usage"]
    assert checks_of(outcome)["token_usage"]["over_max_tokens"] == ["q1"]
    assert outcome.completion_tokens == 25  # charged what was used, even so


def test_a_200_answer_without_usage_fails_token_usage() -> None:
    no_usage = answer("q2")
    del no_usage["response"]["body"]["usage"]
    outcome = check_batch_output(BATCH, jsonl(answer("q1"), no_usage), all_answered=True)
    assert failed(outcome) == ["token_usage"]
    assert checks_of(outcome)["token_usage"]["missing_usage"] == ["q2"]


def test_usage_with_a_bad_count_is_missing_usage() -> None:
    negative = answer("q2")
    negative["response"]["body"]["usage"]["prompt_tokens"] = -1
    outcome = check_batch_output(BATCH, jsonl(answer("q1"), negative), all_answered=True)
    assert checks_of(outcome)["token_usage"]["missing_usage"] == ["q2"]
    assert outcome.prompt_tokens == 10


def test_reported_usage_must_be_the_sums() -> None:
    right = {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}
    assert check_batch_output(BATCH, GOOD, all_answered=True, reported_usage=right).checks["passed"]
    wrong = right | {"completion_tokens": 19, "total_tokens": 49}
    outcome = check_batch_output(BATCH, GOOD, all_answered=True, reported_usage=wrong)
    assert failed(outcome) == ["token_usage"]
    assert checks_of(outcome)["token_usage"]["reported"] == wrong
    assert checks_of(outcome)["token_usage"]["completion_tokens"] == 20


def test_an_error_only_line_counts_as_answered_with_status_zero() -> None:
    output = jsonl(answer("q1"), error_only("q2"))
    strict = check_batch_output(BATCH, output, all_answered=True)
    assert failed(strict) == ["status_codes"]  # answered (once) and well-formed, but not a 200
    assert strict.status_counts == {"200": 1, "0": 1}
    lenient = check_batch_output(BATCH, output, all_answered=False)
    assert lenient.checks["passed"] is True
    assert lenient.usage() == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


def test_a_line_with_neither_response_nor_error_is_malformed() -> None:
    broken = answer("q2") | {"response": None}
    outcome = check_batch_output(BATCH, jsonl(answer("q1"), broken), all_answered=True)
    assert set(failed(outcome)) == {"line_format", "answered_once"}
    assert checks_of(outcome)["answered_once"]["missing"] == ["q2"]


def test_raise_for_checks_names_what_failed() -> None:
    outcome = check_batch_output(BATCH, jsonl(answer("q1", 10, 99), "not json"), all_answered=True)
    with pytest.raises(OutputValidationError) as info:
        raise_for_checks(outcome.checks)
    err = info.value
    assert err.code == "checks_failed"
    assert err.details["failed"] == ["line_format", "answered_once", "token_usage"]
    assert err.details["checks"] == outcome.checks
    assert "line_format, answered_once, token_usage" in err.message


# ------------------------------------------------------------------------------------------- batch_plan


def plan_args(**overrides: Any) -> dict[str, Any]:
    return {
        "served_name": MODEL,
        "max_context": 2048,
        "max_tokens": 16,
        "dtype": "float32",
        "cpus": 1.5,
        "memory_mb": 4096,
        "gpus": 0,
        "model_bytes": 100 * MIB,
    } | overrides


def flag(argv: tuple[str, ...], name: str) -> str:
    """The value following ``name`` in ``argv``."""
    assert argv.count(name) == 1, f"{name} should appear once in {argv}"
    return argv[argv.index(name) + 1]


def test_cpu_plan() -> None:
    plan = batch_plan(**plan_args())
    argv = plan.argv
    assert plan.device == "cpu"
    assert argv[:3] == ("python3", "-m", "vllm.entrypoints.openai.run_batch")
    assert flag(argv, "-i") == CONTAINER_BATCH_PATH
    assert flag(argv, "-o") == CONTAINER_OUTPUT_PATH
    assert flag(argv, "--model") == CONTAINER_MODEL_DIR
    assert flag(argv, "--served-model-name") == MODEL
    assert flag(argv, "--max-model-len") == "2048"
    assert flag(argv, "--dtype") == "float32"
    assert json.loads(flag(argv, "--override-generation-config")) == {"max_new_tokens": 16}
    assert "--enforce-eager" in argv
    assert "--tensor-parallel-size" not in argv
    # 4096 MB - 2560 runtime - 100 weights = 1436 MB spare: 1 whole GiB of KV cache
    assert plan.env == {
        "OMP_NUM_THREADS": "2",  # 1.5 CPUs round up
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }


def test_gpu_plan() -> None:
    plan = batch_plan(**plan_args(gpus=2, cpus=4))
    assert plan.device == "gpu"
    assert flag(plan.argv, "--tensor-parallel-size") == "2"
    assert "--enforce-eager" not in plan.argv
    assert not [k for k in plan.env if k.startswith("VLLM_CPU_")]
    assert plan.env["OMP_NUM_THREADS"] == "4"
    assert flag(plan.argv, "--served-model-name") == MODEL


def test_a_fraction_of_a_cpu_still_gets_a_thread() -> None:
    assert batch_plan(**plan_args(cpus=0.25)).env["OMP_NUM_THREADS"] == "1"


def test_argv_hash_names_the_plan() -> None:
    base = batch_plan(**plan_args())
    assert base.argv_hash == batch_plan(**plan_args()).argv_hash
    assert len(base.argv_hash) == 64 and int(base.argv_hash, 16) >= 0
    assert batch_plan(**plan_args(max_tokens=17)).argv_hash != base.argv_hash
    assert batch_plan(**plan_args(memory_mb=8192)).argv_hash != base.argv_hash  # env: a bigger cache
    assert batch_plan(**plan_args(gpus=1)).argv_hash != base.argv_hash


def test_cpu_memory_arithmetic() -> None:
    model_bytes = 100 * MIB + 1  # a started MiB counts whole
    assert cpu_memory_needed_mb(model_bytes) == CPU_RUNTIME_MB + 101 + CPU_MIN_KV_CACHE_MB == 3685
    # the least memory a run needs gets exactly the smallest cache
    assert kv_cache_gib(cpu_memory_needed_mb(model_bytes), model_bytes) == 1
    assert kv_cache_gib(CPU_RUNTIME_MB + 101 + 3 * 1024, model_bytes) == 3
    assert kv_cache_gib(CPU_RUNTIME_MB + 101 + 3 * 1024 - 1, model_bytes) == 2
    assert kv_cache_gib(512, model_bytes) == 1  # never less than one GiB


# ---------------------------------------------------------------------------------------- BatchProgress


def test_progress_reads_run_batchs_bar() -> None:
    progress = BatchProgress()
    assert progress.feed("INFO 05-01 12:00:00 loading weights") is None
    assert progress.feed("Running batch:   0% Completed | 0/4 [00:00<?, ?req/s]") == 0.0
    assert progress.feed("Running batch:  50% Completed | 2/4 [00:01<00:01,  1.9req/s]") == 50.0
    assert (progress.done, progress.total) == (2, 4)
    # the bar redrawn at the same count says nothing new
    assert progress.feed("Running batch:  50% Completed | 2/4 [00:02<00:02,  1.0req/s]") is None
    assert progress.feed("Running batch: 100% Completed | 4/4 [00:02<00:00,  1.9req/s]") == 100.0


def test_progress_takes_the_last_bar_of_a_chunk() -> None:
    progress = BatchProgress()
    chunk = (
        "Running batch:  25% Completed | 1/4 [00:00<00:03]Running batch:  75% Completed | 3/4 [00:01<00:00]"
    )
    assert progress.feed(chunk) == 75.0
    assert (progress.done, progress.total) == (3, 4)
