"""vllm_batch jobs really run: a tiny Llama model built here, served by the CPU build of vLLM in the sandbox.

The end-to-end test drives a node over HTTP the way a requester would: upload the batch, ask for a quote
(every line counted with the model's tokenizer), submit, follow the job, fetch the signed result and the
artifact, and check that the tokens vLLM reports are the ones the quote counted. The refusals need no run:
a bad batch, an unknown model or a line too long for the context is refused at quote time, and a batch
that turns out bad only after acceptance fails before any container starts.
"""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.envelope import parse_envelope
from core.errors import ConfigError, PolicyError
from node.daemon import Node
from payments.keys import Signer
from requester.client import NodeClient, NodeError
from tests.conftest import TinyModel, live, make_envelope, sign_request, write_home
from tests.node.test_execution import containers_of, events, upload, wait_state
from tests.promtext import sample

MODEL = "tiny-llama"
FINISHED = {"completed", "failed", "cancelled"}
PRICES = {"input_1k_tokens": "0.5", "output_1k_tokens": "2"}  # per-model prices, unlike [pricing]'s


def models_config(model: TinyModel, **entry: Any) -> list[dict[str, Any]]:
    return [
        {"name": MODEL, "path": str(model.path), "cid": model.cid, "max_context": 2048, **PRICES, **entry}
    ]


def infer_config(model: TinyModel, *, run: bool = True) -> dict[str, Any]:
    return {
        "scheduler": {"paused": not run},
        "pricing": {"minimum_per_job": "0"},
        "models": models_config(model),
    }


def line(custom_id: str, text: str, *, model: str = MODEL, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return b"".join((x if isinstance(x, str) else json.dumps(x)).encode() + b"\n" for x in lines)


BATCH = jsonl(
    line("q1", "hello world", max_tokens=8),
    line("q2", "Summarise this paragraph in one sentence, please.", max_tokens=12),
    line("q3", "The quick brown fox"),  # no max_tokens: the envelope's 16 is its cap and default
    {
        "custom_id": "q4",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": t} for t in ("Name", "primes")]},
            ],
            "max_completion_tokens": 5,
            "temperature": 0,
        },
    },
)
LINE_CAPS = {"q1": 8, "q2": 12, "q3": 16, "q4": 5}


def batch_envelope(cid: str, job_id: str, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "kind": "vllm_batch",
        "input_uri": cid,
        "output_spec": {"format": "openai_batch_jsonl", "model": MODEL, "max_tokens": 16, "max_requests": 10},
        "limits": {"timeout_seconds": 600, "max_output_mb": 10, "cpus": 2, "memory_mb": 4096, "gpus": 0},
        "validation": {"all_answered": True},
    }
    return make_envelope(job_id, max_price="20.00", **(fields | overrides))


async def quote(client: NodeClient, node_did: str, requester: Signer, env: dict[str, Any]) -> dict[str, Any]:
    return await client.quote(sign_request(requester, node_did, {"job": env}))


async def refusal(client: NodeClient, node_did: str, requester: Signer, env: dict[str, Any]) -> NodeError:
    with pytest.raises(NodeError) as info:
        await quote(client, node_did, requester, env)
    return info.value


@pytest.fixture
async def infer_node(tmp_path: Path, tiny_model: TinyModel, sandbox_images: dict[str, str]) -> Any:
    async with live(write_home(tmp_path / "home", infer_config(tiny_model))) as ln:
        yield ln


@pytest.fixture
async def quote_node(tmp_path: Path, tiny_model: TinyModel) -> Any:
    async with live(write_home(tmp_path / "home", infer_config(tiny_model, run=False))) as ln:
        yield ln


