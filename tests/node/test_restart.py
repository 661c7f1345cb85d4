"""Restarting the daemon (SIGKILL included) loses nothing: jobs, quotes, holds, the replay cache."""

from __future__ import annotations

import pytest

from node.client import NodeClient, NodeError, sign_request
from payments.keys import Signer
from tests.conftest import DaemonProcess, make_envelope


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
        assert after["used"]["cpus"] == pytest.approx(1 + 0.5 + 0.5)  # acc + quoted + replayed's hold
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
