"""The signed offer and its pushes to registries.

The registries here are real aiohttp servers that record what they are sent; the node is a real in-process
node behind its HTTP API. When each push is due (at once, at the heartbeat, backing off and capped) is
checked on a clock the test moves (:class:`PusherClock`); against the live node only what the machine's
speed cannot change: pushes are never early, and they are counted, not timed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from core.config import NodeConfig, RegistrySection, parse_config
from core.errors import ConfigError
from payments import devnet
from payments.jwt import verify_node_token
from payments.keys import Signer, new_ed25519
from provider.capacity import CapacityLedger, MachineInfo, Resources, discover
from provider.catalog import ModelCatalog
from provider.offers import OfferIssuer, offer_document, offer_fingerprint
from provider.registry import OfferPusher, backoff_delay
from tests.conftest import LiveNode, free_port, live, make_envelope, write_home
from tests.payments.paid import paid_home
from tests.promtext import sample
from tests.provider.nvml_fake import FakeNvml, recorded_answers

PUBLIC_URL = "https://node.example.org:8787"
STAMPS = ("issued_at", "sequence", "jwt")


class Registry:
    """A registry that records each offer POSTed to it, with its arrival time, and answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.hang = False  # never answer (until the test ends)
        self.clock: Callable[[], float] = time.monotonic  # what each arrival is stamped with
        self.pushes: list[tuple[float, dict[str, Any]]] = []
        self.server: TestServer | None = None
        self._released = asyncio.Event()

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/v1/offers"))

    @property
    def offers(self) -> list[dict[str, Any]]:
        return [offer for _, offer in self.pushes]

    @property
    def gaps(self) -> list[float]:
        times = [at for at, _ in self.pushes]
        return [b - a for a, b in pairwise(times)]

    async def _take(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        self.pushes.append((self.clock(), await request.json()))
        if self.hang:
            await self._released.wait()
        return web.Response(status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/offers", self._take)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()

    async def close(self) -> None:
        self._released.set()
        if self.server is not None:
            await self.server.close()


@pytest.fixture
async def registries() -> AsyncIterator[Callable[..., Any]]:
    """Starts registries on demand (``await make(status=...)``) and closes them all at the end."""
    made: list[Registry] = []

    async def make(status: int = 200) -> Registry:
        registry = Registry(status)
        await registry.start()
        made.append(registry)
        return registry

    yield make
    for registry in made:
        await registry.close()


def home_with(tmp_path: Path, urls: list[str], **registry: Any) -> Path:
    section = {"urls": urls, "check_seconds": 0.05, "heartbeat_seconds": 30, **registry}
    return write_home(tmp_path / "home", {"node": {"public_url": PUBLIC_URL}, "registry": section})


async def until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class PusherClock:
    """An :class:`OfferPusher`'s clock, moved by the test. ``reads`` counts its loop's looks at it: two
    looks after a move mean the loop decided at the new time and finished any push it began then."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    async def move_to(self, now: float) -> None:
        self.now, seen = now, self.reads
        await until(lambda: self.reads >= seen + 2)


async def http_get(ln: LiveNode, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(ln.url + path) as r:
        return r.status, await r.text()


async def metric(ln: LiveNode, name: str, **labels: str) -> float:
    """The value of one sample of /metrics (0 when the labelled series does not exist yet)."""
    status, text = await http_get(ln, "/metrics")
    assert status == 200
    return sample(text, name, **labels) or 0.0


def unstamped(offer: dict[str, Any]) -> dict[str, Any]:
    """The offer without its stamps and signature, and without the free disk (which other processes move)."""
    body = {k: v for k, v in offer.items() if k not in STAMPS}
    body["disk"] = {k: v for k, v in body["disk"].items() if k != "free_mb"}
    return body


# ------------------------------------------------------------------------------------------ the document


@dataclass
class Source:
    """Node state for :func:`offer_document` without a node: a machine with a recorded H100, a chain."""

    did: str
    cfg: NodeConfig
    ledger: CapacityLedger
    machine: MachineInfo
    models: ModelCatalog
    payout_address: str | None
    state_dir: Path


CHAIN = {
    "rpc_url": "http://127.0.0.1:8545",
    "chain_id": 31337,
    "escrow": "0x" + "e" * 40,
    "token": "0x" + "c" * 40,
}
WALLET = "0x" + "A1" * 20


@pytest.fixture
def h100_source(tmp_path: Path) -> Source:
    cfg = parse_config({"node": {"public_url": PUBLIC_URL}, "chain": CHAIN})
    machine = discover(cfg.capacity, disk_path=tmp_path, nvml=lambda: FakeNvml(recorded_answers("nvml_h100")))
    return Source(
        did=new_ed25519().did,
        cfg=cfg,
        ledger=CapacityLedger(Resources(cpus=8.0, memory_mb=65536, gpus=1)),
        machine=machine,
        models=ModelCatalog([]),
        payout_address=WALLET,
        state_dir=tmp_path,
    )


def test_offer_document_of_a_gpu_node_with_a_chain(h100_source: Source) -> None:
    issuer = OfferIssuer(h100_source, new_ed25519(), now=time.time)
    doc = issuer.document()
    assert doc["node"] == h100_source.did
    assert doc["endpoint"] == PUBLIC_URL
    assert doc["payout_address"] == WALLET
    assert doc["payment"] == {
        "currency": "usdc",
        "chain_id": 31337,
        "escrow": CHAIN["escrow"],
        "token": CHAIN["token"],
    }
    assert doc["resources"]["free"] == {"cpus": 8.0, "memory_mb": 65536, "gpus": 1}
    disk = h100_source.machine.disk
    assert doc["disk"]["total_mb"] == disk.total_mb and set(doc["disk"]) == {"total_mb", "free_mb"}
    assert str(h100_source.state_dir) not in json.dumps(doc)  # no local paths in a public document
    assert "disk" not in doc["machine"]  # one disk reading per offer: the current one
    assert doc["machine"]["driver_version"] == "550.54.15"
    assert doc["machine"]["cuda_version"] == "12.4"
    (gpu,) = doc["machine"]["gpus"]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3" and gpu["memory_total_mb"] == 81559
    assert gpu["compute_capability"] == "9.0" and gpu["utilisation_gpu_pct"] == 3
    assert doc["prices"]["cpu_second"] == h100_source.cfg.pricing.cpu_second
    assert set(doc) >= {"kinds", "models", "limits", "name"}
    json.dumps(doc)


def test_a_node_without_a_chain_offers_no_payout(h100_source: Source) -> None:
    h100_source.cfg = parse_config({})
    h100_source.payout_address = None
    doc = offer_document(h100_source, disk=h100_source.machine.disk)
    assert doc["payout_address"] is None and doc["payment"] is None and doc["endpoint"] is None


def test_issued_offers_are_signed_and_their_sequence_only_grows(h100_source: Source) -> None:
    signer = new_ed25519()
    h100_source.did = signer.did
    frozen = 1_700_000_000.0
    issuer = OfferIssuer(h100_source, signer, now=lambda: frozen)
    first, second = issuer.issue(), issuer.issue()
    assert first["sequence"] == int(frozen * 1000) and second["sequence"] == first["sequence"] + 1
    assert first["issued_at"] == int(frozen)
    claims = verify_node_token(second["jwt"], signer.did, now=lambda: frozen)
    assert claims["offer"] == {k: v for k, v in second.items() if k != "jwt"}
    assert claims["sub"] == signer.did
    # A restart a second later starts a new issuer; its offers still come after the old ones.
    restarted = OfferIssuer(h100_source, signer, now=lambda: frozen + 1)
    assert restarted.issue()["sequence"] > second["sequence"]


def test_fingerprint_ignores_stamps_and_free_disk_but_not_prices_or_capacity(h100_source: Source) -> None:
    issuer = OfferIssuer(h100_source, new_ed25519(), now=time.time)
    doc = issuer.document()
    signed = issuer.issue()
    assert offer_fingerprint(signed) == offer_fingerprint(doc)
    moved_disk = {**doc, "disk": {**doc["disk"], "free_mb": doc["disk"]["free_mb"] - 1}}
    assert offer_fingerprint(moved_disk) == offer_fingerprint(doc)
    repriced = {**doc, "prices": {**doc["prices"], "cpu_second": "0.1"}}
    assert offer_fingerprint(repriced) != offer_fingerprint(doc)
    h100_source.ledger.reserve("job", Resources(cpus=1.0, memory_mb=512), expires_at=None)
    assert offer_fingerprint(issuer.document()) != offer_fingerprint(doc)


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = [backoff_delay(n, initial=1.0, cap=300.0) for n in range(1, 12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert backoff_delay(10_000, initial=1.0, cap=300.0) == 300.0  # no float overflow after a long outage


# -------------------------------------------------------------------------------------------- [registry]


def test_registry_section_defaults() -> None:
    section = parse_config({}).registry
    assert section == RegistrySection()
    assert section.urls == [] and section.heartbeat_seconds == 60.0
    assert section.backoff_initial_seconds <= section.backoff_max_seconds


@pytest.mark.parametrize(
    ("registry", "problem"),
    [
        ({"urls": ["ftp://registry.example"]}, "must be an http(s):// URL"),
        ({"urls": ["https://"]}, "must be an http(s):// URL"),
        ({"urls": ["https://user:secret@registry.example/v1"]}, "must not carry a user or password"),
        ({"urls": ["https://registry.example/#x"]}, "must not have a #fragment"),
        ({"urls": ["https://r.example", "https://r.example"]}, "must be unique"),
        ({"backoff_initial_seconds": 10, "backoff_max_seconds": 5}, "must not exceed backoff_max_seconds"),
        ({"heartbeat_seconds": 0}, "registry.heartbeat_seconds"),
        ({"timeout_seconds": -1}, "registry.timeout_seconds"),
        ({"url": "https://r.example"}, "registry.url"),
    ],
)
def test_registry_section_is_validated(registry: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"registry": registry})
    assert info.value.code == "invalid_config"
    assert problem in info.value.message
    assert "secret" not in info.value.message


# -------------------------------------------------------------------------------------- pushes, for real


async def test_the_offer_is_pushed_at_start_signed_and_equal_to_get_capacity(
    tmp_path: Path, registries: Callable[..., Any]
) -> None:
    registry: Registry = await registries()
    async with live(home_with(tmp_path, [registry.url])) as ln:
        await until(lambda: len(registry.pushes) >= 1)
        pushed = registry.offers[0]
        claims = verify_node_token(pushed["jwt"], ln.did)
        assert claims["offer"] == {k: v for k, v in pushed.items() if k != "jwt"}
        assert pushed["node"] == ln.did and pushed["endpoint"] == PUBLIC_URL
        assert pushed["payout_address"] is None  # no [chain]: this node takes no payments

        status, text = await http_get(ln, "/v1/capacity")
        assert status == 200
        fetched = json.loads(text)
        verify_node_token(fetched["jwt"], ln.did)
        assert unstamped(fetched) == unstamped(pushed)
        assert fetched["sequence"] > pushed["sequence"]
        assert await metric(ln, "hearth_offer_pushes_total", registry=registry.url, outcome="ok") >= 1


async def test_a_price_change_and_a_capacity_change_are_pushed_before_the_heartbeat(
    tmp_path: Path, registries: Callable[..., Any], requester: Signer
) -> None:
    registry: Registry = await registries()
    home = home_with(tmp_path, [registry.url])  # heartbeat 30 s: every push below is a change
    async with live(home) as ln:
        await until(lambda: len(registry.pushes) == 1)
        start_price = registry.offers[0]["prices"]["cpu_second"]

        config = {
            "node": {"public_url": PUBLIC_URL},
            "registry": {"urls": [registry.url], "check_seconds": 0.05, "heartbeat_seconds": 30},
            "pricing": {"cpu_second": "0.00005"},
        }
        write_home(home, config)
        ln.node.reload()
        await until(lambda: len(registry.pushes) == 2)
        started_at = registry.pushes[0][0]
        repriced_at, repriced = registry.pushes[1]
        assert start_price != "0.00005" and repriced["prices"]["cpu_second"] == "0.00005"
        assert repriced_at - started_at < 30  # the heartbeat was not due: the change sent it
        assert repriced["sequence"] > registry.offers[0]["sequence"]

        async with aiohttp.ClientSession() as s:
            token = ln.sign(requester, {"job": make_envelope()})
            headers = {"Content-Type": "application/jwt"}
            async with s.post(ln.url + "/v1/quotes", data=token, headers=headers) as r:
                assert r.status == 201, await r.text()
        await until(lambda: len(registry.pushes) == 3)
        assert registry.pushes[2][0] - started_at < 30
        held = registry.offers[2]["resources"]
        assert held["holds"] == 1 and held["used"]["cpus"] == make_envelope()["limits"]["cpus"]
        await asyncio.sleep(0.3)
        assert len(registry.pushes) == 3  # nothing changed since: nothing more until the heartbeat


async def test_heartbeats_repeat_the_same_offer_and_never_come_early(
    tmp_path: Path, registries: Callable[..., Any]
) -> None:
    registry: Registry = await registries()
    async with live(home_with(tmp_path, [registry.url], heartbeat_seconds=0.2)) as ln:
        await until(lambda: len(registry.pushes) >= 6)
        # each is due 0.2 s after the previous one was answered (how soon after: see the PusherClock tests)
        assert all(gap >= 0.2 for gap in registry.gaps), registry.gaps
        sequences = [offer["sequence"] for offer in registry.offers]
        assert sequences == sorted(set(sequences))
        assert len({offer_fingerprint(offer) for offer in registry.offers}) == 1
        assert ln.node.ready


async def test_failing_registries_back_off_capped_while_the_others_get_their_pushes(
    tmp_path: Path, registries: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hearth.registry")
    good: Registry = await registries()
    broken: Registry = await registries(status=500)
    silent: Registry = await registries()
    silent.hang = True
    refusing = f"http://127.0.0.1:{free_port()}/v1/offers"  # nothing listens there
    urls = [good.url, broken.url, refusing, silent.url]
    home = home_with(
        tmp_path,
        urls,
        heartbeat_seconds=0.2,
        backoff_initial_seconds=0.1,
        backoff_max_seconds=0.4,
        timeout_seconds=0.3,
    )
    async with live(home) as ln:
        # Waits of at least 0.1, 0.2, then 0.4 s (the cap: exactly 0.4, never 0.8, on the PusherClock).
        await until(lambda: len(broken.pushes) >= 6)
        gaps = broken.gaps[:5]
        assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and all(gap >= 0.4 for gap in gaps[2:]), gaps

        # Meanwhile the good registry had its heartbeats (that a hung registry holds none up: see below).
        assert len(good.pushes) >= 6
        refused = await metric(ln, "hearth_offer_pushes_total", registry=refusing, outcome="unreachable")
        assert 3 <= refused <= 8  # backing off as well, not retried in a tight loop
        assert await metric(ln, "hearth_offer_pushes_total", registry=broken.url, outcome="failed") >= 6
        assert await metric(ln, "hearth_offer_pushes_total", registry=silent.url, outcome="timeout") >= 2
        assert await metric(ln, "hearth_offer_pushes_total", registry=good.url, outcome="ok") >= 6

        # One warning per registry however often it failed: logged again only when the outcome changes.
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        for url, outcome in ((broken.url, "failed"), (refusing, "unreachable"), (silent.url, "timeout")):
            assert sum(url in w for w in warnings) == 1, warnings
            assert any(f"{url} failed ({outcome})" in w for w in warnings)

        broken.status = 200  # the registry is back: its next retry goes through
        attempts = len(broken.pushes)
        await until(lambda: len(broken.pushes) >= attempts + 3)
        recovered = [
            r.getMessage()
            for r in caplog.records
            if "after" in r.getMessage() and broken.url in r.getMessage()
        ]
        assert len(recovered) == 1 and "failed attempt(s)" in recovered[0]
        # taken since: the retry and the heartbeat after it at least (the third may still be answering)
        assert await metric(ln, "hearth_offer_pushes_total", registry=broken.url, outcome="ok") >= 2
        assert ln.node.ready


async def test_stopping_the_node_stops_the_pushes(tmp_path: Path, registries: Callable[..., Any]) -> None:
    registry: Registry = await registries()
    async with live(home_with(tmp_path, [registry.url], heartbeat_seconds=0.1)):
        await until(lambda: len(registry.pushes) >= 2)
    stopped_with = len(registry.pushes)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("hearth-registry")]
    await asyncio.sleep(0.4)  # four heartbeats' worth
    assert len(registry.pushes) == stopped_with


async def test_without_registries_nothing_is_pushed_or_started(tmp_path: Path) -> None:
    async with live(write_home(tmp_path / "home")) as ln:
        assert ln.node.cfg.registry.urls == []
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("hearth-registry")]
        status, text = await http_get(ln, "/v1/capacity")
        assert status == 200 and json.loads(text)["sequence"] > 0


async def test_a_node_on_a_chain_offers_its_wallet_as_payout(
    tmp_path: Path, registries: Callable[..., Any]
) -> None:
    registry: Registry = await registries()
    section = {"urls": [registry.url], "check_seconds": 0.05, "heartbeat_seconds": 30}
    ph = paid_home(tmp_path / "home", {"registry": section})  # anvil, contracts, [chain], the node's wallet
    try:
        async with live(ph.home) as ln:
            await until(lambda: len(registry.pushes) >= 1)
            pushed = registry.offers[0]
            assert pushed["payout_address"] == ph.node_wallet.address
            assert pushed["payment"] == {
                "currency": "usdc",
                "chain_id": ph.net.chain_id,
                "escrow": ph.net.escrow,
                "token": ph.net.token,
            }
            status, text = await http_get(ln, "/v1/capacity")
            assert status == 200 and unstamped(json.loads(text)) == unstamped(pushed)
    finally:
        devnet.stop(ph.home)


class FlakyOffers:
    """Offers whose building fails ``failures`` times (a bug in the node), then works."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.sequence = 0
        self.price = "0.00002"

    def document(self) -> dict[str, Any]:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("offer building broke")
        return {"node": "did:key:z6MkTest", "prices": {"cpu_second": self.price}}

    def issue(self) -> dict[str, Any]:
        self.sequence += 1
        return {**self.document(), "sequence": self.sequence, "jwt": "unsigned-in-this-test"}


async def test_a_push_loop_outlives_a_broken_offer_and_tells_refusals_apart(
    registries: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    good: Registry = await registries()
    forbidding: Registry = await registries(status=403)
    outcomes: list[tuple[str, str]] = []
    section = RegistrySection(
        urls=[good.url, forbidding.url],
        heartbeat_seconds=30,
        check_seconds=0.05,
        backoff_initial_seconds=0.05,
        backoff_max_seconds=0.1,
    )
    pusher = OfferPusher(section, FlakyOffers(failures=3), on_push=lambda url, o: outcomes.append((url, o)))
    await pusher.start()
    try:
        await until(lambda: len(good.pushes) == 1 and len(forbidding.pushes) >= 2)
    finally:
        await pusher.stop()
    # The broken offer cost each registry's loop a backed-off round or more, logged once per registry
    # with its traceback; then the offer went out.
    failed_urls = {url for url, o in outcomes if o == "error"}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failed_urls and len(errors) == len(failed_urls)
    assert all(r.exc_info is not None and "offer building broke" in str(r.exc_info[1]) for r in errors)
    mine = [o for url, o in outcomes if url == good.url]
    assert mine[-1] == "ok" and set(mine[:-1]) <= {"error"}
    assert [o for _, o in outcomes].count("error") == 3
    assert good.offers[0]["prices"] == {"cpu_second": "0.00002"}
    assert {o for url, o in outcomes if url == forbidding.url} >= {"refused"}
    pushes = len(good.pushes) + len(forbidding.pushes)
    await asyncio.sleep(0.2)
    assert len(good.pushes) + len(forbidding.pushes) == pushes  # stopped means stopped


async def test_on_the_pushers_clock_heartbeats_and_changes_go_when_due_and_a_hung_registry_holds_none_up(
    registries: Callable[..., Any],
) -> None:
    good: Registry = await registries()
    hung: Registry = await registries()
    hung.hang = True  # never answers: its loop waits on its first push for the whole test
    clock, offers, outcomes = PusherClock(), FlakyOffers(), list[str]()
    good.clock = hung.clock = lambda: clock.now
    section = RegistrySection(
        urls=[good.url, hung.url], heartbeat_seconds=30, check_seconds=0.01, timeout_seconds=300
    )
    pusher = OfferPusher(section, offers, on_push=lambda url, o: outcomes.append(o), clock=clock)
    await pusher.start()
    try:
        await until(lambda: outcomes == ["ok"] and len(hung.pushes) == 1)  # both at once, at start
        for now in (29.9, 30):
            await clock.move_to(now)
        # a change 10 s after the heartbeat (the clock is at 40 before the loop looks again): sent at once,
        # and the next heartbeat counts from it
        offers.price = "0.00005"
        pusher.changed()
        for now in (40, 69.9, 70):
            await clock.move_to(now)
    finally:
        await pusher.stop()
    assert [at for at, _ in good.pushes] == [0, 30, 40, 70]
    assert [offer["prices"]["cpu_second"] for offer in good.offers] == ["0.00002"] * 2 + ["0.00005"] * 2
    assert len(hung.pushes) == 1 and outcomes == ["ok"] * 4  # the hung push never ended, nor held up any


async def test_on_the_pushers_clock_a_failing_registry_is_retried_doubling_up_to_the_cap(
    registries: Callable[..., Any],
) -> None:
    broken: Registry = await registries(status=500)
    clock, outcomes = PusherClock(), list[str]()
    broken.clock = lambda: clock.now
    section = RegistrySection(
        urls=[broken.url],
        heartbeat_seconds=30,
        check_seconds=0.01,
        backoff_initial_seconds=1,
        backoff_max_seconds=4,
    )
    pusher = OfferPusher(section, FlakyOffers(), on_push=lambda url, o: outcomes.append(o), clock=clock)
    await pusher.start()
    try:
        await until(lambda: outcomes == ["failed"])
        for now in (0.9, 1, 2.9, 3, 6.9, 7):  # waits of 1, 2, then 4 s (the cap)
            await clock.move_to(now)
        pusher.changed()  # a changed offer does not cut a wait short
        for now in (7.5, 10.9, 11, 14.9, 15):
            await clock.move_to(now)
        broken.status = 200  # back: the next retry goes through, then heartbeats
        for now in (18.9, 19, 48.9, 49):
            await clock.move_to(now)
    finally:
        await pusher.stop()
    assert [at for at, _ in broken.pushes] == [0, 1, 3, 7, 11, 15, 19, 49]
    assert outcomes == ["failed"] * 6 + ["ok"] * 2
