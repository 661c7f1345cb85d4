"""A paid round settles with no person in it: real anvil, a real node daemon, the validator service as a
real process. The job completes, the node sends the notice through its webhook outbox, the validator
judges the transcode, stores and posts its receipt, and the node releases the escrow. A validator killed
-9 mid-validation resumes at restart and posts exactly one receipt; a node that is down when the receipt is
ready gets it when it is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.defaults import KEY_FILENAME
from payments import devnet
from payments.jwt import request_claims, sign_jwt
from payments.keys import Signer, load_key
from requester.client import NodeClient
from sandbox.ffmpeg import make_test_clip
from tests.conftest import DaemonProcess, free_port
from tests.payments.paid import PaidHome, paid_envelope, paid_home, quote_and_fund, wait_for
from tests.promtext import sample
from tests.validator.vservice import ValidatorProcess
from validator.service import JUDGED, VALIDATING
from validator.verdicts import VerdictStore

CONFIG = {
    "scheduler": {"paused": False},
    # the validator listens on loopback; the notices' retries are quick for the test
    "webhooks": {"allow_private_addresses": True, "backoff_base_seconds": 0.2, "backoff_max_seconds": 1},
}


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_clip(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=2, width=320, height=240)


@pytest.fixture
def ph(tmp_path: Path, sandbox_images: dict[str, str]) -> Iterator[PaidHome]:
    home = paid_home(tmp_path / "home", CONFIG, chain={"funding_timeout_seconds": 30})
    try:
        yield home
    finally:
        devnet.stop(home.home)


@pytest.fixture
def node(ph: PaidHome) -> Iterator[DaemonProcess]:
    d = DaemonProcess(ph.home, free_port())
    d.start(timeout=60)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def validator(ph: PaidHome, tmp_path: Path) -> Iterator[ValidatorProcess]:
    key = next(a.key_file for a in ph.net.accounts if a.role == "validator")
    vp = ValidatorProcess(Path(key), tmp_path / "vhome", free_port())
    try:
        yield vp
    finally:
        vp.stop()


async def submit(
    node: DaemonProcess, ph: PaidHome, requester: Signer, clip: Path, name: str, url: str
) -> str:
    async with NodeClient(node.url) as client:
        did = await client.node_did()
        cid = (await client.put_blob(clip))["cid"]
        env = paid_envelope(ph, name, cid)
        env["validation"]["validator_url"] = url + "/v1/validations"
        job, _ = await quote_and_fund(client, did, requester, ph, env)
    return job


async def settled(node: DaemonProcess, job: str, limit: float = 180) -> dict[str, Any]:
    async with NodeClient(node.url) as client:
        return await wait_for(client, job, {"settled", "refunded", "failed", "expired"}, limit=limit)


def escrow_id(view: dict[str, Any]) -> str:
    return str(view["payment"]["terms"]["escrow_job_id"])


async def wait_until(check: Any, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


def receipts_posted(vp: ValidatorProcess) -> list[dict[str, Any]]:
    return [line for line in vp.log_lines() if str(line.get("message", "")).startswith("receipt of job")]


async def test_the_paid_round_settles_with_no_manual_step(
    ph: PaidHome, node: DaemonProcess, validator: ValidatorProcess, requester: Signer, clip: Path
) -> None:
    validator.start()
    before = ph.balances()
    job = await submit(node, ph, requester, clip, "auto-1", validator.url)
    view = await settled(node, job)
    assert view["state"] == "settled", view
    assert view["validation_notice"]["delivered"] is True, view["validation_notice"]
    receipt = view["payment"]["settlement"]["receipt"]
    assert receipt["passed"] is True
    assert view["payment"]["settlement"]["tx"]["purpose"] == "release"
    amount = int(receipt["amount"])
    after = ph.balances()
    assert after["provider"] - before["provider"] == amount > 0
    assert ph.released_events(escrow_id(view)) == 1
    metrics = validator.metrics()
    assert sample(metrics, "hearth_validator_verdicts_total", outcome="passed") == 1
    assert sample(metrics, "hearth_validator_posts_total", outcome="accepted") == 1
    assert sample(metrics, "hearth_validator_jobs", state="posted") == 1
    # the verdict is kept: a late notice for the job is answered with it, and nothing is judged again
    async with NodeClient(node.url) as client:
        node_did = await client.node_did()
    node_key = load_key(ph.home / KEY_FILENAME)
    late = sign_jwt(
        node_key, request_claims(node_key, ph.validator.did, extra={"job": job, "node": node.url})
    )
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            validator.url + "/v1/validations", data=late, headers={"Content-Type": "application/jwt"}
        ) as resp,
    ):
        assert resp.status == 200
        answer = await resp.json()
    assert answer["node"] == node_did and answer["state"] == "posted"
    assert answer["verdict"]["passed"] is True and answer["verdict"]["receipt"] == receipt
    assert sample(validator.metrics(), "hearth_validator_verdicts_total", outcome="passed") == 1


async def test_a_validator_killed_mid_validation_resumes_and_posts_one_receipt(
    ph: PaidHome, node: DaemonProcess, validator: ValidatorProcess, requester: Signer, clip: Path
) -> None:
    validator.start(crash_at=VALIDATING)
    job = await submit(node, ph, requester, clip, "crash-1", validator.url)
    assert validator.wait_exit(180) == -9  # killed as it started judging
    store = VerdictStore.open(validator.home / "validator")
    try:
        assert [(r.job, r.state, r.receipt_json) for r in store.open_rows()] == [(job, "validating", None)]
    finally:
        store.close()
    validator.start()  # resumes the open row at start; nothing sends a second notice
    view = await settled(node, job)
    assert view["state"] == "settled", view
    assert ph.released_events(escrow_id(view)) == 1
    assert len(receipts_posted(validator)) == 1
    assert any("resuming 1 job" in str(line.get("message")) for line in validator.log_lines())


async def test_a_node_down_when_the_receipt_is_ready_gets_it_when_it_is_back(
    ph: PaidHome, node: DaemonProcess, validator: ValidatorProcess, requester: Signer, clip: Path
) -> None:
    validator.start(crash_at=JUDGED)
    job = await submit(node, ph, requester, clip, "down-1", validator.url)
    assert validator.wait_exit(180) == -9  # the receipt is stored, not posted
    store = VerdictStore.open(validator.home / "validator")
    try:
        [row] = store.open_rows()
        stored = row.receipt
    finally:
        store.close()
    assert row.state == "judged" and stored is not None
    node.stop()
    validator.start()
    await wait_until(
        lambda: (
            (sample(validator.metrics(), "hearth_validator_posts_total", outcome="unreachable") or 0) >= 2
        ),
        30,
        "the validator never tried the node that is down",
    )
    node.start(timeout=60)
    view = await settled(node, job)
    assert view["state"] == "settled", view
    assert view["payment"]["settlement"]["receipt"] == stored["receipt"]  # the stored receipt, as signed
    assert ph.released_events(escrow_id(view)) == 1
    assert sample(validator.metrics(), "hearth_validator_posts_total", outcome="accepted") == 1