async def test_a_batch_runs_in_vllm_and_is_charged_for_the_tokens_it_used(
    infer_node: Any, requester: Signer, sandbox_images: dict[str, str]
) -> None:
    url, did = infer_node.url, infer_node.did
    async with NodeClient(url) as client:
        cid = await upload(url, BATCH)
        env = batch_envelope(cid, "batch-1")
        quoted = await quote(client, did, requester, env)
        estimate = quoted["quote"]["estimate"]
        assert estimate["basis"] == "token_count"
        assert estimate["output_tokens"] == sum(LINE_CAPS.values())
        body = await client.submit(sign_request(requester, did, {"job": env}), quoted["jwt"])
        job = str(body["job"]["id"])
        view = await wait_state(url, job, FINISHED, limit=420)
        if view["state"] != "completed":
            failed = [
                e["data"] for e in await events(url, job) if e["type"] == "transition" and e["to"] == "failed"
            ]
            pytest.fail(f"the batch failed: {view['failure']}: {failed}")
        result = (await client.result(job))["result"]

    # the signed result: checks, tokens, cost, provenance
    assert result["checks"]["passed"], result["checks"]
    names = [c["name"] for c in result["checks"]["checks"]]
    assert names == ["line_format", "answered_once", "status_codes", "token_usage"]
    usage = result["usage"]
    # the node's tokenizer and chat template count the prompt exactly as vLLM does
    assert usage["prompt_tokens"] == estimate["input_tokens"]
    assert 0 < usage["completion_tokens"] <= sum(LINE_CAPS.values())
    assert result["requests"] == 4 and result["status_counts"] == {"200": 4}
    rates = {k: Decimal(v) for k, v in PRICES.items()}
    tokens = rates["input_1k_tokens"] * usage["prompt_tokens"] / 1000
    tokens += rates["output_1k_tokens"] * usage["completion_tokens"] / 1000
    surge = Decimal(quoted["quote"]["surge_factor"])  # the quote's load factor applies to the charge too
    cost = Decimal(result["cost"])
    assert tokens * surge <= cost <= Decimal(quoted["quote"]["price"])
    assert cost - tokens * surge < Decimal("0.001")  # the rest is the output's bytes at [pricing] output_mb
    provenance = result["provenance"]
    assert provenance["image_digest"] == sandbox_images["hearth/vllm-cpu:latest"]
    assert provenance["model"] == MODEL and provenance["device"] == "cpu"
    assert provenance["input_cid"] == cid
    assert provenance["tool_versions"]["vllm"][0].isdigit()

    # the artifact, by CID from the node's gateway: one answer per request, within its max_tokens
    async with aiohttp.ClientSession() as s, s.get(f"{url}/ipfs/{result['artifact_cid']}") as r:
        assert r.status == 200
        answers = [json.loads(x) for x in (await r.read()).splitlines()]
    assert sorted(a["custom_id"] for a in answers) == sorted(LINE_CAPS)
    for answer in answers:
        response = answer["response"]
        assert response["status_code"] == 200
        assert response["body"]["model"] == MODEL
        assert response["body"]["usage"]["completion_tokens"] <= LINE_CAPS[answer["custom_id"]]
    assert sum(a["response"]["body"]["usage"]["prompt_tokens"] for a in answers) == usage["prompt_tokens"]

    stages = [e["data"]["stage"] for e in await events(url, job) if e["type"] == "progress"]
    assert {"fetching", "validating", "loading_model", "inferring", "checking"} <= set(stages)
    assert not containers_of(job)
    # One container for the whole job: the quote counts tokens on the host, and the output checks read
    # the file the run left, with no second container (no probe, no re-run to check).
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        assert r.status == 200
        assert sample(await r.text(), "hearth_container_starts_total") == 1


async def test_bad_batches_are_refused_at_quote_time_with_the_line_that_breaks_them(
    quote_node: Any, requester: Signer
) -> None:
    url, did = quote_node.url, quote_node.did
    cases = [
        (jsonl(line("a", "hi"), "{not json"), "invalid_batch", {"line": 2}),
        (jsonl(line("a", "hi", model="gpt-4o")), "unknown_model", {"line": 1, "model": "gpt-4o"}),
        (jsonl(line("a", "hi", max_tokens=17)), "max_tokens_exceeded", {"line": 1, "max_tokens": 17}),
        (jsonl(line("a", "hi"), line("b", "word " * 2100)), "context_length_exceeded", {"line": 2}),
    ]
    async with NodeClient(url) as client:
        for n, (data, code, details) in enumerate(cases):
            cid = await upload(url, data)
            err = await refusal(client, did, requester, batch_envelope(cid, f"bad-{n}"))
            assert (err.status, err.code) == (422, code), err.body
            assert err.body["error"]["domain"] == "validation"
            assert details.items() <= err.body["error"]["details"].items()
        # the context check uses exact prompt tokens: this one is over by its own count
        over = err.body["error"]["details"]
        assert over["prompt_tokens"] + over["max_tokens"] > over["max_context"] == 2048


