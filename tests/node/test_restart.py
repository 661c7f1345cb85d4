"""Restarting the daemon (SIGKILL included) loses nothing: jobs, quotes, holds, the replay cache."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

import pytest

from payments.keys import Signer
from requester.client import NodeClient, NodeError, NodeUnreachable, sign_request
from tests.conftest import DaemonProcess, free_port, make_envelope, write_home


async def test_kill_9_then_restart_keeps_jobs_quotes_holds_and_nonces(
    daemon: DaemonProcess, requester: Signer
) -> None:
    daemon.start()
    async with NodeClient(daemon.url) as c:
        node_did = await c.node_did()
        sign = lambda claims: sign_request(requester, node_did, claims)  # noqa: E731
        accepted = await c.submit(sign({"job": make_envelope("acc", limits={"cpus": 1, "memory_mb": 256})}))
        quote = await c.quote(sign({"job": make_envelope("quoted", limits={"cpus": 0.5, "memory_mb": 128})}))
        replay = sign({"job": make_envelope("replayed")})
        await c.quote(replay)
        before = (await c.capacity())["resources"]

    daemon.kill()  # SIGKILL: no shutdown code runs
    daemon.start()

    async with NodeClient(daemon.url) as c:
        assert await c.node_did() == node_did
        st = await c.status(accepted["job"]["id"])
        assert st["job"]["state"] == "accepted"
        assert st["job"]["price"] == accepted["job"]["price"]
        assert (await c.status(quote["job"]["id"]))["job"]["state"] == "priced"
        after = (await c.capacity())["resources"]
        assert after["used"] == before["used"]
        # acc (committed) + quoted; replayed's quote holds nothing: its requester's share of unfunded
        # holds (a quarter of this machine's two CPUs) was taken by quoted
        assert after["used"]["cpus"] == pytest.approx(1 + 0.5)
        assert after["unfunded"] == before["unfunded"]
        with pytest.raises(NodeError) as exc:
            await c.quote(replay)
        assert exc.value.code == "replayed_jti"
        # the surviving quote is still accepted after the restart
        done = await c.submit(
            sign({"job": make_envelope("quoted", limits={"cpus": 0.5, "memory_mb": 128})}), quote["jwt"]
        )
        assert done["job"]["state"] == "accepted"
        events = [e async for e in c.events(accepted["job"]["id"])]
        assert [e["to"] for e in events] == ["created", "priced", "accepted"]


async def test_sigkill_under_concurrent_load_loses_no_answered_request(
    tmp_path: Path, requester: Signer
) -> None:
    """Concurrent requests share journal commits; whatever the node answered must survive a SIGKILL
    that lands while other requests are still in flight."""
    config = {"policy": {"per_did_concurrency": 10_000}, "capacity": {"overcommit": 1000.0}}
    daemon = DaemonProcess(write_home(tmp_path / "home", config, port=free_port()), 0)
    daemon.port = int(tomllib.loads((daemon.home / "node.toml").read_text())["api"]["port"])
    daemon.start()
    quoted: dict[str, str] = {}  # job id -> the request token the node answered
    accepted: dict[str, str] = {}
    under_way = asyncio.Event()
    try:
        async with NodeClient(daemon.url) as c:
            node_did = await c.node_did()
            small = {"cpus": 0.01, "memory_mb": 64}

            async def pair(n: int) -> None:
                job = make_envelope(f"load-{n}", limits=small)
                quote_token = sign_request(requester, node_did, {"job": job})
                q = await c.quote(quote_token)
                quoted[q["job"]["id"]] = quote_token
                submit_token = sign_request(requester, node_did, {"job": job})
                a = await c.submit(submit_token, q["jwt"])
                accepted[a["job"]["id"]] = submit_token
                if len(accepted) >= 150:
                    under_way.set()

            async def worker(first: int) -> None:
                for n in range(first, 10_000, 16):
                    await pair(n)

            workers = [asyncio.create_task(worker(w)) for w in range(16)]
            await asyncio.wait_for(under_way.wait(), 60)  # well under way, with requests in flight
            daemon.kill()  # SIGKILL mid-stream: no shutdown code runs
            results = await asyncio.gather(*workers, return_exceptions=True)
            assert all(isinstance(r, (NodeError, NodeUnreachable, OSError)) for r in results), results
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()

    daemon.start()
    try:
        async with NodeClient(daemon.url) as c:
            for job, token in quoted.items():
                state = (await c.status(job))["job"]["state"]
                assert state in ("priced", "accepted"), (job, state)
                with pytest.raises(NodeError) as exc:
                    await c.quote(token)  # its nonce was committed with the answer
                assert exc.value.code == "replayed_jti"
            for job in accepted:
                assert (await c.status(job))["job"]["state"] == "accepted"
    finally:
        daemon.stop()
