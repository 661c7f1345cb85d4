"""A vllm_batch job is paid like a transcode: quoted, funded, run, validated independently and released.

Real parts end to end: anvil with the committed contracts, gasless funding, the tiny test model served by
vLLM's CPU build in the sandbox, the validator's own judgement of the answers (fetched by CID, checked
against the requests), the EIP-712 receipt and the release. The validator also refuses to pass a result
that misreports the tokens it charges for.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from payments import devnet
from payments.keys import new_ed25519
from payments.receipts import usdc_units
from requester.client import NodeClient
from tests.conftest import TinyModel, live
from tests.node.test_inference import BATCH, LINE_CAPS, batch_envelope, infer_config
from tests.payments.paid import paid_home, quote_and_fund, wait_for
from validator import fetch_signed_job, job_envelope, judge, validate


async def test_a_batch_job_is_funded_run_validated_and_released(
    tmp_path: Path, tiny_model: TinyModel, sandbox_images: dict[str, str]
) -> None:
    ph = paid_home(tmp_path / "home", infer_config(tiny_model), chain={"funding_timeout_seconds": 60})
    batch = tmp_path / "batch.jsonl"
    batch.write_bytes(BATCH)
    try:
        before = ph.balances()
        async with live(ph.home) as node, NodeClient(node.url) as client:
            cid = (await client.put_blob(batch))["cid"]
            env = batch_envelope(cid, "paid-batch")
            env["payment"] |= {
                "escrow": ph.net.escrow,
                "payer": ph.payer.address,
                "validator": ph.validator.did,
            }
            job, terms = await quote_and_fund(client, node.did, new_ed25519(), ph, env)
            view = await wait_for(client, job, {"completed", "failed", "expired"}, limit=240)
            assert view["state"] == "completed", view["failure"]
            result = (await client.result(job))["result"]

            report = await validate(client, job, ph.validator)
            names = [c["name"] for c in report.judgement.checks["checks"]]
            assert names == ["line_format", "answered_once", "status_codes", "token_usage"]
            assert report.passed and report.judgement.digest_ok and report.posted
            assert report.judgement.argv_hash_match is None  # the command depends on the node's catalog
            assert report.receipt.amount == usdc_units(result["cost"]) <= terms.amount
            settled = await wait_for(client, job, {"settled"})
            assert settled["payment"]["settlement"]["tx"]["purpose"] == "release"

            # A result claiming other token counts than its answers sum to does not pass.
            signed = await fetch_signed_job(client, job)
            usage = dict(result["usage"], completion_tokens=result["usage"]["completion_tokens"] + 1)
            inflated = dataclasses.replace(signed, result={**signed.result, "usage": usage})
            verdict = await judge(client, inflated, job_envelope(signed.job))
            assert not verdict.passed
            failed = [c for c in verdict.checks["checks"] if not c["passed"]]
            assert [c["name"] for c in failed] == ["token_usage"]
            assert failed[0]["detail"]["reported"] == usage
        after = ph.balances()
        assert after["provider"] - before["provider"] == report.receipt.amount > 0
        assert before["payer"] - after["payer"] == report.receipt.amount
        assert after["escrow"] == before["escrow"]
        assert ph.released_events(terms.to_json()["escrow_job_id"]) == 1
        assert sum(LINE_CAPS.values()) >= result["usage"]["completion_tokens"] > 0
    finally:
        devnet.stop(ph.home)