async def test_unknown_models_and_limits_a_model_cannot_run_in_are_refused_before_any_hold(
    quote_node: Any, requester: Signer
) -> None:
    url, did = quote_node.url, quote_node.did
    async with NodeClient(url) as client:
        cid = await upload(url, jsonl(line("a", "hi")))
        env = batch_envelope(cid, "x", output_spec={"format": "openai_batch_jsonl", "model": "llama-70b"})
        err = await refusal(client, did, requester, env)
        assert (err.status, err.code) == (422, "unknown_model")
        assert err.body["error"]["details"] == {"model": "llama-70b", "known": [MODEL]}
        small = batch_envelope(cid, "y", limits={"cpus": 1, "memory_mb": 1024})
        err = await refusal(client, did, requester, small)
        assert (err.status, err.code) == (403, "memory_too_small_for_model")
        assert err.body["error"]["details"]["min_memory_mb"] == 2560 + 2 + 1024
        offer = await client.capacity()
    assert quote_node.node.ledger.snapshot()["holds"] == 0
    [advertised] = offer["models"]
    assert advertised["name"] == MODEL and advertised["max_context"] == 2048
    assert advertised["price"] == PRICES and advertised["runs_on"] == "cpu_or_gpu"


async def test_a_batch_that_turns_out_bad_after_acceptance_fails_before_any_container(
    infer_node: Any, requester: Signer
) -> None:
    url, did = infer_node.url, infer_node.did
    data = jsonl(line("ok", "hi"), line("long", "word " * 2100))
    from storage import import_bytes

    cid = str(import_bytes(data).cid)  # named before the node has it: the quote prices on the spec
    env = batch_envelope(f"ipfs://{cid}", "late-1")
    async with NodeClient(url) as client:
        quoted = await quote(client, did, requester, env)
        assert quoted["quote"]["estimate"]["basis"] == "spec"
        assert await upload(url, data) == cid
        body = await client.submit(sign_request(requester, did, {"job": env}), quoted["jwt"])
        job = str(body["job"]["id"])
        view = await wait_state(url, job, FINISHED, limit=60)
    assert view["state"] == "failed"
    failure = view["failure"]
    assert (failure["domain"], failure["code"], failure["retryable"]) == (
        "validation",
        "context_length_exceeded",
        False,
    )
    stages = [e["data"]["stage"] for e in await events(url, job) if e["type"] == "progress"]
    assert "validating" in stages and "loading_model" not in stages
    assert not containers_of(job)


async def test_a_model_whose_weights_changed_stops_the_node_from_starting(
    tmp_path: Path, tiny_model: TinyModel
) -> None:
    copy = tmp_path / "weights"
    copy.mkdir()
    for f in tiny_model.path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
        (copy / f.name).chmod(0o644)
    home = write_home(tmp_path / "home", {"models": models_config(TinyModel(copy, tiny_model.cid))})
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    node = Node.from_home(home)
    with pytest.raises(ConfigError) as info:
        await node.start()
    assert info.value.code == "model_hash_mismatch"
    assert info.value.details["expected"] == tiny_model.cid != info.value.details["actual"]
    await node.stop()


# -- GPUs ---------------------------------------------------------------------------------------------------


class GpuEngine:
    """Stands in for the Docker engine of a machine with NVIDIA GPUs, which this one lacks.

    It records the run it is given and answers as vLLM would, so the executor's GPU path (image, device
    pinning, command, result) runs for real up to the engine. ``test_a_batch_runs_on_a_real_gpu`` runs
    the same path on real hardware where there is some.
    """

    def __init__(self) -> None:
        self.specs: list[Any] = []

    async def image_digest(self, tag: str) -> str:
        return "sha256:" + hashlib.sha256(tag.encode()).hexdigest()

    async def run(self, spec: Any, **streams: Any) -> Any:
        from sandbox.runner import RunResult

        self.specs.append(spec)
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        answers = [
            {
                "id": f"vllm-{n}",
                "custom_id": custom_id,
                "response": {
                    "status_code": 200,
                    "request_id": f"vllm-batch-{n}",
                    "body": {
                        "model": MODEL,
                        "usage": {"prompt_tokens": 9, "completion_tokens": cap, "total_tokens": 9 + cap},
                    },
                },
                "error": None,
            }
            for n, (custom_id, cap) in enumerate(LINE_CAPS.items())
        ]
        (spec.output_dir / "output.jsonl").write_bytes(jsonl(*answers))
        streams["on_stderr"]("Running batch: 100% Completed | 4/4 [00:01<00:00, 3.1req/s]")
        return RunResult(
            exit_code=0,
            wall_seconds=1.0,
            output_bytes=1,
            container_id="c",
            image_id=spec.image,
            stderr_tail="",
        )


