"""The HTTP API end to end on a real in-process node: admission, errors, idempotency, status, events."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.envelope import node_job_id
from core.journal import Journal
from payments.jwt import verify_node_token
from payments.keys import Signer, new_ed25519
from requester.client import NodeError, sign_request
from tests.conftest import LiveNode, live, make_envelope, write_home


async def post(
    ln: LiveNode, path: str, body: bytes | str, content_type: str = "application/jwt"
) -> tuple[int, Any]:
    data = body.encode() if isinstance(body, str) else body
    async with (
        aiohttp.ClientSession() as s,
        s.post(ln.url + path, data=data, headers={"Content-Type": content_type}) as r,
    ):
        return r.status, await r.json(content_type=None)


async def get(ln: LiveNode, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(ln.url + path) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except json.JSONDecodeError:
            return r.status, text


def assert_error(body: Any, code: str, domain: str | None = None) -> dict[str, Any]:
    err = body["error"]
    assert set(err) == {"code", "domain", "message", "retryable", "details"}
    assert err["code"] == code, err
    if domain is not None:
        assert err["domain"] == domain
    assert isinstance(err["retryable"], bool)
    return err


async def test_quote_is_signed_and_verifiable(live_node: LiveNode, requester: Signer) -> None:
    status, body = await post(live_node, "/v1/quotes", live_node.sign(requester, {"job": make_envelope()}))
    assert status == 201
    claims = verify_node_token(body["jwt"], live_node.did)
    assert claims["aud"] == requester.did
    assert claims["quote"] == body["quote"]
    assert Decimal(body["quote"]["price"]) <= Decimal("5.00")
    assert body["job"]["state"] == "priced"
    assert body["job"]["id"] == node_job_id(requester.did, "clip-1")


async def test_price_above_max_is_refused_with_the_ask(live_node: LiveNode, requester: Signer) -> None:
    token = live_node.sign(requester, {"job": make_envelope(max_price="0.000001")})
    status, body = await post(live_node, "/v1/quotes", token)
    assert status == 402
    err = assert_error(body, "price_above_max", "pricing")
    assert Decimal(err["details"]["ask"]) > Decimal("0.000001")
    assert err["details"]["max_price"] == "0.000001"
    # no side effect: no job, nothing held
    assert live_node.node.journal.find(requester.did, "clip-1") is None
    assert live_node.node.ledger.used().cpus == 0


async def test_quote_then_accept_holds_capacity(live_node: LiveNode, requester: Signer) -> None:
    # a quarter CPU fits one requester's share of unfunded holds on any machine with a CPU
    limits = {"cpus": 0.25, "memory_mb": 128}
    async with live_node.client() as c:
        q = await c.quote(live_node.sign(requester, {"job": make_envelope(limits=limits)}))
        assert q["quote"]["held"] is True
        assert live_node.node.ledger.used().cpus == pytest.approx(0.25)
        body = await c.submit(live_node.sign(requester, {"job": make_envelope(limits=limits)}), q["jwt"])
    assert body["accepted_now"] is True
    assert body["job"]["state"] == "accepted"
    assert body["job"]["price"] == q["quote"]["price"]
    assert verify_node_token(body["jwt"], live_node.did)["status"]["job"]["state"] == "accepted"
    assert live_node.node.ledger.used().cpus == pytest.approx(0.25)


async def test_bare_request_bids_and_accepts_in_one_step(live_node: LiveNode, requester: Signer) -> None:
    status, body = await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": make_envelope()}))
    assert status == 201
    assert body["job"]["state"] == "accepted"
    events = live_node.node.journal.events(body["job"]["id"])
    assert [e.to_state for e in events if e.type == "transition"] == ["created", "priced", "accepted"]


async def test_resubmission_is_idempotent(live_node: LiveNode, requester: Signer) -> None:
    s1, b1 = await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": make_envelope()}))
    # a retry is a new signed request (new jti) for the same envelope: same job, nothing new
    s2, b2 = await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": make_envelope()}))
    assert (s1, s2) == (201, 200)
    assert b1["job"]["id"] == b2["job"]["id"]
    assert b2["accepted_now"] is False
    assert len(live_node.node.journal.events(b1["job"]["id"])) == 3


async def test_job_id_reused_with_other_body_is_a_conflict(live_node: LiveNode, requester: Signer) -> None:
    await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": make_envelope()}))
    other = make_envelope(output_spec={"format": "mp4", "resolution": "1080p"})
    status, body = await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": other}))
    assert status == 409
    assert_error(body, "job_id_conflict", "request")


async def test_same_job_id_from_another_requester_is_another_job(
    live_node: LiveNode, requester: Signer
) -> None:
    _, b1 = await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": make_envelope()}))
    _, b2 = await post(live_node, "/v1/jobs", live_node.sign(new_ed25519(), {"job": make_envelope()}))
    assert b1["job"]["id"] != b2["job"]["id"]


async def test_quote_for_other_job_is_refused(live_node: LiveNode, requester: Signer) -> None:
    async with live_node.client() as c:
        q = await c.quote(live_node.sign(requester, {"job": make_envelope("a")}))
        await c.quote(live_node.sign(requester, {"job": make_envelope("b")}))
        with pytest.raises(NodeError) as exc:
            await c.submit(live_node.sign(requester, {"job": make_envelope("b")}), q["jwt"])
    assert exc.value.code == "invalid_quote"


async def test_forged_quote_is_refused(live_node: LiveNode, requester: Signer) -> None:
    forged = sign_request(new_ed25519(), requester.did, {"quote": {"quote_id": "q_x"}})
    async with live_node.client() as c:
        with pytest.raises(NodeError) as exc:
            await c.submit(live_node.sign(requester, {"job": make_envelope()}), forged)
    assert exc.value.code == "invalid_quote"
    assert exc.value.status == 401


async def test_tampered_request_is_refused(live_node: LiveNode, requester: Signer) -> None:
    import base64

    token = live_node.sign(requester, {"job": make_envelope()})
    h, p, s = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    claims["job"]["payment"]["max_price"] = "99.00"
    p2 = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    status, body = await post(live_node, "/v1/quotes", f"{h}.{p2}.{s}")
    assert status == 401
    assert_error(body, "bad_signature", "auth")
    assert live_node.node.journal.find(requester.did, "clip-1") is None


async def test_replay_is_refused(live_node: LiveNode, requester: Signer) -> None:
    token = live_node.sign(requester, {"job": make_envelope()})
    assert (await post(live_node, "/v1/quotes", token))[0] == 201
    status, body = await post(live_node, "/v1/quotes", token)
    assert status == 409
    assert_error(body, "replayed_jti", "auth")


async def test_wrong_audience_is_refused(live_node: LiveNode, requester: Signer) -> None:
    token = sign_request(requester, new_ed25519().did, {"job": make_envelope()})
    status, body = await post(live_node, "/v1/quotes", token)
    assert status == 403
    assert_error(body, "wrong_audience", "auth")


async def test_eth_wallet_requester_is_accepted(live_node: LiveNode, eth_requester: Signer) -> None:
    status, body = await post(live_node, "/v1/jobs", live_node.sign(eth_requester, {"job": make_envelope()}))
    assert status == 201
    assert body["job"]["requester"].startswith("did:pkh:eip155:31337:0x")


async def test_oversized_body_is_refused_before_parsing(live_node: LiveNode) -> None:
    cap = live_node.node.cfg.api.max_body_bytes
    status, body = await post(live_node, "/v1/quotes", b"x" * (cap + 1))
    assert status == 413
    assert_error(body, "body_too_large", "request")

    async def chunks() -> Any:  # no Content-Length: the cap applies while reading
        for _ in range(cap // 4096 + 2):
            yield b"y" * 4096

    async with (
        aiohttp.ClientSession() as s,
        s.post(live_node.url + "/v1/jobs", data=chunks(), headers={"Content-Type": "application/jwt"}) as r,
    ):
        assert r.status == 413
        assert_error(await r.json(), "body_too_large")


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        ("", "application/jwt", 400, "empty_body"),
        ("not-a-jwt", "application/jwt", 400, "malformed_jwt"),
        ("{", "application/json", 400, "malformed_json"),
        ('{"request": 5}', "application/json", 422, "malformed_body"),
        ("[]", "application/json", 422, "malformed_body"),
        ("x.y.z", "image/png", 415, "unsupported_media_type"),
    ],
)
async def test_malformed_bodies(
    live_node: LiveNode, body: str, content_type: str, status: int, code: str
) -> None:
    got_status, got = await post(live_node, "/v1/jobs", body, content_type)
    assert got_status == status
    assert_error(got, code)


async def test_malformed_envelope_is_refused_with_problems(live_node: LiveNode, requester: Signer) -> None:
    bad = make_envelope()
    bad["kind"] = "shell"
    status, body = await post(live_node, "/v1/quotes", live_node.sign(requester, {"job": bad}))
    assert status == 422
    err = assert_error(body, "invalid_envelope", "request")
    assert err["details"]["problems"]
    bad = make_envelope()
    bad["output_spec"] = {"format": "mp4", "resolution": "720p", "extra_flags": "-i /etc/passwd"}
    status, body = await post(live_node, "/v1/quotes", live_node.sign(requester, {"job": bad}))
    assert status == 422
    assert any("extra_flags" in p["loc"] for p in body["error"]["details"]["problems"])


async def test_status_result_and_unknown_job(live_node: LiveNode, requester: Signer) -> None:
    _, body = await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": make_envelope()}))
    job = body["job"]["id"]
    status, st = await get(live_node, f"/v1/jobs/{job}")
    assert status == 200 and st["job"]["state"] == "accepted"
    assert verify_node_token(st["jwt"], live_node.did)["sub"] == job
    status, res = await get(live_node, f"/v1/jobs/{job}/result")
    assert status == 409
    err = assert_error(res, "result_not_ready")
    assert err["retryable"] is True
    status, res = await get(live_node, "/v1/jobs/hj_nope")
    assert status == 404
    assert_error(res, "job_not_found")


async def test_events_stream_backlog_and_live(live_node: LiveNode, requester: Signer) -> None:
    async with live_node.client() as c:
        q = await c.quote(live_node.sign(requester, {"job": make_envelope()}))
        job = q["job"]["id"]
        backlog = [e async for e in c.events(job)]
        assert [e["to"] for e in backlog] == ["created", "priced"]

        seen: list[dict[str, Any]] = []

        async def follow() -> None:
            async for e in c.events(job, follow=True, after=backlog[-1]["seq"]):
                seen.append(e)

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.1)
        await c.submit(live_node.sign(requester, {"job": make_envelope()}), q["jwt"])
        await c.cancel(job, live_node.sign(requester, {"cancel": job}))
        await asyncio.wait_for(task, 5)  # the stream ends at a terminal state
    assert [e["to"] for e in seen] == ["accepted", "cancelled"]


async def test_cancel_needs_the_requesters_signature(live_node: LiveNode, requester: Signer) -> None:
    _, body = await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": make_envelope()}))
    job = body["job"]["id"]
    status, err = await post(
        live_node, f"/v1/jobs/{job}/cancel", live_node.sign(new_ed25519(), {"cancel": job})
    )
    assert status == 403
    assert_error(err, "not_job_owner", "auth")
    status, ok = await post(live_node, f"/v1/jobs/{job}/cancel", live_node.sign(requester, {"cancel": job}))
    assert status == 200 and ok["outcome"] == "cancelled" and ok["job"]["state"] == "cancelled"
    assert live_node.node.ledger.used().cpus == 0
    status, again = await post(
        live_node, f"/v1/jobs/{job}/cancel", live_node.sign(requester, {"cancel": job})
    )
    assert status == 200 and again["outcome"] == "cancelled"


async def test_capacity_offer_is_signed(live_node: LiveNode) -> None:
    status, body = await get(live_node, "/v1/capacity")
    assert status == 200
    claims = verify_node_token(body["jwt"], live_node.did)
    assert claims["offer"]["node"] == live_node.did == body["node"]
    assert body["resources"]["total"]["cpus"] > 0
    assert set(body["kinds"]) == {"ffmpeg_transcode", "vllm_batch"}


async def test_health_ready_metrics_openapi(live_node: LiveNode, requester: Signer) -> None:
    await post(
        live_node, "/v1/quotes", live_node.sign(requester, {"job": make_envelope(max_price="0.000001")})
    )
    await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": make_envelope("x")}))
    assert await get(live_node, "/healthz") == (200, {"status": "ok"})
    status, ready = await get(live_node, "/readyz")
    assert status == 200 and ready["node"] == live_node.did
    status, text = await get(live_node, "/metrics")
    assert status == 200
    assert 'hearth_quotes_total{outcome="refused",reason="price_above_max"} 1.0' in text
    assert 'hearth_jobs{state="accepted"} 1.0' in text
    status, doc = await get(live_node, "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {
        "/v1/quotes",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/result",
        "/v1/jobs/{id}/events",
        "/v1/jobs/{id}/cancel",
        "/v1/capacity",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(doc["paths"])


async def test_unknown_route_and_method_use_the_error_shape(live_node: LiveNode) -> None:
    status, body = await get(live_node, "/v2/nothing")
    assert status == 404
    assert_error(body, "not_found")
    status, body = await get(live_node, "/v1/quotes")
    assert status == 405
    assert_error(body, "method_not_allowed")


async def test_policy_deny_and_per_did_concurrency(tmp_path: Path, requester: Signer) -> None:
    denied = new_ed25519()
    home = write_home(tmp_path / "h", {"policy": {"deny_dids": [denied.did], "per_did_concurrency": 2}})
    async with live(home) as ln:
        status, body = await post(ln, "/v1/quotes", ln.sign(denied, {"job": make_envelope()}))
        assert status == 403
        assert_error(body, "did_denied")
        for i in range(2):
            assert (await post(ln, "/v1/jobs", ln.sign(requester, {"job": make_envelope(f"j{i}")})))[0] == 201
        status, body = await post(ln, "/v1/quotes", ln.sign(requester, {"job": make_envelope("j3")}))
        assert status == 429
        assert assert_error(body, "did_concurrency", "scheduling")["retryable"] is True


async def test_capacity_exhausted_is_retryable(tmp_path: Path, requester: Signer) -> None:
    home = write_home(tmp_path / "h", {"capacity": {"cpus": 2, "memory_mb": 4096, "reserve_memory_mb": 0}})
    async with live(home) as ln:
        assert (
            await post(ln, "/v1/jobs", ln.sign(requester, {"job": make_envelope("a", limits={"cpus": 2})}))
        )[0] == 201
        status, body = await post(
            ln, "/v1/quotes", ln.sign(requester, {"job": make_envelope("b", limits={"cpus": 1})})
        )
        assert status == 503
        assert assert_error(body, "insufficient_capacity", "scheduling")["retryable"] is True


async def test_expired_quote_frees_capacity_and_can_be_requoted(tmp_path: Path, requester: Signer) -> None:
    home = write_home(tmp_path / "h", {"api": {"host": "127.0.0.1", "port": 0, "quote_ttl_seconds": 5}})
    async with live(home) as ln:
        clock = [ln.node.now()]
        ln.node.admission._now = lambda: clock[0]
        ln.node.admission.intake.verifier._now = lambda: clock[0]  # type: ignore[attr-defined]
        async with ln.client() as c:
            q = await c.quote(ln.sign(requester, {"job": make_envelope()}, now=clock[0]))
            clock[0] += 10
            assert ln.node.admission.expire_quotes() == 1
            assert ln.node.ledger.used().cpus == 0
            assert ln.node.journal.require(q["job"]["id"]).state == "expired"
            with pytest.raises(NodeError) as exc:
                await c.submit(ln.sign(requester, {"job": make_envelope()}, now=clock[0]), q["jwt"])
            assert exc.value.code == "quote_expired" and exc.value.retryable
            q2 = await c.quote(ln.sign(requester, {"job": make_envelope()}, now=clock[0]))
            assert q2["quote"]["quote_id"] != q["quote"]["quote_id"]
            done = await c.submit(ln.sign(requester, {"job": make_envelope()}, now=clock[0]), q2["jwt"])
            assert done["job"]["state"] == "accepted"


async def test_malformed_envelope_leaves_no_replay_record(live_node: LiveNode, requester: Signer) -> None:
    import base64

    bad = make_envelope()
    bad["kind"] = "shell"
    token = live_node.sign(requester, {"job": bad})
    status, _ = await post(live_node, "/v1/quotes", token)
    assert status == 422
    p = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    # nothing was recorded for the refused request: its jti is still unused
    assert live_node.node.journal.check_and_record(requester.did, claims["jti"], claims["exp"] + 60) is True


async def test_cancel_naming_another_job_is_refused_without_a_trace(
    live_node: LiveNode, requester: Signer
) -> None:
    import base64

    _, body = await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": make_envelope()}))
    job = body["job"]["id"]
    token = live_node.sign(requester, {"cancel": "hj_other"})
    status, err = await post(live_node, f"/v1/jobs/{job}/cancel", token)
    assert status == 422
    assert_error(err, "invalid_cancel")
    assert live_node.node.journal.require(job).state == "accepted"
    p = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    assert live_node.node.journal.check_and_record(requester.did, claims["jti"], claims["exp"] + 60) is True


async def test_live_quote_is_returned_again_not_repriced(live_node: LiveNode, requester: Signer) -> None:
    s1, first = await post(live_node, "/v1/quotes", live_node.sign(requester, {"job": make_envelope()}))
    s2, again = await post(live_node, "/v1/quotes", live_node.sign(requester, {"job": make_envelope()}))
    assert (s1, s2) == (201, 200)
    assert again["reused"] is True
    assert again["jwt"] == first["jwt"] and again["quote"] == first["quote"]
    assert live_node.node.ledger.used().cpus == pytest.approx(0.5)  # held once


@pytest.mark.parametrize("max_price", ["5.00", "0.000001"])
async def test_a_request_is_answered_only_once_its_nonce_is_committed(
    live_node: LiveNode, requester: Signer, max_price: str
) -> None:
    import base64
    import sqlite3

    token = live_node.sign(requester, {"job": make_envelope(max_price=max_price)})
    status, _ = await post(live_node, "/v1/quotes", token)
    accepted = max_price == "5.00"
    assert status == (201 if accepted else 402)
    p = token.split(".")[1]
    jti = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))["jti"]
    conn = sqlite3.connect(live_node.node.journal.path)  # sees only what is committed
    try:
        # a quote's nonce is durable with its answer; a refusal leaves none
        count = conn.execute("SELECT COUNT(*) FROM nonces WHERE jti = ?", (jti,)).fetchone()[0]
        assert count == (1 if accepted else 0)
    finally:
        conn.close()


async def test_a_checked_envelope_is_reused_only_for_the_exact_same_json(
    live_node: LiveNode, requester: Signer
) -> None:
    # The node keeps the envelopes it has validated, so that an acceptance does not validate its
    # quote's envelope again. `false` equals `0` in Python; strict validation tells them apart, so must
    # the cache.
    status, _ = await post(live_node, "/v1/quotes", live_node.sign(requester, {"job": make_envelope()}))
    assert status == 201
    same_in_python = make_envelope()
    same_in_python["limits"]["gpus"] = False
    status, body = await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": same_in_python}))
    assert status == 422
    assert_error(body, "invalid_envelope", "request")
    status, body = await post(live_node, "/v1/jobs", live_node.sign(requester, {"job": make_envelope()}))
    assert (status, body["job"]["state"]) == (201, "accepted")


async def test_no_answer_leaves_before_what_it_says_is_committed(
    live_node: LiveNode, requester: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold every group commit back for a moment: the answers must wait for it, and what they report
    # must then be visible to another connection (durable), nonce included.
    delay = 0.3
    held: set[int] = set()
    commit = Journal._commit_scheduled

    def later(self: Journal, group: Any) -> None:
        if id(group) not in held:
            held.add(id(group))
            asyncio.get_running_loop().call_later(delay, later, self, group)
            return
        commit(self, group)

    monkeypatch.setattr(Journal, "_commit_scheduled", later)
    path = live_node.node.journal.path

    def committed(sql: str, *args: str) -> int:
        conn = sqlite3.connect(path)
        try:
            return int(conn.execute(sql, args).fetchone()[0])
        finally:
            conn.close()

    token = live_node.sign(requester, {"job": make_envelope("durable")})
    started = time.monotonic()
    status, body = await post(live_node, "/v1/quotes", token)
    assert status == 201
    assert time.monotonic() - started >= delay
    job = body["job"]["id"]
    assert committed("SELECT COUNT(*) FROM jobs WHERE id = ? AND state = 'priced'", job) == 1
    jti = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "==="))["jti"]
    assert committed("SELECT COUNT(*) FROM nonces WHERE jti = ?", jti) == 1

    # a refusal records nothing: its nonce is not kept, so the same token is judged again
    low = live_node.sign(requester, {"job": make_envelope("cheap", max_price="0.000001")})
    status, body = await post(live_node, "/v1/quotes", low)
    assert status == 402
    assert_error(body, "price_above_max", "pricing")
    jti = json.loads(base64.urlsafe_b64decode(low.split(".")[1] + "==="))["jti"]
    assert committed("SELECT COUNT(*) FROM nonces WHERE jti = ?", jti) == 0
    status, body = await post(live_node, "/v1/quotes", low)
    assert (status, body["error"]["code"]) == (402, "price_above_max")


async def test_a_failed_commit_answers_a_retryable_error_and_holds_nothing(
    live_node: LiveNode, requester: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = Journal._commit_group

    def failing(self: Journal, group: Any) -> Any:
        if self._group is group:  # a constraint checked only at COMMIT: the whole group fails there
            conn = self._connection()
            conn.execute("PRAGMA defer_foreign_keys = ON")
            conn.execute(
                "INSERT INTO events (job, at, type, actor, reason) VALUES ('hj_x', 0, 'note', 't', 'orphan')"
            )
        return commit(self, group)

    monkeypatch.setattr(Journal, "_commit_group", failing)
    token = live_node.sign(requester, {"job": make_envelope("lost")})
    status, body = await post(live_node, "/v1/quotes", token)
    err = assert_error(body, "journal_write_failed")
    assert status >= 500 and err["retryable"] is True
    assert live_node.node.journal.find(requester.did, "lost") is None
    assert live_node.node.ledger.used().cpus == 0  # the quote's hold was undone with its write

    monkeypatch.setattr(Journal, "_commit_group", commit)
    status, body = await post(live_node, "/v1/quotes", token)  # nothing of it was kept, nonce included
    assert (status, body["job"]["state"]) == (201, "priced")
    assert live_node.node.ledger.used().cpus == pytest.approx(0.5)
