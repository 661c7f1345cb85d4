"""The scripted agent of ``hearth demo --agent``: an MCP client (the official SDK, over stdio) with no LLM.

It launches ``hearth mcp --home HOME``, then runs the autonomous round through the tools and prints each
call and a short view of its JSON result: find_providers, put_input, quote_job, submit_job (validated by a
validator service, paid from the owner's spending grant), wait_job and job_status until settled,
job_result, the same idempotency key again (the same job, no second spend), more submissions until the
grant's period cap refuses one (the refused job, taken but never funded, is cancelled), and budget. The
jobs it ran go to ``--out`` as JSON, for the balances and transaction hashes the demo prints after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

REPO = Path(__file__).resolve().parent.parent


def brief(doc: Any, width: int = 150) -> str:
    """One line of JSON, cut at ``width`` characters."""
    text = json.dumps(doc, separators=(",", ":"), default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


class Agent:
    """The MCP session: every call is printed with its result; an error result is returned as such."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def call(self, name: str, show: dict[str, Any] | None = None, **arguments: Any) -> tuple[bool, Any]:
        shown = arguments if show is None else show
        print(f"\033[2m  -> {name}({brief(shown, 120)})\033[0m", flush=True)
        result = await self.session.call_tool(name, arguments)
        doc = (
            json.loads(result.content[0].text) if result.content and result.content[0].type == "text" else {}
        )
        error = bool(result.isError)
        print(f"  <- {'isError ' if error else ''}{brief(doc)}", flush=True)
        return error, doc

    async def ok(self, name: str, show: dict[str, Any] | None = None, **arguments: Any) -> Any:
        error, doc = await self.call(name, show, **arguments)
        if error:
            sys.exit(f"{name} failed: {json.dumps(doc)}")
        return doc


def payment(args: argparse.Namespace) -> dict[str, Any]:
    """The envelope's payment block: the owner pays (through the grant), the validator service judges."""
    return {
        "max_price": "2.50",
        "currency": "usdc",
        "chain_id": args.chain_id,
        "escrow": args.escrow,
        "payer": args.owner,
        "validator": args.validator,
    }


def batch_envelope(args: argparse.Namespace, job_id: str, input_uri: str) -> dict[str, Any]:
    """A paid vLLM batch on the tiny model, every request answered, judged by the validator service."""
    return {
        "job_id": job_id,
        "kind": "vllm_batch",
        "input_uri": input_uri,
        "output_spec": {
            "format": "openai_batch_jsonl",
            "model": args.model,
            "max_tokens": 16,
            "max_requests": 100,
        },
        "limits": {"timeout_seconds": 600, "max_output_mb": 20, "cpus": 2, "memory_mb": 4096, "gpus": 0},
        "validation": {"all_answered": True, "validator_url": args.validator_url},
        "payment": payment(args),
    }


def envelope(args: argparse.Namespace, job_id: str, input_uri: str) -> dict[str, Any]:
    """A paid transcode: 8 s of the clip at 480p, validated by the validator service at ``validator_url``."""
    return {
        "job_id": job_id,
        "kind": "ffmpeg_transcode",
        "input_uri": input_uri,
        "output_spec": {
            "format": "mp4",
            "resolution": "480p",
            "codec": "h264",
            "audio_codec": "aac",
            "clip": {"start_seconds": 1, "duration_seconds": 8},
        },
        "limits": {"timeout_seconds": 600, "max_output_mb": 200, "cpus": 1, "memory_mb": 1024, "gpus": 0},
        "validation": {
            "min_duration_seconds": 7.5,
            "max_duration_seconds": 8.5,
            "required_streams": ["video", "audio"],
            "validator_url": args.validator_url,
        },
        "payment": payment(args),
    }


async def until_settled(a: Agent, job: str, seconds: float) -> dict[str, Any]:
    """wait_job until the job completes, then job_status until the validator's verdict settles it."""
    waited = await a.ok("wait_job", job=job, timeout_seconds=min(seconds, 300))
    state = waited["state"]
    if state not in ("completed", "settled"):
        sys.exit(f"job {job} ended {state}")
    give_up = time.monotonic() + seconds
    quiet = 0
    while True:
        view = (await a.session.call_tool("job_status", {"job": job})).content[0]
        job_view = json.loads(view.text)["job"] if view.type == "text" else {}
        if job_view.get("state") in ("settled", "refunded"):
            print(f"  <- job_status: {job_view['state']} (polled {quiet + 1} times)", flush=True)
            return dict(job_view)
        if time.monotonic() > give_up:
            sys.exit(f"job {job} is {job_view.get('state')} after {seconds:.0f} s, not settled")
        quiet += 1
        await asyncio.sleep(0.25)