async def test_a_gpu_job_runs_the_gpu_image_pinned_to_its_devices(
    tmp_path: Path, tiny_model: TinyModel
) -> None:
    from core.config import load_config
    from core.journal import JobRecord
    from node.executor import Workspace
    from node.inference import InferenceExecutor
    from provider.catalog import ModelCatalog
    from provider.pricing import Pricer
    from storage import Blockstore, import_bytes

    home = write_home(tmp_path / "home", {"models": models_config(tiny_model, gpu_memory_mb=1024)})
    cfg = load_config(home)
    store = Blockstore.open(tmp_path / "blocks")
    cid = str(import_bytes(BATCH, store).cid)
    env = batch_envelope(cid, "gpu-1", limits={"cpus": 1, "memory_mb": 4096, "gpus": 1})
    engine = GpuEngine()
    catalog = ModelCatalog.verify(home, cfg.models, gpu_memory_mb=81_559)
    space = Workspace(
        runner=engine,  # type: ignore[arg-type]
        store=store,
        work_dir=tmp_path / "work",
        node_did="did:key:z6Mk-test",
    )
    executor = InferenceExecutor(cfg, Pricer(cfg.pricing, models=cfg.models), space, catalog=catalog)
    job = JobRecord(
        id="hj_gpu",
        iss="did:key:z6Mk-requester",
        job_id="gpu-1",
        kind="vllm_batch",
        idem_key="k",
        envelope_hash="h",
        envelope_json=json.dumps(env),
        state="running",
        price="1.00",
        quote_id=None,
        quote_jwt=None,
        quote_expires_at=None,
        cpus=1,
        memory_mb=4096,
        gpus=1,
        attempts=0,
        failure_domain=None,
        failure_code=None,
        failure_message=None,
        failure_retryable=None,
        result_json=None,
        created_at=0.0,
        updated_at=0.0,
    )
    reports: list[dict[str, Any]] = []
    result = await executor.execute(job, reports.append, gpu_ids=("1",))

    [spec] = engine.specs
    assert spec.gpu_ids == ("1",)
    assert spec.image == await engine.image_digest(cfg.sandbox.vllm_gpu_image)
    assert spec.argv[spec.argv.index("--tensor-parallel-size") + 1] == "1"
    assert "--enforce-eager" not in spec.argv
    assert not any(key.startswith("VLLM_CPU_") for key in spec.env)
    assert {m.target for m in spec.inputs} == {"/model", "/in/batch.jsonl"}
    assert result["provenance"]["device"] == "gpu" and result["checks"]["passed"]
    assert result["usage"]["completion_tokens"] == sum(LINE_CAPS.values())
    assert {
        "stage": "inferring",
        "percent": 100.0,
        "requests_done": 4,
        "requests": 4,
        "done": True,
    } in reports
    # a GPU model asked for without a GPU is refused before anything is held
    with pytest.raises(PolicyError) as info:
        catalog.check(parse_envelope(batch_envelope(cid, "cpu-1")))
    assert info.value.code == "model_needs_gpu"


def _gpu_present() -> bool:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_present(), reason="needs an NVIDIA GPU and the hearth/vllm-gpu image")
async def test_a_batch_runs_on_a_real_gpu(tmp_path: Path, tiny_model: TinyModel, requester: Signer) -> None:
    config = {**infer_config(tiny_model), "models": models_config(tiny_model, gpu_memory_mb=1024)}
    async with live(write_home(tmp_path / "home", config)) as node, NodeClient(node.url) as client:
        cid = await upload(node.url, BATCH)
        env = batch_envelope(cid, "gpu-real", limits={"cpus": 2, "memory_mb": 8192, "gpus": 1})
        body = await client.submit(sign_request(requester, node.did, {"job": env}))
        view = await wait_state(node.url, str(body["job"]["id"]), FINISHED, limit=280)
        assert view["state"] == "completed", view["failure"]
        result = (await client.result(view["id"]))["result"]
    assert result["provenance"]["device"] == "gpu" and result["checks"]["passed"]