async def run(args: argparse.Namespace) -> None:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "cli.main", "mcp", "--home", str(args.home)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=str(REPO),
    )
    jobs: list[dict[str, Any]] = []
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        a = Agent(session)
        tools = await session.list_tools()
        print(f"  tools: {', '.join(t.name for t in tools.tools)}")

        print("\n  1. Who sells transcodes (registry, signed offers, reputation)")
        found = await a.ok("find_providers", kind="ffmpeg_transcode")
        for p in found["providers"]:
            print(
                f"     {p['did'][:40]}...  {p.get('endpoint')}  "
                f"minimum {p['prices'].get('minimum_per_job')} USDC"
            )

        print("\n  2. The input, uploaded to every provider")
        put = await a.ok("put_input", path=str(args.clip), idempotency_key="clip-1")
        inputs = {"ffmpeg_transcode": put["uri"]}
        if args.batch is not None:
            found = await a.ok("find_providers", kind="vllm_batch", model=args.model)
            print(f"     {len(found['providers'])} provider(s) serve {args.model}")
            batch = await a.ok("put_input", path=str(args.batch), idempotency_key="batch-1")
            inputs["vllm_batch"] = batch["uri"]

        print("\n  3. Quotes (nothing accepted, nothing paid)")
        env = envelope(args, "agent-job-1", inputs["ffmpeg_transcode"])
        shown: dict[str, Any] = {
            "envelope": {"job_id": "agent-job-1", "kind": "ffmpeg_transcode", "...": "..."}
        }
        quotes = await a.ok("quote_job", shown, envelope=env)
        for q in quotes["quotes"]:
            print(f"     {q['did'][:40]}...  {q.get('price') or q.get('error')}")

        n = 0
        while True:
            n += 1
            job_id = f"agent-job-{n}"
            kind = "vllm_batch" if n == 2 and args.batch is not None else "ffmpeg_transcode"
            make = batch_envelope if kind == "vllm_batch" else envelope
            env = make(args, job_id, inputs[kind])
            key = f"job-{n}"
            shown = {
                "envelope": {"job_id": job_id, "kind": kind, "...": "..."},
                "idempotency_key": key,
            }
            print(f"\n  {3 + n}. Submit {job_id} ({kind}): routed to the cheapest, funded from the grant")
            t0 = time.monotonic()
            error, sub = await a.call(
                "submit_job", shown, envelope=env, workflow="clips", idempotency_key=key
            )
            if error:
                err = sub["error"]
                print(f"     refused: {err['code']} ({err['domain']}), retryable {err['retryable']}")
                print(f"     {err['message']}")
                details = err.get("details") or {}
                refusal = details.get("refusal") or {}
                if refusal:
                    left = int(refusal["left_this_period"]) / 1e6
                    print(f"     the grant has {left:.6f} USDC left this period")
                over = details.get("job")
                if over:
                    print("     the node took the job but it was never funded: the agent cancels it")
                    await a.ok("cancel_job", job=over, idempotency_key=f"cancel-{n}")
                if len(jobs) < 2:
                    sys.exit(f"{job_id} was refused before two jobs were paid: the demo expected it to run")
                break
            job = sub["job"]
            print(f"     {job} at {sub['endpoint']} for {sub['amount_usdc']} USDC from grant {sub['grant']}")
            final = await until_settled(a, job, args.timeout)
            took = time.monotonic() - t0
            print(f"     {job} settled {took:.1f} s after submit_job")
            result = await a.ok("job_result", job=job)
            print(f"     artifact {result['artifact_cid']}  {result['gateway_url']}")
            jobs.append(
                {"job": job, "kind": kind, "endpoint": sub["endpoint"], "seconds": took, "view": final}
            )
            if n == 1:
                print("\n     The same idempotency key again: the same job, no second spend")
                again = await a.ok("submit_job", shown, envelope=env, workflow="clips", idempotency_key=key)
                if again["job"] != job or not again["replayed"]:
                    sys.exit(f"a second submission with the same key gave {again}")
                print(f"     replayed {again['replayed']}: {again['job']}, the job already paid for")
            if n > 10:
                sys.exit("the grant's cap never refused a submission")

        print("\n  Budget: the local per-day budget and the grant on chain")
        left = await a.ok("budget", workflow="clips")
        day = left["local"]["per_day"]
        grant = left["grant"]
        print(f"     local per day: {brief(day, 110)}")
        print(
            f"     grant {grant['grant']}: {int(grant['left_this_period']) / 1e6:.6f} of "
            f"{int(grant['period_max']) / 1e6:.6f} USDC left this period; agent {left['agent']}"
        )
    args.out.write_text(json.dumps(jobs, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--home", type=Path, required=True)
    p.add_argument("--clip", type=Path, required=True)
    p.add_argument("--validator-url", required=True)
    p.add_argument("--validator", required=True, help="the validator's did:pkh")
    p.add_argument("--owner", required=True, help="the grant owner's address (the envelope's payer)")
    p.add_argument("--escrow", required=True)
    p.add_argument("--chain-id", type=int, required=True)
    p.add_argument("--batch", type=Path, help="also a vllm_batch job: this OpenAI batch JSONL")
    p.add_argument("--model", default="tiny-llama", help="the batch's model")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--out", type=Path, required=True)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
